"""PowerCLIP loss: CLIP's contrastive loss + a powerset region–phrase alignment term.

Implements the formulation of docs/method.md. For an image I with valid
region features r_1..r_M and a caption T with valid phrase features p_1..p_P (all L2-normalised), let
x_iq = <r_i, p_q> and, for a subset S of the regions, s(S, q) = sum_{i in S} x_iq.

* T2R (NLA-T1): a_q = tau * log sum_{S ⊆ [M]} exp(s(S, q) / tau) = tau * sum_i softplus(x_iq / tau).
  The identity sum_S prod_{i in S} e^{x_iq/tau} = prod_i (1 + e^{x_iq/tau}) makes it O(M) instead of
  O(2^M); it upper-bounds max_S s(S, q) = sum_i relu(x_iq) by at most tau * M * log 2.
  S_T2R = mean_q a_q.
* R2T (NLA-T2): S_R2T = tau * logsumexp_q(a_q / tau) = tau * log sum_S sum_q exp(s(S, q) / tau) exactly.
* Pair score S(I, T) = (alpha * S_T2R + (1 - alpha) * S_R2T) / topk.
* Local loss: symmetric InfoNCE over the (gathered) batch with logits ``logit_scale * S`` (CLIP's own
  ``logit_scale``); total = ClipLoss + sam_loss_ratio * local.

``exact_powerset`` / ``exact_pair_score`` enumerate all 2^M subsets and are the brute-force reference the
NLA must reproduce (tests) and the baseline of ``bench/bench_loss.py``.

Documented choices (docs/method.md, "Documented choices and open questions"):

1. **∅ is in the powerset.** The empty subset scores s(∅, q) = 0 and contributes the "1 +" of
   prod_i (1 + e^{x/tau}); without it the softplus identity would not hold. As a consequence
   a_q > 0 always (a_q = tau * M * log 2 when every x_iq = 0, a_q -> 0 when every x_iq << 0).
2. **Normalisation by topk.** a_q is a *sum* over up to M regions, so the NLA pair score is divided by the
   configured top-k M (``sam_regions_topk``, not the per-image number of valid regions: the divisor is a
   constant so that scores of images with fewer regions stay comparable) to live on the cosine scale.
3. **No /topk for singleton alignment** (``softplus_scoring=False``): a_q = max_i x_iq is already a single
   cosine, so S = alpha * mean_q a_q + (1 - alpha) * max_q a_q is used as is.
4. **Masking.** Padded region / phrase slots (mask False) are excluded from every sum, max and mean and
   receive exactly zero gradient (their feature values are ignored, even NaN). An image with no valid
   region or a text with no valid phrase is *invalid*: its pair scores are set to 0 (finite, no NaN in
   values or gradients), invalid texts are not negatives of any image and invalid images are not negatives
   of any text, and a pair (b, b) counts as an InfoNCE anchor only when both image b and text b are valid.
   Each direction averages over its counted anchors; with no anchor the local loss is an exact 0 that is
   still connected to the graph.
5. **Precision.** The aggregation runs in at least float32 (half / bfloat16 similarities are upcast): with
   tau = 0.001, x / tau spans +-1000 and a half-precision softplus would lose the whole signal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, gather_features
from torch import Tensor, nn

__all__ = [
    "PowerClipLoss",
    "exact_pair_score",
    "exact_powerset",
    "nla_scores",
    "nla_terms",
    "region_phrase_similarity",
]


def region_phrase_similarity(region_features: Tensor, phrase_features: Tensor) -> Tensor:
    """x[b, c, i, q] = <r_bi, p_cq>: (B_img, M, D) x (B_txt, P, D) -> (B_img, B_txt, M, P)."""
    return torch.einsum("bmd,cpd->bcmp", region_features, phrase_features)


def _neg_fill(dtype: torch.dtype) -> float:
    """A large *finite* negative stand-in for -inf in masked max / logsumexp.

    A reduction over an all-masked set then stays finite and its backward never computes
    exp(-inf - -inf) = NaN; a quarter of the dtype's range leaves room for the sums/means that follow.
    """
    return torch.finfo(dtype).min / 4


def nla_terms(
    x: Tensor,
    region_mask: Tensor | None = None,
    phrase_mask: Tensor | None = None,
    tau: float = 0.001,
    softplus_scoring: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-phrase aggregates and the two directional scores from similarities ``x`` of shape (..., M, P).

    ``region_mask`` must broadcast to (..., M) and ``phrase_mask`` to (..., P) (None = all valid).

    softplus_scoring=True (NLA, docs/method.md "T2R (NLA-T1)" / "R2T (NLA-T2)"):
        a_q = tau * sum_{valid i} softplus(x_iq / tau), S_T2R = mean_{valid q} a_q,
        S_R2T = tau * logsumexp_{valid q}(a_q / tau).
    softplus_scoring=False (singleton alignment):
        a_q = max_{valid i} x_iq, S_T2R = mean_{valid q} a_q, S_R2T = max_{valid q} a_q.

    Returns ``(a (..., P), s_t2r (...), s_r2t (...))``. Entries with no valid region or no valid phrase
    are finite but meaningless (a_q = 0 for an image without regions; the directional scores of a text
    without phrases are 0); ``nla_scores`` zeroes the whole pair.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    m, p = x.shape[-2:]
    rmask = torch.ones(m, dtype=torch.bool, device=x.device) if region_mask is None else region_mask
    rmask = rmask.unsqueeze(-1)  # (..., M, 1)
    pmask = torch.ones(p, dtype=torch.bool, device=x.device) if phrase_mask is None else phrase_mask
    pmask = pmask.unsqueeze(-2)  # (..., 1, P)
    fill = _neg_fill(x.dtype)
    zero = x.new_zeros(())

    if softplus_scoring:
        # tau * softplus(x / tau) via logaddexp(0, x/tau): exact (no softplus `threshold` cut-off) and
        # stable for tau = 0.001, and its gradient is sigmoid(x / tau) everywhere (also at x = 0, where
        # the relu + log1p(exp(-|x|/tau)) form would give 0).
        sp = torch.logaddexp(x / tau, zero) * tau
        # where (not multiply) so padded slots contribute nothing and get exactly zero gradient.
        a = torch.where(rmask, sp, zero).sum(dim=-2)  # (..., P)
    else:
        a = torch.where(rmask, x, fill).amax(dim=-2)
        # an image without regions would keep the fill; reset to 0 so later sums cannot overflow.
        a = torch.where(rmask.any(dim=-2), a, zero)

    pm = pmask.squeeze(-2)  # (..., P)
    n_q = pm.sum(dim=-1).clamp(min=1).to(a.dtype)
    s_t2r = torch.where(pm, a, zero).sum(dim=-1) / n_q
    if softplus_scoring:
        s_r2t = torch.logsumexp(torch.where(pm, a / tau, fill), dim=-1) * tau
    else:
        s_r2t = torch.where(pm, a, fill).amax(dim=-1)
    s_r2t = torch.where(pm.any(dim=-1), s_r2t, zero)
    return a, s_t2r, s_r2t


def nla_scores(
    region_features: Tensor,
    region_mask: Tensor,
    phrase_features: Tensor,
    phrase_mask: Tensor,
    tau: float = 0.001,
    alpha: float = 0.75,
    topk: int = 5,
    softplus_scoring: bool = True,
    text_chunk: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pair scores S(I_b, T_c) for every image b and text c (docs/method.md "Pair score").

    Args:
        region_features: (B_img, M, D) normalised region features; padded slots may hold anything.
        region_mask: (B_img, M) bool, True = real region.
        phrase_features: (B_txt, P, D) normalised phrase features.
        phrase_mask: (B_txt, P) bool, True = real phrase.
        tau: NLA temperature (``softplus_tau``).
        alpha: weight of T2R vs R2T (``softplus_alpha``).
        topk: configured number of regions M (``sam_regions_topk``); NLA scores are divided by it.
        softplus_scoring: True = powerset NLA; False = singleton alignment
            S = alpha * mean_q max_i x_iq + (1 - alpha) * max_q max_i x_iq, *not* divided by topk because
            a single max is already on the cosine scale.
        text_chunk: process this many texts at a time (the (B_img, B_txt, M, P) similarity tensor may not
            fit in memory); the result equals the unchunked one.

    Returns:
        ``(scores (B_img, B_txt), img_valid (B_img,), txt_valid (B_txt,))``; ``scores`` is 0 for pairs with
        an invalid image (no region) or text (no phrase).
    """
    region_mask = region_mask.bool()
    phrase_mask = phrase_mask.bool()
    # Zero padded slots so that garbage (even NaN) there can neither leak into x nor poison gradients
    # of valid entries through the einsum backward (0 * NaN = NaN).
    region_features = region_features.masked_fill(~region_mask.unsqueeze(-1), 0)
    phrase_features = phrase_features.masked_fill(~phrase_mask.unsqueeze(-1), 0)
    img_valid = region_mask.any(dim=1)
    txt_valid = phrase_mask.any(dim=1)

    n_txt = phrase_features.shape[0]
    step = n_txt if not text_chunk else max(1, int(text_chunk))
    chunks = []
    for start in range(0, n_txt, step):
        x = region_phrase_similarity(region_features, phrase_features[start : start + step])
        _, s_t2r, s_r2t = nla_terms(
            x,
            region_mask[:, None, :],
            phrase_mask[None, start : start + step, :],
            tau=tau,
            softplus_scoring=softplus_scoring,
        )
        s = alpha * s_t2r + (1.0 - alpha) * s_r2t
        chunks.append(s / topk if softplus_scoring else s)
    scores = torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0]
    valid = img_valid[:, None] & txt_valid[None, :]
    scores = torch.where(valid, scores, scores.new_zeros(()))
    return scores, img_valid, txt_valid


