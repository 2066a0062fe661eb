"""Towers other than open_clip's own ViT and text transformer: clippy's published towers (a timm ViT through
open_clip's ``TimmModel`` and a Hugging Face T5 encoder through ``HFTextEncoder``), pooled as CLIPpy pools
them. ``powerclip.model`` calls these for such a model (pooling, patch tokens); ``powerclip.methods.clippy``
builds the towers. See docs/method.md ("clippy").
"""

from __future__ import annotations

from collections import OrderedDict

from open_clip.hf_model import HFTextEncoder, MeanPooler
from open_clip.timm_model import TimmModel
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH
from torch import Tensor, nn

# CLIPpy's pooling; a clippy row must ask for exactly these (run-table columns vision_pool, text_pool).
CLIPPY_POOLS = ("max", "avg")


class PatchMaxPool(nn.Module):
    """The maximum over the patch tokens of a timm ViT's token sequence (its prefix tokens, e.g. CLS, left
    out): CLIPpy's image pooling as its inference code applies it (``CustomViT``, ``image_pooling="gmp"``)."""

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens[:, self.num_prefix_tokens :].amax(dim=1)


def install_t5_text_tower() -> None:
    """open_clip's HF adapter knows mT5 but not T5 (its ``arch_dict`` has no ``"t5"``): T5 uses mT5's entry
    (same config attribute names). Idempotent."""
    from open_clip import hf_configs

    hf_configs.arch_dict.setdefault("t5", hf_configs.arch_dict["mt5"])


def set_tower_pools(model: nn.Module, vision_pool: str, text_pool: str) -> nn.Module:
    """Pooling of the published towers (called by powerclip.model.set_pools for a non-open_clip image tower).

    Only CLIPpy's pools exist here: ``max`` (a :class:`PatchMaxPool` as the ``TimmModel``'s head, which must be
    built without pooling or projection) and ``avg`` (the HF tower's ``mean_pooler``). Also gives the towers
    what the trainer reads from open_clip towers: ``visual.patch_size`` and a ``context_length`` (T5 has no
    maximum position, so open_clip sets 0). Anything else is refused with ``NotImplementedError``."""
    visual, text = model.visual, getattr(model, "text", None)
    if not isinstance(visual, TimmModel) or not isinstance(text, HFTextEncoder):
        raise NotImplementedError(
            f"towers {type(visual).__name__} / {type(text).__name__} are not supported: besides open_clip's own "
            "ViT and text transformer, only a timm ViT with an HF text tower (clippy's published towers) is"
        )
    if (vision_pool, text_pool) != CLIPPY_POOLS:
        raise NotImplementedError(
            f"a timm ViT with an HF text tower is pooled as CLIPpy pools it (vision_pool max, text_pool avg); got "
            f"vision_pool {vision_pool!r}, text_pool {text_pool!r}"
        )
    trunk = visual.trunk
    if not isinstance(getattr(visual.head, "pool", None), PatchMaxPool):
        if getattr(trunk, "global_pool", None) != "" or len(visual.head) or not hasattr(trunk, "patch_embed"):
            raise NotImplementedError(
                "max pooling needs a timm ViT built without its own pooling and projection (timm_pool '', "
                "timm_proj 'none')"
            )
        visual.head = nn.Sequential(OrderedDict(pool=PatchMaxPool(trunk.num_prefix_tokens)))
    if not isinstance(text.pooler, MeanPooler):
        raise NotImplementedError(f"text avg pooling needs the HF tower's mean_pooler, not {type(text.pooler).__name__}")
    visual.patch_size = trunk.patch_embed.patch_size
    if not text.context_length:  # T5: relative positions, no maximum; the tokenizer's context applies
        model.context_length = text.context_length = DEFAULT_CONTEXT_LENGTH
    return model


def timm_image_tokens(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Pooled image features (B, D) and the patch tokens they are pooled from (B, N, D) of the published image
    tower, in one pass: the trunk's tokens after its final norm, without the prefix tokens (no projection)."""
    visual = model.visual
    if not isinstance(visual, TimmModel) or not isinstance(getattr(visual.head, "pool", None), PatchMaxPool):
        raise NotImplementedError(
            f"patch tokens are defined for open_clip's VisionTransformer and clippy's published timm ViT, not for "
            f"{type(visual).__name__}"
        )
    tokens = visual.trunk.forward_features(images)
    patches = tokens[:, visual.trunk.num_prefix_tokens :]
    return visual.head(tokens), patches
