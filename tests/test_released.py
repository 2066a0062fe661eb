"""Released checkpoints as evaluation targets: fetched from a server on 127.0.0.1 (a file with its sha256, a Hub
repository through snapshot_download), loaded by the evaluation loader with the pooling of their entry, bit for
bit; the checks of an entry; the workflow's targets results/released/<name>/eval.csv.

Each loader is tested on a file built here in the release's own layout: CLIP-PGS's is what open_clip_train
saves (``{"epoch", "name", "state_dict" with module. prefixes, "optimizer"}``), PowerCLIP's an open_clip Hub
folder (``open_clip_config.json`` + ``open_clip_model.safetensors``), CLIPpy's what its fork saves (a timm trunk,
Sentence-T5 as sentence-transformers modules ``text.0.auto_model`` and ``text.2``).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
import torch
from servers import FakeHub, FileServer
from servers import hf_env  # noqa: F401 - a fixture
from test_clippy import IMAGE_TOWER, TEXTS, images, tiny_published, write_t5_tower

from powerclip.evaluation.loader import checkpoint_model_name, load_powerclip
from powerclip.evaluation.released import DESCRIPTOR, check_entry, fetch_released
from powerclip.fetch.http import DownloadError
from powerclip.model import create_model

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "PowerCLIP-Tiny-64-8"  # an open_clip CLIP config, the stock ViT-B-16 layout at test size
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
DEFAULTS = {"sha256": None, "revision": "main", "format": "openclip", "model": None, "vision_pool": "avg",
            "text_pool": "avg", "image_tower": "vit_base_patch16_224.dino",
            "text_tower": "sentence-transformers/sentence-t5-base", "retries": 2}  # fmt: skip


class ModelHub(FakeHub):
    """Just enough of the Hub's API for ``snapshot_download`` of model repositories: repo info (the commit),
    the recursive tree listing, and ``/resolve`` of each file (plain git files: ETag = git blob sha1)."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        super().__init__({})
        self.repos = repos

    def handle(self, req, head: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(req.path).path)
        with self.lock:
            self.requests.append(("HEAD" if head else "GET", path))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo = (api or resolve).group(1) if (api or resolve) else None
        if repo not in self.repos:
            not_found = {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}
            self._reply(req, 401, not_found, b"", head)
            return
        files = self.repos[repo]
        blob = {name: hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() for name, data in files.items()}
        as_json = {"Content-Type": "application/json"}
        if api and api.group(2) == "revision":
            info = {"id": repo, "modelId": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
            self._reply(req, 200, as_json, json.dumps(info).encode(), head)
        elif api:
            tree = [{"type": "file", "path": f, "size": len(d), "oid": blob[f]} for f, d in files.items()]
            self._reply(req, 200, as_json, json.dumps(tree).encode(), head)
        elif resolve.group(3) in files:
            name = resolve.group(3)
            headers = {"ETag": f'"{blob[name]}"', "X-Repo-Commit": COMMIT, "Content-Type": "application/octet-stream"}
            self._reply(req, 200, headers, files[name], head)
        else:
            headers = {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": COMMIT}
            self._reply(req, 404, headers, b"", head)


def entry(**spec) -> dict:
    return {**DEFAULTS, **spec}


def same_embeddings(model, loaded, tokenizer, texts=TEXTS) -> None:
    x = images()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), model.encode_image(x))
        assert torch.equal(loaded.encode_text(tokenizer(texts)), model.encode_text(tokenizer(texts)))


