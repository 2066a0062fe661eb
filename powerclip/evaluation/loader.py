"""Models for clip-benchmark: our checkpoints with their recorded pooling, released OpenCLIP weights with avg.

:func:`load_powerclip` is a clip-benchmark loader (``(model, transform, tokenizer)`` from ``model_name``,
``pretrained``, ``cache_dir``, ``device``):

* one of our checkpoints (``powerclip_cfg`` inside, see docs/formats.md) is rebuilt by
  :func:`powerclip.model.load_model` with the config and pools it was trained with (an ablation stays one);
* a released checkpoint fetched by rule ``fetch_released`` (a folder with ``released.json``) is rebuilt by
  :func:`powerclip.evaluation.released.load_released` with the format and pooling its config entry records
  (stock CLIP pooling for CLIP-PGS, avg for PowerCLIP, max/avg on the published towers for CLIPpy);
* released OpenCLIP-format weights (a file: a state_dict or ``{"state_dict": ...}``; an open_clip pretrained
  tag; or an ``hf-hub:``/``local-dir:`` id such as ``hf-hub:KMasaki/PowerCLIP-ViT-B-16-CC12M``) are loaded
  by :func:`powerclip.model.load_openclip_checkpoint` with avg pooling in both towers, as the official
  PowerCLIP README prescribes (docs/method.md).

Nothing read from a file runs code: every checkpoint is opened with ``torch.load(weights_only=True)`` (open_clip
reads released files with the same setting), and a file that would need a full unpickler is refused with
:class:`UnsafeCheckpointError`. :func:`register_loaders` adds the loader to clip-benchmark's registry as
``--model_type powerclip``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from powerclip.evaluation.released import is_released, load_released, read_descriptor
from powerclip.safe_load import UnsafeCheckpointError, read_checkpoint  # noqa: F401  (re-exported)
from powerclip.model import (
    install_pools,
    load_model,
    load_openclip_checkpoint,
    register_model_configs,
    set_pools,
    unwrap_model,
)

log = logging.getLogger(__name__)

MODEL_TYPE = "powerclip"
SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")
_LOCK = threading.Lock()


def eval_transform(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    """open_clip's evaluation transform for the model's own preprocessing config (size, mean, std, ...)."""
    visual = unwrap_model(model).visual
    cfg = getattr(visual, "preprocess_cfg", None) or {"size": visual.image_size}
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def is_powerclip_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "powerclip_cfg" in obj and "state_dict" in obj


def _weights_file(pretrained: str | None) -> bool:
    """A local file torch.load reads (safetensors files are read by open_clip with the safetensors library)."""
    return bool(pretrained) and os.path.isfile(pretrained) and not pretrained.endswith(".safetensors")


def checkpoint_model_name(pretrained: str | os.PathLike[str]) -> str | None:
    """The architecture to pass as ``model_name``: recorded in our checkpoints and in a released folder's
    descriptor, the id itself for hf-hub / local-dir ids, None for released weight files (their architecture
    must be given)."""
    pretrained = str(pretrained)
    if is_released(pretrained):
        return read_descriptor(pretrained)["model"]
    if pretrained.startswith(SCHEMA_PREFIXES):
        return pretrained
    if not _weights_file(pretrained):
        return None
    obj = read_checkpoint(pretrained)
    return obj["powerclip_cfg"]["model_name"] if is_powerclip_checkpoint(obj) else None


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """Hide open_clip's "Model initialized randomly" while rebuilding a checkpoint whose weights follow."""
    root = logging.getLogger()
    flt = _DropMessage("initialized randomly")
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def load_powerclip(
    model_name: str | None = None,
    pretrained: str | None = None,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Callable[[Any], torch.Tensor], Callable[..., torch.Tensor]]:
    """clip-benchmark loader: ``(model.eval(), eval transform, tokenizer)``.

    * ``pretrained`` is one of our checkpoints (has ``powerclip_cfg``): rebuilt by ``load_model`` with the
      recorded config and pools; ``model_name`` is only checked against the recorded one.
    * ``pretrained`` is a released folder (``released.json``, rule ``fetch_released``): rebuilt with the
      format and pools it records; ``model_name`` is informational.
    * ``pretrained`` (or ``model_name`` when ``pretrained`` is empty) is an ``hf-hub:`` / ``local-dir:`` id:
      open_clip builds config and weights from it; pools forced to avg.
    * otherwise released OpenCLIP weights (a file: plain state_dict or ``{"state_dict": ...}``; or an open_clip
      pretrained tag) for the architecture ``model_name``; pools forced to avg.
    """
    register_model_configs()
    install_pools()
    pretrained = str(pretrained) if pretrained else None
    hub_id = next((s for s in (pretrained, model_name) if s and s.startswith(SCHEMA_PREFIXES)), None)
    # every local weights file is read here first, with weights_only=True, even when open_clip loads it
    checkpoint = read_checkpoint(pretrained) if hub_id is None and _weights_file(pretrained) else None
    if is_released(pretrained):
        with _quiet_random_init_warning():
            model, name = load_released(pretrained)
        return _ready(model, name, device, cache_dir, hub_id=True)
    if is_powerclip_checkpoint(checkpoint):
        cfg = checkpoint["powerclip_cfg"]
        name = cfg["model_name"]
        if model_name and model_name != name:
            log.warning("%s was trained as %r; ignoring model name %r", pretrained, name, model_name)
        with _quiet_random_init_warning():
            model = load_model(checkpoint)
        log.info(
            "rebuilt %s from %s (vision_pool=%s, text_pool=%s)", name, pretrained, cfg["vision_pool"], cfg["text_pool"]
        )
    else:
        del checkpoint  # open_clip reads the file itself (and handles 'state_dict' / 'module.' keys)
        if hub_id is not None:
            # open_clip ignores `pretrained` for schema names: config and weights both come from the id
            name, weights = hub_id, None
        elif model_name:
            name, weights = model_name, pretrained
        else:
            raise ValueError(f"{pretrained}: released OpenCLIP weights need the architecture (model_name)")
        kwargs = {"cache_dir": cache_dir} if cache_dir else {}
        model = load_openclip_checkpoint(name, pretrained=weights, **kwargs)
        # create_model set avg already; repeated so the README's rule (avg in both towers) is explicit here
        set_pools(model, "avg", "avg")
        log.info("loaded %s (weights %s) with avg pooling forced in both towers", name, weights or name)
    return _ready(model, name, device, cache_dir, hub_id=hub_id is not None)


def _ready(model: nn.Module, name: str, device, cache_dir: str | None, hub_id: bool):
    """``(model on device in eval mode, its eval transform, the tokenizer of config ``name``)``."""
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir) if hub_id else open_clip.get_tokenizer(name)
    return model, eval_transform(model), tokenizer


def register_loaders() -> None:
    """Register :func:`load_powerclip` as clip-benchmark's ``powerclip`` model type (idempotent).

    ``clip_benchmark.models.load_clip`` looks loaders up in ``TYPE2FUNC`` and checks the name against
    ``MODEL_TYPES`` (a list built at import, also the CLI's ``--model_type`` choices): both get the entry.
    """
    import clip_benchmark.models as cbm

    with _LOCK:
        cbm.TYPE2FUNC[MODEL_TYPE] = load_powerclip
        if MODEL_TYPE not in cbm.MODEL_TYPES:
            cbm.MODEL_TYPES.append(MODEL_TYPE)


__all__ = [
    "MODEL_TYPE",
    "UnsafeCheckpointError",
    "checkpoint_model_name",
    "eval_transform",
    "is_powerclip_checkpoint",
    "load_powerclip",
    "read_checkpoint",
    "register_loaders",
]
