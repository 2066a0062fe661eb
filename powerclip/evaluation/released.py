"""Released checkpoints as evaluation targets: fetched into a folder, then loaded with their authors' pooling.

An entry of the config's ``released:`` section (docs/formats.md, "Released checkpoints") names a source
(an ``http(s)`` URL of a file, or an ``hf-hub:`` repository), the format of its weights, the architecture and
the pooling of both towers. :func:`fetch_released` (rule ``fetch_released``, no torch needed) downloads it into
``resources/released/<name>/`` (a file through :func:`powerclip.fetch.http.fetch_checkpoint` with its sha256; a
repository with ``huggingface_hub``'s ``snapshot_download``) and writes :data:`DESCRIPTOR` last, all atomically.
:func:`load_released` rebuilds the model from such a folder for clip-benchmark (powerclip.evaluation.loader),
through the weight layout's entry of :data:`FORMATS`:

* ``openclip``: an open_clip checkpoint, a file (a state_dict, or ``{"epoch", "state_dict", ...}`` as
  open_clip_train saves it, ``module.`` prefixes stripped: CLIP-PGS's releases) for the open_clip config
  ``model``, or an open_clip Hub folder (``open_clip_config.json`` + weights: PowerCLIP's models);
* ``clippy``: the CLIPpy replication's checkpoint (its open_clip fork: a timm ViT trunk, a sentence-transformers
  Sentence-T5 as ``text.0`` / ``text.2``), mapped onto clippy's published towers (powerclip.methods.clippy).

Every file is read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from powerclip.fetch.http import DownloadError, fetch_checkpoint, retry, sha256_file
from powerclip.shards import atomic_output, atomic_output_dir

log = logging.getLogger(__name__)

DESCRIPTOR = "released.json"
HUB = "hf-hub:"
# What a clippy entry needs of its text tower besides the weights in the checkpoint: config and tokenizer.
TEXT_TOWER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")


# ---------------------------------------------------------------------------------------------- fetching
def check_entry(name: str, spec: Mapping[str, Any]) -> None:
    """Refuse an entry the schema cannot: a file without its architecture, a sha256 for a Hub repository, a
    pool its format cannot apply. ValueError naming ``released.<name>`` and what to set."""
    where = f"config released.{name}"
    hub = spec["source"].startswith(HUB)
    if spec["format"] == "openclip" and not hub and not spec.get("model"):
        raise ValueError(f"{where}: a file's architecture must be given: set model (an open_clip config name, e.g. ViT-B-16)")
    if hub and spec.get("sha256"):
        raise ValueError(f"{where}: sha256 is for files; a Hub repository is pinned by revision (a commit)")
    if spec["format"] == "clippy" and (spec["vision_pool"], spec["text_pool"]) != ("max", "avg"):
        raise ValueError(f"{where}: format clippy is pooled as CLIPpy pools it: vision_pool max, text_pool avg")


def _snapshot(repo_id: str, out_dir: Path, revision: str, retries: int, backoff_s: float, **options) -> str:
    """``snapshot_download`` of a Hub model repository into ``out_dir``; returns the commit it resolved to."""
    from huggingface_hub import HfApi, snapshot_download

    from powerclip.fetch.huggingface import hub_call

    what = f"model repo {repo_id!r} revision {revision!r}"

    def download() -> str:
        commit = HfApi(endpoint=options.get("endpoint")).repo_info(repo_id, revision=revision).sha
        snapshot_download(repo_id, revision=commit, local_dir=out_dir, **options)
        return commit

    commit = retry(lambda: hub_call(download, what), retries, backoff_s, what=what)
    shutil.rmtree(out_dir / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping of local_dir
    return commit


def _file_name(url: str) -> str:
    name = PurePosixPath(urllib.parse.urlsplit(url).path).name
    if not name or name in (".", ".."):
        raise DownloadError(f"{url}: no file name in the URL; check released.<name>.source")
    return name


def fetch_released(
    name: str, spec: Mapping[str, Any], out_dir: str | os.PathLike, *, endpoint: str | None = None, backoff_s: float = 2.0
) -> dict:
    """Download entry ``name`` into ``out_dir`` (created atomically) and write its :data:`DESCRIPTOR`.

    A file source is checked against ``sha256`` when one is given (the digest found is recorded either way);
    a Hub source is resolved to a commit first, so the descriptor names exactly what was downloaded. A clippy
    entry whose ``text_tower`` is a Hub id also gets that repository's config and tokenizer files (the weights
    are in the checkpoint), so evaluation needs no network. Returns the descriptor."""
    check_entry(name, spec)
    out_dir = Path(out_dir)
    source, retries = spec["source"], spec["retries"]
    descriptor = {key: spec.get(key) for key in ("source", "format", "model", "vision_pool", "text_pool", "revision")}
    descriptor["name"] = name
    with atomic_output_dir(out_dir) as tmp:
        if source.startswith(HUB):
            repo = source[len(HUB) :]
            commit = _snapshot(repo, tmp / "weights", spec["revision"], retries, backoff_s, endpoint=endpoint)
            files = sorted(p for p in (tmp / "weights").rglob("*") if p.is_file())
            descriptor.update(weights="weights", commit=commit, model=descriptor["model"] or source,
                              sha256={str(p.relative_to(tmp)): sha256_file(p) for p in files})  # fmt: skip
        else:
            target = tmp / _file_name(source)
            digest = fetch_checkpoint(source, target, spec.get("sha256"), retries=retries, backoff_s=backoff_s)
            if not spec.get("sha256"):
                log.warning("%s: no sha256 configured to check %s against; it has sha256 %s", name, source, digest)
            descriptor.update(weights=target.name, sha256={target.name: digest})
        if spec["format"] == "clippy":
            descriptor.update(image_tower=spec["image_tower"], text_tower=spec["text_tower"])
            if not os.path.isdir(spec["text_tower"]):
                options = {"endpoint": endpoint, "allow_patterns": list(TEXT_TOWER_FILES)}
                descriptor["text_commit"] = _snapshot(spec["text_tower"], tmp / "text", "main", retries, backoff_s, **options)
                descriptor["text_tower"] = "text"
            descriptor["model"] = descriptor["model"] or f"clippy-published ({spec['image_tower']} + {spec['text_tower']})"
        with atomic_output(tmp / DESCRIPTOR) as part:
            part.write_text(json.dumps(descriptor, indent=2, sort_keys=True) + "\n")
    log.info("%s: %s -> %s", name, source, out_dir)
    return descriptor


# ----------------------------------------------------------------------------------------------- loading
def is_released(path: str | os.PathLike | None) -> bool:
    """A folder written by :func:`fetch_released` (it holds :data:`DESCRIPTOR`)."""
    return bool(path) and (Path(path) / DESCRIPTOR).is_file()


def read_descriptor(folder: str | os.PathLike) -> dict:
    path = Path(folder) / DESCRIPTOR
    try:
        descriptor = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable released-checkpoint descriptor ({exc}); fetch it again") from exc
    missing = {"format", "weights", "vision_pool", "text_pool"} - set(descriptor)
    if missing or descriptor["format"] not in FORMATS:
        raise ValueError(f"{path}: needs format (one of {sorted(FORMATS)}), weights and both pools; missing {sorted(missing)}")
    return descriptor


def _local(folder: Path, relative: str) -> str:
    """A path of the descriptor, relative to its folder (a path given absolute in the config stays as is)."""
    return str(relative if os.path.isabs(relative) else (folder / relative).resolve())


def _load_openclip(folder: Path, d: Mapping[str, Any]):
    from powerclip.safe_load import read_checkpoint
    from powerclip.model import load_openclip_checkpoint

    weights = _local(folder, d["weights"])
    if os.path.isdir(weights):  # an open_clip Hub folder: config and weights from it
        name = f"local-dir:{weights}"
        return load_openclip_checkpoint(name, None, d["vision_pool"], d["text_pool"]), name
    read_checkpoint(weights)  # refuses a file that would run code, naming it, before open_clip reads it
    return load_openclip_checkpoint(d["model"], weights, d["vision_pool"], d["text_pool"]), d["model"]


def clippy_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """The replication's weights (``module.`` prefixed; Sentence-T5 as sentence-transformers modules: the T5
    encoder in ``text.0.auto_model``, the dense layer in ``text.2``) under the published towers' names."""
    out = {}
    for key, value in state_dict.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if key.startswith("text.0.auto_model.encoder."):
            out["text.transformer." + key[len("text.0.auto_model.encoder.") :]] = value
        elif key == "text.2.linear.weight":
            out["text.proj.weight"] = value
        elif not key.startswith("text.0.auto_model.shared."):  # the encoder's embed_tokens, tied
            out[key] = value
    return out