# --------------------------------------------------------------------- CLIP-PGS: an open_clip_train file
def open_clip_train_file(model, path: Path) -> bytes:
    """What open_clip_train saves after DDP training (CLIP-PGS's release): module.-prefixed weights, the epoch,
    the run name and the AdamW state."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(images(2), torch.zeros(2, 77, dtype=torch.long))[0].sum().backward()
    optimizer.step()
    state = {"epoch": 32, "name": "clip-pgs-0.3", "optimizer": optimizer.state_dict(),
             "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}  # fmt: skip
    torch.save(state, path)
    return path.read_bytes()


def test_clip_pgs_file_fetched_with_sha256_loads_with_stock_pooling(tmp_path):
    model = create_model(MODEL, "cls", "argmax", seed=4)
    data = open_clip_train_file(model, tmp_path / "clip-pgs-0.3.pt")
    server = FileServer({"/v0.1/clip-pgs-0.3.pt": data})
    try:
        spec = entry(source=f"{server.url}/v0.1/clip-pgs-0.3.pt", sha256=hashlib.sha256(data).hexdigest(), model=MODEL,
                     vision_pool="cls", text_pool="argmax")  # fmt: skip
        descriptor = fetch_released("clip-pgs-0.3", spec, tmp_path / "released" / "clip-pgs-0.3")
    finally:
        server.close()
    folder = tmp_path / "released" / "clip-pgs-0.3"
    assert (folder / "clip-pgs-0.3.pt").read_bytes() == data and (folder / DESCRIPTOR).is_file()
    assert descriptor["sha256"] == {"clip-pgs-0.3.pt": hashlib.sha256(data).hexdigest()}
    assert checkpoint_model_name(folder) == MODEL
    loaded, _, tokenizer = load_powerclip(pretrained=str(folder))
    assert (loaded.visual.pool_type, loaded.text_pool_type) == ("tok", "argmax")
    same_embeddings(model, loaded, tokenizer)


def test_a_wrong_sha256_leaves_no_folder(tmp_path):
    server = FileServer({"/x.pt": b"not the release"})
    try:
        spec = entry(source=f"{server.url}/x.pt", sha256="0" * 64, model=MODEL, retries=1)
        with pytest.raises(DownloadError, match="sha256"):
            fetch_released("x", spec, tmp_path / "x")
    finally:
        server.close()
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------- PowerCLIP: an open_clip Hub folder
def open_clip_hub_files(model) -> dict[str, bytes]:
    """An open_clip Hub repository's files (open_clip's push_to_hf_hub layout)."""
    from safetensors.torch import save

    config = {"model_cfg": model.powerclip_cfg["model_cfg"],
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}  # fmt: skip
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return {"open_clip_config.json": json.dumps(config).encode(), "open_clip_model.safetensors": save(state),
            "README.md": b"# a model card\n"}  # fmt: skip


def test_open_clip_hub_folder_loads_as_local_dir_with_avg_pooling(tmp_path):
    model = create_model(MODEL, "avg", "avg", seed=6)
    folder = tmp_path / "hub"
    folder.mkdir()
    for name, data in open_clip_hub_files(model).items():
        (folder / name).write_bytes(data)
    loaded, _, tokenizer = load_powerclip(pretrained=f"local-dir:{folder}")
    assert (loaded.visual.pool_type, loaded.text_pool_type) == ("avg", "avg")
    same_embeddings(model, loaded, tokenizer)


def test_hub_repository_fetched_by_snapshot_and_loaded(tmp_path, hf_env):
    model = create_model(MODEL, "avg", "avg", seed=7)
    hub = ModelHub({"KMasaki/PowerCLIP-Tiny": open_clip_hub_files(model)})
    try:
        spec = entry(source="hf-hub:KMasaki/PowerCLIP-Tiny")
        descriptor = fetch_released("powerclip-tiny", spec, tmp_path / "powerclip-tiny", endpoint=hub.endpoint)
        with pytest.raises(DownloadError, match="not found on the Hub"):
            fetch_released("other", entry(source="hf-hub:KMasaki/Missing"), tmp_path / "other", endpoint=hub.endpoint)
    finally:
        hub.close()
    assert descriptor["commit"] == COMMIT and descriptor["weights"] == "weights"
    assert set(descriptor["sha256"]) == {f"weights/{f}" for f in ("open_clip_config.json", "open_clip_model.safetensors", "README.md")}
    assert not (tmp_path / "other").exists()
    loaded, _, tokenizer = load_powerclip(pretrained=str(tmp_path / "powerclip-tiny"))
    assert (loaded.visual.pool_type, loaded.text_pool_type) == ("avg", "avg")
    same_embeddings(model, loaded, tokenizer)


# ------------------------------------------------------------------------- CLIPpy: the replication's file
def clippy_fork_file(model, path: Path) -> bytes:
    """What the replication's open_clip fork saves: the timm trunk as ``visual.trunk``, Sentence-T5 as
    sentence-transformers modules (a transformers T5EncoderModel in ``text.0.auto_model``, its tied ``shared``
    embedding included; the dense layer's ``linear`` in ``text.2``), DDP's ``module.`` prefix."""
    from transformers import T5EncoderModel

    encoder = T5EncoderModel(model.text.config)
    encoder.encoder.load_state_dict(model.text.transformer.state_dict())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("text.")}
    state.update({f"text.0.auto_model.{k}": v for k, v in encoder.state_dict().items()})
    state["text.2.linear.weight"] = model.text.proj.weight.detach().clone()
    assert "text.0.auto_model.shared.weight" in state and "text.0.auto_model.encoder.embed_tokens.weight" in state
    torch.save({"epoch": 1, "name": "clippy001", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path.read_bytes()


def test_clippy_file_loads_on_the_published_towers(tmp_path):
    text_tower = write_t5_tower(tmp_path / "t5")
    model = tiny_published(text_tower, seed=8)
    data = clippy_fork_file(model, tmp_path / "clippy_5k.pt")
    server = FileServer({"/v1.0/clippy_5k.pt": data})
    try:
        spec = entry(source=f"{server.url}/v1.0/clippy_5k.pt", format="clippy", vision_pool="max", text_pool="avg",
                     image_tower=IMAGE_TOWER, text_tower=str(text_tower))  # fmt: skip
        fetch_released("clippy-5k", spec, tmp_path / "clippy-5k")
    finally:
        server.close()
    loaded, transform, tokenizer = load_powerclip(pretrained=str(tmp_path / "clippy-5k"))
    same_embeddings(model, loaded, tokenizer)
    assert tokenizer(TEXTS).max() < model.text.config.vocab_size  # the T5 tokenizer, not CLIP's


def test_entries_are_checked():
    with pytest.raises(ValueError, match="set model"):
        check_entry("a", entry(source="https://example.org/a.pt"))
    with pytest.raises(ValueError, match="pinned by revision"):
        check_entry("b", entry(source="hf-hub:o/r", sha256="0" * 64))
    with pytest.raises(ValueError, match="vision_pool max, text_pool avg"):
        check_entry("c", entry(source="https://example.org/c.pt", format="clippy"))
    check_entry("d", entry(source="hf-hub:o/r"))


# ------------------------------------------------------------------------------------------- workflow
@pytest.mark.slow
def test_released_targets_dry_run(tmp_path):
    """results/released/<name>/eval.csv: fetch_released, one eval_benchmark per benchmark, aggregate_run_eval."""
    import yaml

    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    benchmarks = len(config["evaluation"]["benchmarks"])
    targets = [f"results/released/{name}/eval.csv" for name in ("clip-pgs-0.3", "clippy-5k", "powerclip-vit-b-16-cc12m")]
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO_ROOT / "Snakefile"), "-n", "--cores", "2",
         "--configfile", str(REPO_ROOT / "config" / "config.yaml"), "--directory", str(tmp_path), *targets],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    counts = {p[0]: int(p[1]) for p in (line.split() for line in proc.stdout.splitlines()) if len(p) == 2 and p[1].isdigit()}
    assert counts["fetch_released"] == 3 and counts["eval_benchmark"] == 3 * benchmarks
    assert counts["aggregate_run_eval"] == 3 and "train" not in counts
    assert "resources/released/clippy-5k" in proc.stdout and "wildcards: kind=released, run=clip-pgs-0.3" in proc.stdout
