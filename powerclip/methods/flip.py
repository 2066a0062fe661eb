"""``flip``: CLIP trained on a random subset of each image's patch tokens (FLIP, Li et al., CVPR 2023), with
open_clip's own ``PatchDropout``: a uniformly random ``int(L·(1 − p))`` of the L patch tokens (at least 1)
and the CLS token reach the transformer; the others are removed from the sequence, so their compute is
saved. Training only: the module is inactive in eval mode, so evaluation sees every token. Nothing else
changes (ClipLoss, the run table's pooling). See docs/method.md ("flip")."""

from __future__ import annotations

from torch import Tensor

from powerclip.methods.token_drop import TokenDropMethod


def kept_patches(num_patches: int, prob: float) -> int:
    """Patch tokens open_clip's PatchDropout keeps: ``max(1, int(L·(1 − p)))``."""
    return max(1, int(num_patches * (1 - prob)))


class FlipMethod(TokenDropMethod):
    @classmethod
    def build_model(cls, args):
        """The run's model with ``force_patch_dropout = patch_dropout``, recorded in its ``powerclip_cfg``
        so that a checkpoint rebuilds with the same (eval-inactive) module."""
        from powerclip.model import create_model

        return create_model(
            args.model,
            vision_pool=args.vision_pool,
            text_pool=args.text_pool,
            seed=args.seed,
            force_patch_dropout=args.patch_dropout,
        )

    def encode_image(self, images: Tensor) -> tuple[Tensor, float]:
        visual = self.model.visual
        prob = getattr(visual.patch_dropout, "prob", 0.0)
        dropped = 0.0
        if visual.patch_dropout.training and prob > 0:
            num_patches = visual.grid_size[0] * visual.grid_size[1]
            dropped = 1 - kept_patches(num_patches, prob) / num_patches
        return self.model.encode_image(images), dropped