def _load_clippy(folder: Path, d: Mapping[str, Any]):
    import timm

    from powerclip.safe_load import read_checkpoint
    from powerclip.methods.clippy import published_config, register_published_config
    from powerclip.towers import CLIPPY_POOLS, install_t5_text_tower
    from powerclip.model import create_model

    checkpoint = read_checkpoint(_local(folder, d["weights"]))
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    install_t5_text_tower()
    size = (timm.get_pretrained_cfg(d["image_tower"]).input_size or (3, 224, 224))[-1]
    name = register_published_config(published_config(d["image_tower"], _local(folder, d["text_tower"]), size))
    model = create_model(name, *CLIPPY_POOLS, pretrained_image=False, pretrained_text=False)
    model.load_state_dict(clippy_state_dict(state), strict=True)
    return model, name


# format -> loader(folder, descriptor) -> (model, tokenizer name for open_clip.get_tokenizer)
FORMATS: dict[str, Callable[[Path, Mapping[str, Any]], tuple[Any, str]]] = {
    "openclip": _load_openclip,
    "clippy": _load_clippy,
}


def load_released(folder: str | os.PathLike):
    """``(model, tokenizer name)`` of a folder written by :func:`fetch_released`, with its recorded pooling."""
    folder = Path(folder)
    d = read_descriptor(folder)
    model, tokenizer = FORMATS[d["format"]](folder, d)
    log.info("released %s (%s, %s): vision_pool=%s, text_pool=%s", d.get("name"), d["format"], d.get("source"),
             d["vision_pool"], d["text_pool"])  # fmt: skip
    return model, tokenizer


__all__ = ["DESCRIPTOR", "FORMATS", "check_entry", "clippy_state_dict", "fetch_released", "is_released", "load_released",
           "read_descriptor"]  # fmt: skip
