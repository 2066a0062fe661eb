"""What the token-dropping methods (``flip``, ``clip-pgs``) share: CLIP's contrastive loss on the pooled
global features of the towers' own forward passes, with an image encoder that sees only some patch tokens
in training, and random draws seeded by the run's seed.

Token features (powerclip.model.forward_features) are not used: under token dropping they are not defined
on the patch grid. Evaluation sees every token (the subclass's ``encode_image`` is the stock one in eval
mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from powerclip.methods.clip import ClipMethod

# Seeds of different ranks never coincide for any run seed below this.
_RANK_STRIDE = 1 << 16


def seed_draws(seed: int, rank: int) -> None:
    """Seed the global torch generators (CPU and CUDA), which open_clip's PatchDropout and clip-pgs draw
    from, with the run's seed and the rank: a run's masks follow its seed, each rank draws its own, and
    powerclip.train's resume file restores the stream."""
    torch.manual_seed(seed * _RANK_STRIDE + rank)


class TokenDropMethod(ClipMethod):
    """ClipLoss on ``encode_image`` (which drops tokens in training) and ``model.encode_text``; logs the
    fraction of patch tokens that did not reach the image transformer (``mask_ratio``)."""

    metric_names = ("contrastive_loss", "mask_ratio")

    @classmethod
    def from_args(cls, model, args, rank=0, world_size=1):
        seed_draws(args.seed, rank)
        method = super().from_args(model, args, rank=rank, world_size=world_size)
        method.configure(args)
        return method

    def configure(self, args) -> None:
        """Read the method's own options (its run-table columns) from the trainer's arguments; the model's
        own options (FLIP's patch dropout) are in the model already."""

    def encode_image(self, images: Tensor) -> tuple[Tensor, float]:
        """Pooled image features (B, D) and the fraction of patch tokens dropped (0 in eval mode)."""
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, Tensor]:
        image, mask_ratio = self.encode_image(batch["image"])
        text = self.model.encode_text(batch["text"])
        logit_scale = self.model.logit_scale.exp()
        loss = self.loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), logit_scale)
        return {
            "loss": loss,
            "contrastive_loss": loss,
            "mask_ratio": torch.tensor(float(mask_ratio)),
            "logit_scale": logit_scale,
        }