def exact_powerset(x: Tensor, tau: float, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Brute-force reference: enumerate all 2^M subsets (∅ included, score 0) of one pair's regions.

    ``x`` holds only valid entries, shape (M, P) (or (..., M, P) for a batch of pairs of equal size).
    Returns ``a`` (..., P) with a_q = tau * log sum_S exp(s(S, q) / tau) and ``r2t`` (...) with
    r2t = tau * log sum_S sum_q exp(s(S, q) / tau), s(S, q) = sum_{i in S} x_iq. Memory and time are
    O(2^M * P) per pair.
    """
    x = torch.as_tensor(x).to(dtype)
    m = x.shape[-2]
    # Row k of `bits` is the indicator of subset k (row 0 = ∅), so bits @ x gives every s(S, q) at once.
    idx = torch.arange(2**m, device=x.device)
    bits = ((idx[:, None] >> torch.arange(m, device=x.device)) & 1).to(dtype)  # (2^M, M)
    s = torch.matmul(bits, x) / tau  # (..., 2^M, P)
    a = torch.logsumexp(s, dim=-2) * tau
    r2t = torch.logsumexp(s.flatten(-2), dim=-1) * tau
    return a, r2t


def exact_pair_score(x: Tensor, tau: float, alpha: float = 0.75, topk: int = 5) -> Tensor:
    """Exact pair score (alpha * mean_q a_q + (1 - alpha) * r2t) / topk from ``exact_powerset``."""
    a, r2t = exact_powerset(x, tau)
    return (alpha * a.mean(dim=-1) + (1.0 - alpha) * r2t) / topk


def _masked_info_nce(logits: Tensor, labels: Tensor, anchors: Tensor, col_valid: Tensor) -> Tensor:
    """Mean cross-entropy over the anchor rows of ``logits`` (rows x columns).

    Columns with ``col_valid`` False are removed from the softmax (-inf); rows that are not anchors are
    replaced by zeros before the cross-entropy (so no all -inf row is ever evaluated) and then dropped
    from the mean. Without anchors the result is 0 and still depends on ``logits``.
    """
    masked = logits.masked_fill(~col_valid[None, :], float("-inf"))
    masked = torch.where(anchors[:, None], masked, logits.new_zeros(()))
    ce = F.cross_entropy(masked, labels, reduction="none")
    ce = torch.where(anchors, ce, ce.new_zeros(()))
    return ce.sum() / anchors.sum().clamp(min=1).to(ce.dtype)


class PowerClipLoss(nn.Module):
    """L = L_CLIP + sam_loss_ratio * L_local (docs/method.md "Local loss and total loss").

    The global term is open_clip's ``ClipLoss`` (owned, not reimplemented). The local term is a symmetric
    InfoNCE over pair scores ``logit_scale * S(I_b, T_c)`` from ``nla_scores``; with ``world_size > 1``
    region / phrase features and masks are gathered with ``open_clip.loss.gather_features`` exactly like
    ClipLoss gathers global features (``gather_with_grad`` / ``local_loss`` semantics included), so every
    rank must pass the same B, M (= topk) and P (the phrase cap). See the module docstring for the
    masking rules.
    """

    def __init__(
        self,
        sam_loss_ratio: float = 0.1,
        topk: int = 5,
        tau: float = 0.001,
        alpha: float = 0.75,
        softplus_scoring: bool = True,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        text_chunk: int | None = None,
    ) -> None:
        super().__init__()
        self.sam_loss_ratio = float(sam_loss_ratio)
        self.topk = int(topk)
        self.tau = float(tau)
        self.alpha = float(alpha)
        self.softplus_scoring = bool(softplus_scoring)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self.text_chunk = text_chunk
        self.clip_loss = ClipLoss(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            cache_labels=cache_labels,
            rank=rank,
            world_size=world_size,
        )

    def _scores(self, rf: Tensor, rm: Tensor, pf: Tensor, pm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return nla_scores(
            rf, rm, pf, pm,
            tau=self.tau, alpha=self.alpha, topk=self.topk,
            softplus_scoring=self.softplus_scoring, text_chunk=self.text_chunk,
        )

    def _gather(self, a: Tensor, b: Tensor, with_grad: bool) -> tuple[Tensor, Tensor]:
        return gather_features(
            a, b,
            local_loss=self.local_loss, gather_with_grad=with_grad,
            rank=self.rank, world_size=self.world_size,
        )

    def region_phrase_loss(
        self,
        region_features: Tensor,
        region_mask: Tensor,
        phrase_features: Tensor,
        phrase_mask: Tensor,
        logit_scale: Tensor,
    ) -> tuple[Tensor, Tensor, int]:
        """Local InfoNCE term. Returns ``(loss, n_anchors (0-dim long tensor), n_rows)``."""
        region_mask = region_mask.bool()
        phrase_mask = phrase_mask.bool()
        b_local = region_features.shape[0]
        if self.world_size > 1:
            all_rf, all_pf = self._gather(region_features, phrase_features, self.gather_with_grad)
            # masks carry no gradient; gathered as float because collectives do not all support bool.
            all_rm, all_pm = self._gather(
                region_mask.to(region_features.dtype), phrase_mask.to(phrase_features.dtype), False
            )
            all_rm, all_pm = all_rm > 0.5, all_pm > 0.5
        else:
            all_rf, all_rm, all_pf, all_pm = region_features, region_mask, phrase_features, phrase_mask

        if self.world_size > 1 and self.local_loss:
            # Mirror ClipLoss(local_loss=True): local rows against all gathered columns, labels offset.
            s_i2t, img_valid, txt_valid_all = self._scores(region_features, region_mask, all_pf, all_pm)
            s_t2i_T, img_valid_all, txt_valid = self._scores(all_rf, all_rm, phrase_features, phrase_mask)
            s_t2i = s_t2i_T.T
            labels = torch.arange(b_local, device=s_i2t.device) + b_local * self.rank
            anchors = img_valid & txt_valid_all[labels]
            anchors_t = txt_valid & img_valid_all[labels]  # same pairs, seen from the text side
            n_rows = b_local
        else:
            s_i2t, img_valid_all, txt_valid_all = self._scores(all_rf, all_rm, all_pf, all_pm)
            s_t2i = s_i2t.T
            labels = torch.arange(s_i2t.shape[0], device=s_i2t.device)
            anchors = img_valid_all & txt_valid_all
            anchors_t = anchors
            n_rows = s_i2t.shape[0]

        i2t = _masked_info_nce(logit_scale * s_i2t, labels, anchors, txt_valid_all)
        t2i = _masked_info_nce(logit_scale * s_t2i, labels, anchors_t, img_valid_all)
        return (i2t + t2i) / 2, anchors.sum(), n_rows

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        region_features: Tensor | None = None,
        region_mask: Tensor | None = None,
        phrase_features: Tensor | None = None,
        phrase_mask: Tensor | None = None,
        output_dict: bool = False,
    ) -> Tensor | dict[str, Tensor]:
        """Total loss, or with ``output_dict`` the dict {contrastive_loss, local_loss, loss, local_anchors,
        local_skipped_pairs}. ``loss`` already is the total: do not sum the dict's values.

        With ``sam_loss_ratio == 0`` or any region/phrase input None the total *is* the ClipLoss value.
        """
        contrastive = self.clip_loss(image_features, text_features, logit_scale)
        local_inputs = (region_features, region_mask, phrase_features, phrase_mask)
        if self.sam_loss_ratio == 0 or any(t is None for t in local_inputs):
            total = contrastive  # bit-identical to plain CLIP
            local = contrastive.new_zeros(())
            n_anchors = torch.zeros((), dtype=torch.long, device=contrastive.device)
            n_rows = image_features.shape[0]
        else:
            local, n_anchors, n_rows = self.region_phrase_loss(
                region_features, region_mask, phrase_features, phrase_mask, logit_scale
            )
            total = contrastive + self.sam_loss_ratio * local
        if not output_dict:
            return total
        return {
            "contrastive_loss": contrastive,
            "local_loss": local,
            "loss": total,
            "local_anchors": n_anchors,
            "local_skipped_pairs": n_rows - n_anchors,
        }
