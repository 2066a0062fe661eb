"""Training methods of the run table, by name.

Each method is one module with one class (a :class:`powerclip.methods.base.TrainingMethod`): it owns its
model's forward pass and pooling, what a batch must carry, and its loss; the training loop only steps.
This registry is importable with the standard library (the Snakefile checks run-table rows against it);
:func:`method_class` imports the implementation. Adding a method = one module + one entry here.
See docs/method.md ("Training methods of the run table").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


# Run-table columns every method reads (schemas/runs.schema.yaml); a method lists the further ones it reads.
COMMON_COLUMNS = ("method", "regions", "vision_pool", "text_pool", "seed")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    target: str  # "module:Class" of the implementation
    uses_regions: bool  # reads the phrases and regions sidecars (needs a region source and lambda > 0)
    summary: str
    columns: tuple[str, ...] = ()  # run-table columns it reads beyond COMMON_COLUMNS: its identity
    sidecars: tuple[str, ...] = ()  # further per-shard sidecars it reads (rules/common.smk: SIDECAR_FOLDERS)

    @property
    def identity_columns(self) -> tuple[str, ...]:
        """The columns that define a run of this method (changing another column does not retrain it)."""
        return COMMON_COLUMNS + self.columns


POWERCLIP_COLUMNS = ("sam_loss_ratio", "topk", "topk_random", "use_parse_phrases", "softplus_scoring",
                     "softplus_tau", "softplus_alpha")  # fmt: skip
CLIPS_COLUMNS = ("clips_text_reduction", "clips_text_tokens", "clips_caption_tokens", "clips_contrastive_weight",
                 "clips_caption_weight")  # fmt: skip
PGS_COLUMNS = ("pgs_min_mask_ratio", "pgs_seed_ratio", "pgs_threshold", "pgs_edge", "pgs_otn", "pgs_attention")

METHODS: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo("clip", "powerclip.methods.clip:ClipMethod", False, "CLIP's contrastive loss alone"),
        MethodInfo(
            "powerclip",
            "powerclip.methods.powerclip:PowerClipMethod",
            True,
            "CLIP + the powerset region-phrase alignment loss",
            POWERCLIP_COLUMNS,
        ),
        MethodInfo(
            "flip",
            "powerclip.methods.flip:FlipMethod",
            False,
            "CLIP on a random subset of the patch tokens in training (open_clip's patch dropout)",
            ("patch_dropout",),
        ),
        MethodInfo(
            "clip-pgs",
            "powerclip.methods.clip_pgs:ClipPgsMethod",
            False,
            "CLIP on the patch tokens left by CLIP-PGS's cluster masking (patch generation-to-selection)",
            PGS_COLUMNS,
        ),
        MethodInfo(
            "clips",
            "powerclip.methods.clips:ClipsMethod",
            False,
            "CLIP on sub-captions of synthetic captions + a captioner of the full synthetic caption (CLIPS)",
            CLIPS_COLUMNS,
            sidecars=("recaptions",),
        ),
        MethodInfo(
            "clippy",
            "powerclip.methods.clippy:ClippyMethod",
            False,
            "CLIP with CLIPpy's pooling (image max, text avg): the run's model, or DINO + Sentence-T5 towers",
            ("clippy_towers", "clippy_image_tower", "clippy_text_tower", "clippy_pretrained"),
        ),
    )
}


def method_class(name: str) -> type:
    """The implementation class of method ``name``."""
    try:
        info = METHODS[name]
    except KeyError:
        raise KeyError(f"unknown training method {name!r}; the registry has {sorted(METHODS)}") from None
    module, cls = info.target.split(":")
    return getattr(importlib.import_module(module), cls)
