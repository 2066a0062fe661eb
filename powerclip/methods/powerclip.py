"""``powerclip``: CLIP + lambda x the powerset region-phrase alignment loss (powerclip.loss) on region and
phrase features pooled exactly as the global ones (powerclip.model.region_phrase_features).
See docs/method.md ("The formulation")."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from powerclip.loss import PowerClipLoss
from powerclip.methods.base import TrainingMethod
from powerclip.model import forward_features, region_phrase_features


class PowerClipMethod(TrainingMethod):
    uses_regions = True
    metric_names = ("contrastive_loss", "local_loss", "local_skipped_pairs")

    def __init__(self, model: nn.Module, loss: PowerClipLoss) -> None:
        super().__init__(model)
        self.loss = loss

    @classmethod
    def from_args(cls, model, args, rank=0, world_size=1):
        loss = PowerClipLoss(
            sam_loss_ratio=args.sam_loss_ratio,
            topk=args.sam_regions_topk,
            tau=args.softplus_tau,
            alpha=args.softplus_alpha,
            softplus_scoring=args.softplus_scoring,
            local_loss=args.local_loss,
            gather_with_grad=args.gather_with_grad,
            rank=rank,
            world_size=world_size,
            text_chunk=args.text_chunk,
        )
        return cls(model, loss)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        out = forward_features(self.model, batch["image"], batch["text"])
        losses = self.loss(
            F.normalize(out["image_features"], dim=-1),
            F.normalize(out["text_features"], dim=-1),
            out["logit_scale"],
            **region_phrase_features(out, batch),
            output_dict=True,
        )
        return {**losses, "logit_scale": out["logit_scale"]}
