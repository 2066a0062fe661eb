"""``clip-pgs``: CLIP-PGS, Patch Generation-to-Selection (Pei et al., CVPR 2025): CLIP trained on the patch
tokens that survive a masking of whole similar-patch clusters grown from a few candidate seeds, with at
least a minimum fraction of the tokens masked. The selection (powerclip.methods.pgs_select) reproduces the
released code; its run-table columns choose the released or the paper's behaviour where they disagree.

The model is a stock open_clip ViT: selection happens only in this method's training forward, which runs
the tower's own submodules (patch embedding, CLS and positions, then selection, ``ln_pre``, the transformer
with the attention term, the tower's pooling and projection); evaluation sees every token. The similarity
mixes pixels and embeddings by the run's progress, which the loop passes through :meth:`set_progress`.
See docs/method.md ("clip-pgs").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from powerclip.methods import pgs_select
from powerclip.methods.token_drop import TokenDropMethod


@dataclass(frozen=True)
class PgsOptions:
    """The run-table columns of clip-pgs (schemas/runs.schema.yaml has their defaults and meanings)."""

    min_mask_ratio: float
    seed_ratio: float
    threshold: float
    edge: str
    otn: str
    attention: str

    @classmethod
    def from_args(cls, args) -> PgsOptions:
        return cls(
            min_mask_ratio=args.pgs_min_mask_ratio,
            seed_ratio=args.pgs_seed_ratio,
            threshold=args.pgs_threshold,
            edge=args.pgs_edge,
            otn=args.pgs_otn,
            attention=args.pgs_attention,
        )


class ClipPgsMethod(TokenDropMethod):
    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__(model, loss)
        from powerclip.model import _check_vision_tower

        _check_vision_tower(model.visual)  # open_clip's ViT, no attentional pooling
        if getattr(model.visual.patch_dropout, "prob", 0.0) > 0:
            raise ValueError("clip-pgs selects tokens itself: build its model without patch dropout")
        self.options: PgsOptions | None = None
        self.epochs = 1
        self.epoch = 0  # completed epochs: the similarity's weight on embeddings is epoch / epochs

    def configure(self, args) -> None:
        self.options = PgsOptions.from_args(args)
        self.epochs = args.epochs

    def set_progress(self, step: int, total: int) -> None:
        """The epoch index of ``step`` (of ``total`` steps over ``self.epochs`` epochs): the released code
        passes the integer epoch and weighs embeddings by epoch / 32 in its 32-epoch runs."""
        self.epoch = step * self.epochs // max(total, 1)

    @property
    def embedding_weight(self) -> float:
        return self.epoch / self.epochs

    @torch.no_grad()
    def select(self, images: Tensor, tokens: Tensor) -> tuple[pgs_select.Selection, Tensor | None]:
        """The kept patches of each image and the attention term, from the input ``images`` (B, C, H, W) and
        the patch embeddings with positions ``tokens`` (B, L, width); in float32 (outside autocast)."""
        if self.options is None:
            raise RuntimeError("clip-pgs is not configured: build it with ClipPgsMethod.from_args")
        options, visual = self.options, self.model.visual
        patch = visual.patch_size[0]
        with torch.autocast(images.device.type, enabled=False):
            images = images.float()
            pixels = pgs_select.normalize_patches(pgs_select.patchify(images, patch))
            sim = pgs_select.similarity(tokens.float(), pixels, self.embedding_weight)
            sim = pgs_select.transport_normalize(sim, options.otn)
            edge = pgs_select.edge_map(options.edge, images, pixels, tuple(visual.grid_size), patch)
            selection = pgs_select.select_patches(
                sim, edge, options.edge, options.seed_ratio, options.threshold, options.min_mask_ratio
            )
        heads = visual.transformer.resblocks[0].attn.num_heads
        return selection, pgs_select.attention_bias(options.attention, selection, heads, tokens.dtype)

    def encode_image(self, images: Tensor) -> tuple[Tensor, float]:
        if not self.training:
            return self.model.encode_image(images), 0.0
        visual = self.model.visual
        # VisionTransformer._embeds up to its patch dropout, with the tower's own modules
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        patches = x[:, 1:]
        selection, bias = self.select(images, patches)
        kept = torch.gather(patches, 1, selection.keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = visual.ln_pre(torch.cat([x[:, :1], kept], dim=1))
        x = visual.transformer(x, attn_mask=bias)
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled, 1 - selection.keep.shape[1] / patches.shape[1]
