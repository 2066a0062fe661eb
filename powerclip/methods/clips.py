"""``clips``: CLIPS (Liu et al. 2024) on our towers: CLIP's InfoNCE between each image and two sub-captions
of its synthetic caption, averaged, plus a captioner that predicts the full synthetic caption from the
image and the web caption::

    L = w_clip * 1/2 [InfoNCE(img, sub_1) + InfoNCE(img, sub_2)] + w_cap * CE(caption)

A reimplementation on open_clip's blocks (the released training code does not run); every deviation from
the paper and the released code is listed in docs/method.md ("clips"). The data (recaptions sidecar,
sub-captions, targets) comes from powerclip.data (``CaptionViews``) and powerclip.recaptions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor, nn

from powerclip.data import CaptionViews
from powerclip.methods.base import TrainingMethod
from powerclip.methods.captioner import Captioner
from powerclip.model import PAD_TOKEN_ID, encode_image_tokens, encode_text_tokens

CAPTIONER = "clips_captioner"  # the captioner's attribute on the open_clip model (dropped from checkpoints)
VIEWS = 2  # sub-captions per sample: the released CLIPSLoss averages two InfoNCE terms


class ClipsMethod(TrainingMethod):
    metric_names = ("contrastive_loss", "caption_loss")

    def __init__(self, model: nn.Module, loss: ClipLoss, views: CaptionViews, contrastive_weight: float, caption_weight: float):
        super().__init__(model)
        self.loss = loss
        self.caption_views = views  # read by the trainer for its DataConfig
        self.contrastive_weight, self.caption_weight = contrastive_weight, caption_weight

    @classmethod
    def build_model(cls, args) -> nn.Module:
        """The run's two towers (initialised exactly as a clip run with the same seed) and the captioner,
        whose geometry follows the text tower as CoCa's decoder does: width = the joint embedding (it reads
        projected tokens), heads and layers = the text tower's."""
        model = super().build_model(args)
        cfg = model.powerclip_cfg["model_cfg"]
        text = cfg["text_cfg"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            captioner = Captioner(
                width=cfg["embed_dim"],
                heads=text.get("heads", 8),
                layers=text.get("layers", 12),
                vocab_size=model.vocab_size,
                queries=args.clips_caption_tokens,
            )
        model.add_module(CAPTIONER, captioner)
        model.training_only_modules = (CAPTIONER,)  # powerclip.model.save_checkpoint leaves it out
        return model

    @classmethod
    def from_args(cls, model, args, rank=0, world_size=1):
        loss = ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, rank=rank, world_size=world_size)
        views = CaptionViews(args.clips_text_reduction, args.clips_text_tokens, VIEWS, args.clips_caption_tokens)
        return cls(model, loss, views, args.clips_contrastive_weight, args.clips_caption_weight)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        model = self.model
        image_features, patch_tokens = encode_image_tokens(model, batch["image"])
        views = batch["subcaptions"]  # (B, V, L)
        text_features, _ = encode_text_tokens(model, views.flatten(0, 1))
        image = F.normalize(image_features, dim=-1)
        text = F.normalize(text_features, dim=-1).unflatten(0, views.shape[:2])
        scale = model.logit_scale.exp()
        contrastive = torch.stack([self.loss(image, text[:, v], scale) for v in range(views.shape[1])]).mean()
        # The web caption's token features up to the batch's longest caption (padding beyond it is dropped;
        # within it, as in the released code, it stays visible to the captioner).
        web = batch["web_text"]
        _, web_tokens = encode_text_tokens(model, web)
        length = int((web != PAD_TOKEN_ID).sum(dim=1).max())
        captioner = getattr(model, CAPTIONER)
        # Queries past the batch's longest caption would only predict padding: they are left out (the others'
        # outputs do not depend on them), which changes nothing but the cost.
        targets = int((batch["caption"][:, 1:] != PAD_TOKEN_ID).sum(dim=1).max())
        hidden = captioner(patch_tokens, web_tokens[:, :length], queries=targets)
        caption = captioner.caption_loss(hidden, batch["caption"], PAD_TOKEN_ID)
        loss = self.contrastive_weight * contrastive + self.caption_weight * caption
        return {"loss": loss, "contrastive_loss": contrastive, "caption_loss": caption, "logit_scale": scale}
