"""CLIPS's captioner: predicts the full synthetic caption from the image tokens, the web caption's
text-encoder token features and learnable queries (docs/method.md, "clips").

Built from open_clip's blocks (``open_clip.transformer.Transformer``: pre-norm ``ResidualAttentionBlock``s,
``LayerNorm``), one self-attention stack over ``[image tokens ; web-caption tokens ; queries]`` under the
released model's cross-causal mask (:func:`cross_causal_mask`): the prefix (image and web caption) attends
to itself only, query i to the whole prefix and to queries 0..i. Query i's output predicts token i + 1 of
the synthetic caption (0 is start-of-text). The queries carry no caption token (no teacher forcing), as in
the released ``CLIPS.forward``. Training only: the captioner is dropped from the saved checkpoint
(``training_only_modules``), so evaluation sees the two towers exactly.
"""

from __future__ import annotations

import torch
from open_clip.transformer import LayerNorm, Transformer
from torch import nn


def cross_causal_mask(prefix: int, queries: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Additive (T, T) attention mask, T = prefix + queries: 0 where a row may attend to a column, -inf
    where not. Rows and columns ``< prefix`` are the prefix, the rest the queries in order.

    (open_clip's ``ResidualAttentionBlock`` casts a mask to the activations' dtype, so a boolean mask would
    become a +1 bias instead of a block: the mask is additive.)"""
    total = prefix + queries
    blocked = torch.zeros(total, total, dtype=torch.bool, device=device)
    blocked[:prefix, prefix:] = True  # the prefix never sees a query
    blocked[prefix:, prefix:] = torch.ones(queries, queries, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(total, total, dtype=dtype, device=device).masked_fill(blocked, float("-inf"))


class Captioner(nn.Module):
    """``queries`` learnable queries decoded against a prefix of features of width ``width`` (the joint
    embedding: projected patch tokens and projected text-token states); logits over ``vocab_size``."""

    def __init__(self, width: int, heads: int, layers: int, vocab_size: int, queries: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.queries = nn.Parameter(torch.empty(queries, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, norm_layer=LayerNorm, batch_first=True)
        self.ln_final = LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's TextTransformer initialisation for the blocks; queries like its positional embedding."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.queries, std=0.01)
        proj_std, attn_std, fc_std = (width**-0.5) * ((2 * layers) ** -0.5), width**-0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.head.weight, std=width**-0.5)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """Hidden states (B, queries, width) after the final norm, from image tokens (B, N, width) and the
        web caption's token features (B, L, width). ``queries`` < all: only the first ones, whose outputs are
        exactly those of the full decoder (no query sees a later one, the prefix sees none)."""
        prefix = torch.cat([image_tokens, text_tokens], dim=1)
        batch, queries = prefix.shape[0], min(queries or self.queries.shape[0], self.queries.shape[0])
        x = torch.cat([prefix, self.queries[:queries].to(prefix.dtype).unsqueeze(0).expand(batch, -1, -1)], dim=1)
        mask = cross_causal_mask(prefix.shape[1], queries, device=x.device, dtype=x.dtype)
        x = self.transformer(x, attn_mask=mask)
        return self.ln_final(x[:, prefix.shape[1] :])

    def caption_loss(self, hidden: torch.Tensor, caption: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
        """Mean cross-entropy of the caption's tokens 1.. (targets ``caption[:, 1:]``, padding ignored),
        with logits computed only where there is a target (B x queries x vocab would not fit)."""
        targets = caption[:, 1 : 1 + hidden.shape[1]]
        valid = targets != pad_id
        logits = self.head(hidden[:, : targets.shape[1]][valid])
        return nn.functional.cross_entropy(logits.float(), targets[valid])
