"""``clip``: CLIP's symmetric InfoNCE on the pooled global features (open_clip's ``ClipLoss``), nothing
else; with the run table's pooling (avg in both towers by default, cls/argmax for stock OpenCLIP).
See docs/method.md ("clip")."""

from __future__ import annotations

import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor, nn

from powerclip.methods.base import TrainingMethod
from powerclip.model import forward_features


class ClipMethod(TrainingMethod):
    metric_names = ("contrastive_loss",)

    def __init__(self, model: nn.Module, loss: ClipLoss) -> None:
        super().__init__(model)
        self.loss = loss

    @classmethod
    def from_args(cls, model, args, rank=0, world_size=1):
        return cls(
            model,
            ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, rank=rank, world_size=world_size),
        )

    def forward(self, batch: dict) -> dict[str, Tensor]:
        out = forward_features(self.model, batch["image"], batch["text"])
        image, text = F.normalize(out["image_features"], dim=-1), F.normalize(out["text_features"], dim=-1)
        loss = self.loss(image, text, out["logit_scale"])
        return {"loss": loss, "contrastive_loss": loss, "logit_scale": out["logit_scale"]}
