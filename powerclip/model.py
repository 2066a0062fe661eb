"""OpenCLIP models with PowerCLIP pooling, token features in the joint space, and checkpoints.

PowerCLIP trains stock OpenCLIP towers with **average pooling in both towers** (the official README: load
its models with avg pooling). Our formulation (docs/method.md) pools global, region and phrase
features on the *same* path: the global image feature is the mean of the projected patch tokens, a region
feature is the mean over the region's patch cells; the global text feature is the mean of the projected token
states over the caption's real tokens (SOT..EOT, never padding), a phrase feature the mean over the phrase's
token positions. This module provides:

* ``register_model_configs`` / ``create_model``: open_clip models (tiny configs shipped in
  ``powerclip/model_configs``, or any open_clip config such as ``ViT-B-16``) with the pools set;
* text average pooling *without forking open_clip*: a wrapper around ``text_global_pool`` (looked up as a
  module global by ``CLIP.encode_text`` and ``TextTransformer.forward``) that handles ``pool_type == "avg"``
  and delegates every other pool type to the original;
* ``encode_image_tokens`` / ``encode_text_tokens`` / ``forward_features``: pooled features plus the per-token
  features they are pooled from, in one forward pass; ``gather_mean`` turns index sets (patch cells,
  token positions) into region / phrase features;
* ``save_checkpoint`` / ``load_model`` / ``load_openclip_checkpoint``: checkpoints that rebuild with their
  pools, and released OpenCLIP-format weights loaded with forced pools.

Unsupported towers are refused with ``NotImplementedError`` instead of silently pooling on a different path:
timm / ResNet / HF towers, attentional pooling, ``final_ln_after_pool`` (the norm would have to be applied
to every region/phrase mean), patch dropout (it reorders/drops patch tokens, so region cell indices no
longer match), CoCa-style text CLS tokens, and text avg pooling with a non-CLIP tokenizer (pad id != 0).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import open_clip
import open_clip.model as oc_model
import open_clip.transformer as oc_transformer
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

# ours -> open_clip VisionTransformer.pool_type ("max" is added by install_pools, like text "avg")
VISION_POOLS: dict[str, str] = {"avg": "avg", "cls": "tok", "max": "max"}
TEXT_POOLS: dict[str, str] = {"avg": "avg", "argmax": "argmax"}  # ours -> open_clip text pool_type
# Both towers "native": the pooling the model's own config gives it, untouched (a released model evaluated as
# its authors pool it, e.g. CLIPS: avg with a norm after pooling, the last text token). Such a model has no
# region or phrase features (encode_image_tokens / encode_text_tokens still refuse what they cannot pool).
NATIVE_POOL = "native"

# open_clip's SimpleTokenizer pads with 0; SOT (49406) and EOT (49407) are real tokens and are averaged.
PAD_TOKEN_ID = 0
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407

_LOCK = threading.Lock()
_CONFIGS_REGISTERED = False
# where configs recovered from checkpoints are written (lives as long as the process)
_SAVED_CONFIG_DIR: Path | None = None


# --------------------------------------------------------------------------------------------- configs
def register_model_configs() -> list[str]:
    """Register ``powerclip/model_configs/*.json`` with open_clip (idempotent); return the names added."""
    global _CONFIGS_REGISTERED
    names = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
    if not names:
        # A non-editable install without package data lands here; the configs must ship with the package.
        raise FileNotFoundError(
            f"no model configs in {MODEL_CONFIG_DIR}: install powerclip with its package data "
            "(powerclip/model_configs/*.json)"
        )
    with _LOCK:
        known = set(open_clip.list_models())
        if not (_CONFIGS_REGISTERED and all(n in known for n in names)):
            # add_model_config appends the path and rescans every registered path; doing it once keeps the
            # path list from growing each time a model is created.
            open_clip.add_model_config(MODEL_CONFIG_DIR)
            _CONFIGS_REGISTERED = True
            log.debug("registered model configs %s from %s", names, MODEL_CONFIG_DIR)
    return names


def _register_saved_config(model_name: str, model_cfg: Mapping[str, Any]) -> None:
    """Make a config recovered from a checkpoint available to open_clip under its original name."""
    global _SAVED_CONFIG_DIR
    with _LOCK:
        if _SAVED_CONFIG_DIR is None:
            _SAVED_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="powerclip-configs-"))
        path = _SAVED_CONFIG_DIR / f"{model_name.replace('/', '-')}.json"
        path.write_text(json.dumps(model_cfg, indent=2))
    # open_clip registers a config under its file stem; a single-file path keeps other names untouched.
    open_clip.add_model_config(path)
    log.warning("model config %r is not registered; rebuilt it from the checkpoint's copy", model_name)


# ----------------------------------------------------------------------------- text average pooling
def masked_token_mean(x: torch.Tensor, text: torch.Tensor, pad_id: int = PAD_TOKEN_ID) -> torch.Tensor:
    """Mean of ``x`` (B, L, C) over the positions where ``text != pad_id`` (SOT..EOT inclusive)."""
    keep = (text != pad_id).unsqueeze(-1)
    # where() instead of a multiply: whatever sits at padded positions can never leak, not even a NaN.
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)
    count = keep.sum(dim=1).clamp_min(1).to(total.dtype)
    return total / count


def _avg_pool_wrapper(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(original)
    def text_global_pool(
        x: torch.Tensor,
        text: torch.Tensor | None = None,
        pool_type: str = "argmax",
        eos_token_id: int | None = None,
    ) -> torch.Tensor:
        if pool_type == "avg":
            if text is None:
                raise ValueError("text avg pooling needs the token ids to mask padding")
            return masked_token_mean(x, text)
        return original(x, text, pool_type=pool_type, eos_token_id=eos_token_id)

    text_global_pool._powerclip_avg = True  # type: ignore[attr-defined]  # marks our wrapper (idempotency)
    return text_global_pool


def _max_pool_wrapper(original: Callable[..., tuple[torch.Tensor, torch.Tensor]]):
    @functools.wraps(original)
    def _global_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool_type == "max":  # CLIPpy's image pooling: the maximum over the patch tokens (no CLS)
            return x[:, 1:].amax(dim=1), x[:, 1:]
        return original(self, x)

    _global_pool._powerclip_max = True  # type: ignore[attr-defined]
    return _global_pool


def install_pools() -> None:
    """Add the pool types open_clip lacks, without forking it (idempotent): text ``"avg"`` (see
    :func:`install_text_avg_pool`) and vision ``"max"``, by wrapping ``VisionTransformer._global_pool``,
    which ``VisionTransformer._pool`` calls after ``ln_post``."""
    install_text_avg_pool()
    with _LOCK:
        current = oc_transformer.VisionTransformer._global_pool
        if not getattr(current, "_powerclip_max", False):
            oc_transformer.VisionTransformer._global_pool = _max_pool_wrapper(current)


def install_text_avg_pool() -> None:
    """Wrap ``text_global_pool`` in ``open_clip.transformer`` and ``open_clip.model`` once (idempotent).

    ``CLIP.encode_text`` and ``TextTransformer.forward`` look the function up as a module global at call
    time, so replacing the global adds the ``"avg"`` pool type to every model without forking open_clip.
    """
    with _LOCK:
        wrappers: dict[int, Callable[..., torch.Tensor]] = {}
        for module in (oc_transformer, oc_model):
            current = module.text_global_pool
            if getattr(current, "_powerclip_avg", False):
                continue
            # one wrapper per distinct original, so both modules share the same function object
            wrapper = wrappers.setdefault(id(current), _avg_pool_wrapper(current))
            module.text_global_pool = wrapper
            log.debug("installed text avg pooling in %s", module.__name__)


# ------------------------------------------------------------------------------------- model building
def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare open_clip model inside DDP / DataParallel / torch.compile / a training method."""
    while True:
        if getattr(model, "wraps_model", False):  # a training method (powerclip.methods.base.TrainingMethod)
            model = model.model
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _text_tower_kind(model: nn.Module) -> str:
    """'clip' (text modules on the CLIP object) or 'custom' (a ``TextTransformer`` in ``model.text``)."""
    if isinstance(model, oc_model.CLIP):
        return "clip"
    if isinstance(getattr(model, "text", None), oc_transformer.TextTransformer) and not hasattr(
        model, "text_decoder"
    ):
        return "custom"
    raise NotImplementedError(
        f"{type(model).__name__} is not supported: need open_clip CLIP or CustomTextCLIP with a "
        "TextTransformer text tower (HF text towers and CoCa are not supported)"
    )


def _check_vision_tower(visual: nn.Module) -> None:
    if not isinstance(visual, oc_transformer.VisionTransformer):
        raise NotImplementedError(
            f"vision tower {type(visual).__name__} is not supported: patch tokens are defined for open_clip's "
            "VisionTransformer only (not timm / ModifiedResNet towers)"
        )
    if visual.attn_pool is not None:
        raise NotImplementedError("attentional pooling is not supported: its outputs are not patch tokens")
    if visual.final_ln_after_pool:
        raise NotImplementedError(
            "final_ln_after_pool=True is not supported: docs/method.md requires the norm after pooling to be "
            "applied to every region mean exactly as to the global mean, which gather_mean does not do; "
            "use a config with final_ln_after_pool=False"
        )


def _check_all_patch_tokens(visual: nn.Module) -> None:
    """Token features need every patch token in grid order: refuse active patch dropout (FLIP's training)."""
    if visual.training and getattr(visual.patch_dropout, "prob", 0.0) > 0:
        raise NotImplementedError(
            "patch tokens are not defined under active patch dropout: it drops tokens, so region cell indices "
            "would no longer address the right patches (patch dropout is inactive in eval mode)"
        )


def _check_text_tower(model: nn.Module, model_cfg: Mapping[str, Any] | None, text_pool: str) -> None:
    kind = _text_tower_kind(model)
    if kind == "custom" and model.text.cls_emb is not None:
        raise NotImplementedError("text towers with an appended CLS token (CoCa style) are not supported")
    if text_pool != "avg":
        return
    text_cfg = (model_cfg or {}).get("text_cfg", {})
    pad_id = model.text.pad_id if kind == "custom" else text_cfg.get("pad_id", PAD_TOKEN_ID)
    if pad_id != PAD_TOKEN_ID or text_cfg.get("hf_tokenizer_name"):
        raise NotImplementedError(
            f"text avg pooling masks token id {PAD_TOKEN_ID} (open_clip SimpleTokenizer padding); this model "
            f"uses pad_id={pad_id} / tokenizer {text_cfg.get('hf_tokenizer_name')!r}"
        )


def set_pools(model: nn.Module, vision_pool: str = "avg", text_pool: str = "avg") -> nn.Module:
    """Set the pooling of both towers in place (plain attributes; no parameters change)."""
    if (vision_pool, text_pool) == (NATIVE_POOL, NATIVE_POOL):
        return unwrap_model(model)
    if vision_pool not in VISION_POOLS:
        raise ValueError(f"vision_pool must be one of {sorted(VISION_POOLS)}, got {vision_pool!r}")
    if text_pool not in TEXT_POOLS:
        raise ValueError(f"text_pool must be one of {sorted(TEXT_POOLS)}, got {text_pool!r}")
    model = unwrap_model(model)
    if not isinstance(model.visual, oc_transformer.VisionTransformer):
        from powerclip.towers import set_tower_pools  # a timm ViT + HF text tower (clippy's published)

        return set_tower_pools(model, vision_pool, text_pool)
    install_pools()
    model.visual.pool_type = VISION_POOLS[vision_pool]
    if _text_tower_kind(model) == "clip":
        model.text_pool_type = TEXT_POOLS[text_pool]
    else:
        # TextTransformer.__init__ asserts pool_type in ('first', 'last', 'argmax', 'eos', 'none'); the
        # attribute itself is only read in forward, so "avg" is set after construction.
        model.text.pool_type = TEXT_POOLS[text_pool]
    return model


def create_model(
    model_name: str,
    vision_pool: str = "avg",
    text_pool: str = "avg",
    pretrained: str | None = None,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    **model_kwargs: Any,
) -> nn.Module:
    """Build an open_clip model (random init unless ``pretrained``) and set PowerCLIP pooling.

    ``model_kwargs`` go to ``open_clip.create_model`` (e.g. ``precision``, ``force_image_size`` or model
    constructor overrides). ``seed`` seeds the initialisation inside ``fork_rng`` so it is reproducible
    without disturbing the caller's RNG stream. The pools and the config are recorded in
    ``model.powerclip_cfg`` so ``save_checkpoint``/``load_model`` can rebuild the model.
    """
    native = (vision_pool, text_pool) == (NATIVE_POOL, NATIVE_POOL)
    if not native and vision_pool not in VISION_POOLS:
        raise ValueError(f"vision_pool must be one of {sorted(VISION_POOLS)}, got {vision_pool!r}")
    if not native and text_pool not in TEXT_POOLS:
        raise ValueError(f"text_pool must be one of {sorted(TEXT_POOLS)}, got {text_pool!r}")
    register_model_configs()
    install_pools()
    model_cfg = open_clip.get_model_config(model_name)
    if (model_cfg or {}).get("text_cfg", {}).get("hf_model_name"):
        from powerclip.towers import install_t5_text_tower  # open_clip's HF adapter lacks T5

        install_t5_text_tower()

    def build() -> nn.Module:
        # released weights are read with weights_only=True: a pickle that would run code is refused
        safe = {"weights_only": True} if pretrained else {}
        return open_clip.create_model(model_name, pretrained=pretrained, device=device, **safe, **model_kwargs)

    if seed is None:
        model = build()
    else:
        # open_clip builds on the CPU and moves afterwards, so the CPU generator drives all of the init.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build()

    if isinstance(model.visual, oc_transformer.VisionTransformer) and not native:  # set_pools checks the others
        _check_vision_tower(model.visual)
        _check_text_tower(model, model_cfg, text_pool)
    set_pools(model, vision_pool, text_pool)
    model.powerclip_cfg = {
        "model_name": model_name,
        "vision_pool": vision_pool,
        "text_pool": text_pool,
        "model_cfg": model_cfg,
        "create_kwargs": dict(model_kwargs),
        "pretrained": pretrained,
        "seed": seed,
        "open_clip_version": open_clip.__version__,
    }
    log.info(
        "built %s (%s params; vision_pool=%s, text_pool=%s, pretrained=%s)",
        model_name,
        f"{sum(p.numel() for p in model.parameters()):,}",
        vision_pool,
        text_pool,
        pretrained,
    )
    return model


# ----------------------------------------------------------------------------------- token features
def _project(x: torch.Tensor, projection: nn.Module | torch.Tensor | None) -> torch.Tensor:
    if projection is None:
        return x
    if isinstance(projection, nn.Linear):
        return projection(x)
    return x @ projection


def encode_image_tokens(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled image features (B, D) and projected patch tokens (B, N, D), N = grid², no CLS; one pass.

    Mirrors ``VisionTransformer.forward`` with the tower's own submodules (so grad checkpointing, autocast
    and the configured pool apply unchanged) but keeps the tokens, which ``forward`` discards unless the
    module was built with ``output_tokens``. Both outputs are unnormalised; with avg pooling
    ``pooled == patch_tokens.mean(1) == model.encode_image(images)``.

    Call this on the bare model; under DDP the training method (powerclip.methods) calls it inside its own
    forward, so the pass goes through the DDP wrapper.
    """
    visual = model.visual
    if not isinstance(visual, oc_transformer.VisionTransformer):
        from powerclip.towers import timm_image_tokens  # clippy's published image tower

        return timm_image_tokens(model, images)
    _check_vision_tower(visual)
    _check_all_patch_tokens(visual)
    x = visual._embeds(images)
    x = visual.transformer(x)
    pooled, tokens = visual._pool(x)  # ln_post is applied to all tokens before pooling (checked above)
    pooled = _project(pooled, visual.proj)
    tokens = _project(tokens, visual.proj)
    grid = visual.grid_size[0] * visual.grid_size[1]
    if tokens.shape[1] != grid:
        raise RuntimeError(f"expected {grid} patch tokens, got {tokens.shape[1]} (input size mismatch?)")
    return pooled, tokens


def encode_text_tokens(model: nn.Module, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled text features (B, D) and projected token states (B, L, D) after ln_final; one pass.

    Mirrors ``CLIP.encode_text`` / ``TextTransformer.forward`` and pools with the (wrapped) module-global
    ``text_global_pool``, so ``pooled == model.encode_text(text)``; with avg pooling it is also the mean of
    ``token_states`` over ``text != 0``.
    """
    kind = _text_tower_kind(model)
    if kind == "clip":
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(text).to(cast_dtype)
        x = x + model.positional_embedding.to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        # looked up at call time so the avg wrapper (installed in open_clip.model) is the one used
        pooled = oc_model.text_global_pool(
            x, text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
        )
        projection = model.text_projection
    else:
        tower = model.text
        if tower.cls_emb is not None:
            raise NotImplementedError("text towers with an appended CLS token (CoCa style) are not supported")
        x, attn_mask = tower._embeds(text)
        x = tower.transformer(x, attn_mask=attn_mask)
        x = tower.ln_final(x)
        pooled = oc_transformer.text_global_pool(
            x, text, pool_type=tower.pool_type, eos_token_id=getattr(tower, "eos_id", None)
        )
        projection = tower.text_projection
    return _project(pooled, projection), _project(x, projection)


def gather_mean(
    tokens: torch.Tensor, index: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``tokens[b, index[b, k, c]]`` over the ``c`` where ``mask[b, k, c]``.

    tokens (B, N, D); index (B, K, C) long; mask (B, K, C) bool. Returns features (B, K, D) and
    valid = mask.any(-1) (B, K). Rows without any selected entry are exactly 0 with zero gradient; entries
    where mask is False may hold any index (e.g. -1 padding). Repeated indices count as often as they occur.
    The caller L2-normalises. This is the one pooling path for region features (index = patch cells) and
    phrase features (index = token positions); all cells / all of SOT..EOT reproduce the global avg pool.
    """
    if (
        tokens.dim() != 3
        or index.dim() != 3
        or index.shape != mask.shape
        or index.shape[0] != tokens.shape[0]
    ):
        raise ValueError(
            f"gather_mean expects tokens (B, N, D) and index/mask (B, K, C); got {tuple(tokens.shape)}, "
            f"{tuple(index.shape)}, {tuple(mask.shape)}"
        )
    batch, num_tokens, _ = tokens.shape
    mask = mask.to(torch.bool)
    out_of_range = mask & ((index < 0) | (index >= num_tokens))
    if bool(out_of_range.any()):
        where = out_of_range.nonzero()[:5].tolist()
        raise IndexError(
            f"gather_mean: index outside [0, {num_tokens}) where mask is True, at (b, k, c) {where}"
        )
    safe_index = torch.where(mask, index, torch.zeros_like(index)).long()
    count = mask.sum(dim=-1)  # (B, K)
    # A (B, K, N) averaging matrix and one bmm instead of materialising the (B, K, C, D) gathered tokens:
    # a region may cover all N=196 cells, and B*K*C*D activations (kept for backward) cost far more
    # memory than B*K*N weights. Built in float32 so 1/count is exact-ish even when tokens are bf16.
    weights = torch.zeros(batch, index.shape[1], num_tokens, dtype=torch.float32, device=tokens.device)
    weights.scatter_add_(2, safe_index, mask.to(torch.float32))
    weights = weights / count.clamp_min(1).unsqueeze(-1).to(torch.float32)
    features = torch.bmm(weights.to(tokens.dtype), tokens)
    return features, count > 0


def region_phrase_features(out: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """L2-normalised region and phrase features with their validity masks, from ``forward_features``'
    token features and a batch's index sets (powerclip.data). The one pooling path for region and phrase
    features: training, the pictures and the benchmarks all call it."""
    regions, region_mask = gather_mean(out["patch_tokens"], batch["region_index"], batch["region_cells"])
    phrases, phrase_mask = gather_mean(out["token_states"], batch["phrase_index"], batch["phrase_tokens"])
    return {
        "region_features": F.normalize(regions, dim=-1),
        "region_mask": region_mask,
        "phrase_features": F.normalize(phrases, dim=-1),
        "phrase_mask": phrase_mask,
    }


def forward_features(model: nn.Module, images: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unnormalised global features, the token features they pool, and ``logit_scale.exp()``."""
    image_features, patch_tokens = encode_image_tokens(model, images)
    text_features, token_states = encode_text_tokens(model, text)
    out = {
        "image_features": image_features,
        "text_features": text_features,
        "patch_tokens": patch_tokens,
        "token_states": token_states,
        "logit_scale": model.logit_scale.exp(),
    }
    if getattr(model, "logit_bias", None) is not None:
        out["logit_bias"] = model.logit_bias
    return out


# ------------------------------------------------------------------------------------------ checkpoints
def _strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, **extra: Any) -> Path:
    """Atomically write ``{"powerclip_cfg", "state_dict", **extra}`` (powerclip.shards.atomic_output)."""
    bare = unwrap_model(model)
    cfg = getattr(bare, "powerclip_cfg", None)
    if cfg is None:
        raise ValueError("model has no powerclip_cfg: build it with powerclip.model.create_model")
    clash = {"powerclip_cfg", "state_dict"} & set(extra)
    if clash:
        raise ValueError(f"save_checkpoint: extra keys {sorted(clash)} are reserved")
    from powerclip.shards import atomic_output

    path = Path(path)
    # Modules a training method adds for training only (CLIPS's captioner) stay out: the checkpoint is the
    # two towers that load_model rebuilds (resume checkpoints, written elsewhere, keep them).
    skip = tuple(f"{name}." for name in getattr(bare, "training_only_modules", ()))
    state = {k: v for k, v in bare.state_dict().items() if not k.startswith(skip)}
    payload = {"powerclip_cfg": copy.deepcopy(cfg), "state_dict": state, **extra}
    with atomic_output(path) as tmp, tmp.open("wb") as f:  # readers never see a partial file
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    log.info("saved checkpoint %s", path)
    return path


def load_model(
    path_or_dict: str | os.PathLike[str] | Mapping[str, Any],
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a model saved by ``save_checkpoint`` (same config and pools) and load its weights strictly.

    The file is read with ``weights_only=True``: a pickle that would run code is refused."""
    if isinstance(path_or_dict, Mapping):
        checkpoint, source = path_or_dict, "<dict>"
    else:
        source = str(path_or_dict)
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    if (
        not isinstance(checkpoint, Mapping)
        or "powerclip_cfg" not in checkpoint
        or "state_dict" not in checkpoint
    ):
        raise KeyError(
            f"{source}: not a powerclip checkpoint (needs 'powerclip_cfg' and 'state_dict'); for released "
            "OpenCLIP-format weights use load_openclip_checkpoint(model_name, path)"
        )
    cfg = checkpoint["powerclip_cfg"]
    register_model_configs()
    name, saved_cfg = cfg["model_name"], cfg.get("model_cfg")
    if open_clip.get_model_config(name) is None and saved_cfg is not None:
        _register_saved_config(name, saved_cfg)
    # Never re-fetch `pretrained`: the checkpoint's own weights replace them anyway.
    model = create_model(
        name, vision_pool=cfg["vision_pool"], text_pool=cfg["text_pool"], **cfg.get("create_kwargs", {})
    )
    if saved_cfg is not None and model.powerclip_cfg["model_cfg"] != saved_cfg:
        log.warning("%s: registered config of %r differs from the checkpoint's copy", source, name)
    model.load_state_dict(_strip_module_prefix(checkpoint["state_dict"]), strict=True)
    model.powerclip_cfg = copy.deepcopy(dict(cfg))
    return model.to(device)


def load_openclip_checkpoint(
    model_name: str,
    pretrained: str,
    vision_pool: str = "avg",
    text_pool: str = "avg",
    device: str | torch.device = "cpu",
    **model_kwargs: Any,
) -> nn.Module:
    """Load released OpenCLIP-format weights (a file or an open_clip tag) with forced pools.

    The file may be a plain state_dict or ``{"state_dict": ...}`` (``module.`` prefixes are stripped by
    open_clip's loader, strictly). The official PowerCLIP README loads its models with avg pooling in both
    towers, which is the default here.
    """
    return create_model(
        model_name,
        vision_pool=vision_pool,
        text_pool=text_pool,
        pretrained=pretrained,
        device=device,
        **model_kwargs,
    )


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total / vision / text parameter counts (text = everything outside ``visual`` and logit params)."""
    model = unwrap_model(model)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.visual.parameters())
    logit = sum(p.numel() for n, p in model.named_parameters() if n.startswith("logit_"))
    return {"total": total, "vision": vision, "text": total - vision - logit}


__all__ = [
    "EOT_TOKEN_ID",
    "MODEL_CONFIG_DIR",
    "PAD_TOKEN_ID",
    "SOT_TOKEN_ID",
    "count_parameters",
    "create_model",
    "encode_image_tokens",
    "encode_text_tokens",
    "forward_features",
    "gather_mean",
    "install_pools",
    "install_text_avg_pool",
    "load_model",
    "load_openclip_checkpoint",
    "masked_token_mean",
    "region_phrase_features",
    "register_model_configs",
    "save_checkpoint",
    "set_pools",
    "unwrap_model",
]
