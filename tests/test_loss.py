"""PowerCLIP loss: NLA vs brute-force powerset, masking, gradients, ClipLoss equivalence, chunking, DDP.

All CPU, fixed seeds, small shapes. The distributed paths are exercised by replacing
``gather_features`` with an in-process fake that plays "the other rank" (no process group needed).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

import powerclip.loss as pl
from powerclip.loss import (
    PowerClipLoss,
    exact_pair_score,
    exact_powerset,
    nla_scores,
    nla_terms,
    region_phrase_similarity,
)

TAUS = (1.0, 0.1, 0.001)


def _normed(*shape: int, gen: torch.Generator, dtype=torch.float32, offset: float = 0.0) -> torch.Tensor:
    """Random unit vectors; ``offset`` adds a shared direction so cross similarities lean positive
    (as real CLIP features do), which keeps tau = 0.001 gradients above float32 underflow."""
    v = torch.randn(*shape, generator=gen, dtype=dtype)
    if offset:
        v = v + offset * torch.ones(shape[-1], dtype=dtype)
    return F.normalize(v, dim=-1)


def _batch(b_img=4, b_txt=4, m=5, p=3, d=16, seed=0, dtype=torch.float32, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    rf = _normed(b_img, m, d, gen=g, dtype=dtype, offset=offset)
    pf = _normed(b_txt, p, d, gen=g, dtype=dtype, offset=offset)
    rm = torch.ones(b_img, m, dtype=torch.bool)
    pm = torch.ones(b_txt, p, dtype=torch.bool)
    return rf, rm, pf, pm


def _global(b=4, d=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return _normed(b, d, gen=g), _normed(b, d, gen=g), torch.tensor(1 / 0.07)


# --------------------------------------------------------------------------- NLA == exact powerset


def test_similarity_is_inner_product():
    rf, _, pf, _ = _batch(3, 2, 4, 3, 8)
    x = region_phrase_similarity(rf, pf)
    assert x.shape == (3, 2, 4, 3)
    assert torch.allclose(x[2, 1, 3, 0], rf[2, 3] @ pf[1, 0])


def test_exact_powerset_single_region_by_hand():
    # subsets of one region: ∅ (score 0) and {1} (score v)
    x = torch.tensor([[0.3, -0.2]])
    a, r2t = exact_powerset(x, 0.1)
    exp_a = 0.1 * torch.log(1 + torch.exp(x[0].double() / 0.1))
    assert torch.allclose(a, exp_a)
    exp_r2t = 0.1 * torch.log(2 + torch.exp(x[0].double() / 0.1).sum())  # two ∅ terms (one per phrase)
    assert torch.allclose(r2t, exp_r2t)


@pytest.mark.parametrize("tau", TAUS)
def test_nla_equals_exact_powerset_and_hardmax_bound(tau):
    g = torch.Generator().manual_seed(1234)
    for m in range(1, 9):
        for p in range(1, 5):
            x = torch.rand(m, p, generator=g, dtype=torch.float64) * 2 - 1
            a_nla, _, r2t_nla = nla_terms(x, tau=tau)
            a_ex, r2t_ex = exact_powerset(x, tau)
            assert a_nla.dtype == torch.float64
            assert torch.allclose(a_nla, a_ex, rtol=0, atol=1e-5), (m, p, tau)
            assert torch.allclose(r2t_nla, r2t_ex, rtol=0, atol=1e-5), (m, p, tau)
            # hard-max limit: max_S s(S, q) = sum_i relu(x_iq) <= a_q <= that + tau * M * log 2
            gap = a_nla - x.clamp(min=0).sum(dim=0)
            assert (gap >= -1e-12).all() and (gap <= tau * m * math.log(2) + 1e-12).all(), (m, p, tau)


def test_nla_float32_stable_at_small_tau():
    x = torch.tensor([[1.0, -1.0, 0.0], [0.999, -0.999, 1e-4]])
    a, _, r2t = nla_terms(x, tau=0.001)
    a_ex, r2t_ex = exact_powerset(x, 0.001)
    assert torch.isfinite(a).all() and torch.isfinite(r2t).all()
    assert torch.allclose(a.double(), a_ex, atol=1e-5) and torch.allclose(r2t.double(), r2t_ex, atol=1e-5)


# --------------------------------------------------------------------------- batched scores + masks


def _masked_batch(dtype=torch.float64, seed=7):
    rf, rm, pf, pm = _batch(5, 5, m=5, p=4, d=16, seed=seed, dtype=dtype)
    rm[1, 3:] = False  # 3 regions
    rm[2, :] = False  # no region -> invalid image
    rm[3, 1:] = False  # 1 region
    rm[4] = torch.tensor([True, False, True, False, True])  # holes
    pm[1, 2:] = False  # 2 phrases
    pm[2, :] = False  # no phrase -> invalid text
    pm[3, 1:] = False  # 1 phrase
    # garbage in padded slots must be ignored entirely
    rf = rf.masked_fill(~rm[..., None], float("nan"))
    pf = pf.masked_fill(~pm[..., None], float("nan"))
    return rf, rm, pf, pm


@pytest.mark.parametrize("tau", TAUS)
def test_nla_scores_match_exact_pairs_with_masks(tau):
    rf, rm, pf, pm = _masked_batch()
    alpha, topk = 0.75, 5
    scores, iv, tv = nla_scores(rf, rm, pf, pm, tau=tau, alpha=alpha, topk=topk)
    assert iv.tolist() == [True, True, False, True, True]
    assert tv.tolist() == [True, True, False, True, True]
    assert torch.isfinite(scores).all()
    for b in range(5):
        for c in range(5):
            if not (iv[b] and tv[c]):
                assert scores[b, c] == 0
                continue
            x = rf[b][rm[b]] @ pf[c][pm[c]].T  # only valid entries
            ref = exact_pair_score(x, tau, alpha, topk)
            assert torch.allclose(scores[b, c], ref, rtol=0, atol=1e-5), (b, c)


def test_singleton_mode_by_hand():
    # r1 = e1, r2 = e2; p1 = (0.6, 0.8, 0), p2 = (0, -0.6, 0.8); third phrase slot padded
    rf = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    pf = torch.tensor([[[0.6, 0.8, 0], [0, -0.6, 0.8], [0, 0, 1.0]]])
    pm = torch.tensor([[True, True, False]])
    # x = [[0.6, 0], [0.8, -0.6]] -> a = (max 0.8, max 0) -> T2R = 0.4, R2T = 0.8 -> 0.75*.4 + .25*.8
    for topk in (1, 5):  # singleton scores are not divided by topk
        s, _, _ = nla_scores(rf, torch.tensor([[True, True]]), pf, pm, alpha=0.75, topk=topk,
                             softplus_scoring=False)
        assert torch.allclose(s, torch.tensor([[0.5]]))
    # only region 1 valid: a = (0.6, 0) -> 0.75 * 0.3 + 0.25 * 0.6
    s, _, _ = nla_scores(rf, torch.tensor([[True, False]]), pf, pm, alpha=0.75, softplus_scoring=False)
    assert torch.allclose(s, torch.tensor([[0.375]]))


def test_singleton_mode_masks_no_nan():
    rf, rm, pf, pm = _masked_batch(torch.float32)
    rf.requires_grad_(True)
    s, iv, tv = nla_scores(rf, rm, pf, pm, softplus_scoring=False)
    assert torch.isfinite(s).all() and (s[~iv] == 0).all() and (s[:, ~tv] == 0).all()
    s.sum().backward()
    assert torch.isfinite(rf.grad).all()


@pytest.mark.parametrize("softplus", [True, False])
@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_equals_unchunked(chunk, softplus):
    rf, rm, pf, pm = _masked_batch(torch.float32)
    full, iv, tv = nla_scores(rf, rm, pf, pm, softplus_scoring=softplus)
    part, iv2, tv2 = nla_scores(rf, rm, pf, pm, softplus_scoring=softplus, text_chunk=chunk)
    assert torch.allclose(full, part, rtol=0, atol=1e-6)
    assert torch.equal(iv, iv2) and torch.equal(tv, tv2)

    img, txt, scale = _global(5)
    args = (img, txt, scale, rf, rm, pf, pm)
    l_full = PowerClipLoss(sam_loss_ratio=0.5, softplus_scoring=softplus)(*args)
    l_part = PowerClipLoss(sam_loss_ratio=0.5, softplus_scoring=softplus, text_chunk=chunk)(*args)
    assert torch.allclose(l_full, l_part, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("tau", [0.1, 0.001])
def test_grad_reaches_every_valid_region_and_not_padding(tau):
    rf, rm, pf, pm = _batch(4, 4, m=5, p=3, d=32, seed=3, offset=0.5)
    rm[1, 2:] = False
    rm[3, 4:] = False
    pm[2, 1:] = False
    rf.requires_grad_(True)
    pf.requires_grad_(True)
    img, txt, scale = _global(4, 32)
    out = PowerClipLoss(sam_loss_ratio=1.0, tau=tau)(img, txt, scale, rf, rm, pf, pm, output_dict=True)
    out["local_loss"].backward()
    assert torch.isfinite(rf.grad).all() and torch.isfinite(pf.grad).all()
    r_norm = rf.grad.norm(dim=-1)
    p_norm = pf.grad.norm(dim=-1)
    assert (r_norm[rm] > 0).all(), r_norm
    assert (r_norm[~rm] == 0).all()
    assert (p_norm[pm] > 0).all(), p_norm
    assert (p_norm[~pm] == 0).all()


@pytest.mark.parametrize("tau", [1.0, 0.001])
def test_grad_reaches_every_valid_region_float64_random(tau):
    # no positive offset: at tau = 0.001 the gradient sigmoid(x / tau) is tiny but nonzero in float64
    rf, rm, pf, pm = _batch(3, 3, m=4, p=2, d=8, seed=11, dtype=torch.float64)
    rm[0, 3] = False
    rf.requires_grad_(True)
    img, txt, scale = _global(3, 8)
    loss = PowerClipLoss(sam_loss_ratio=1.0, tau=tau)(img.double(), txt.double(), scale.double(),
                                                      rf, rm, pf, pm, output_dict=True)["local_loss"]
    loss.backward()
    r_norm = rf.grad.norm(dim=-1)
    assert (r_norm[rm] > 0).all() and (r_norm[~rm] == 0).all()


@pytest.mark.parametrize("softplus", [True, False])
def test_fully_masked_images_and_texts_no_nan(softplus):
    rf, rm, pf, pm = _masked_batch(torch.float32)  # image 2 and text 2 invalid, NaN padding
    rf.requires_grad_(True)
    pf.requires_grad_(True)
    img, txt, scale = _global(5)
    out = PowerClipLoss(sam_loss_ratio=0.3, softplus_scoring=softplus)(
        img, txt, scale, rf, rm, pf, pm, output_dict=True)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["local_loss"])
    assert int(out["local_anchors"]) == 4 and int(out["local_skipped_pairs"]) == 1
    out["loss"].backward()
    assert torch.isfinite(rf.grad).all() and torch.isfinite(pf.grad).all()
    assert (rf.grad[~rm] == 0).all() and (pf.grad[~pm] == 0).all()


def test_no_anchor_gives_zero_connected_local_loss():
    rf, rm, pf, pm = _batch(3, 3)
    rm[:] = False
    pm[0] = False  # and one text without phrases, for good measure
    rf.requires_grad_(True)
    img, txt, scale = _global(3)
    out = PowerClipLoss(sam_loss_ratio=0.5)(img, txt, scale, rf, rm, pf, pm, output_dict=True)
    assert out["local_loss"].item() == 0.0 and out["local_loss"].requires_grad
    assert int(out["local_anchors"]) == 0 and int(out["local_skipped_pairs"]) == 3
    out["local_loss"].backward()
    assert torch.equal(rf.grad, torch.zeros_like(rf))
    # an image whose own text is invalid is no anchor, but still a negative for valid text anchors
    rm[:] = True
    out = PowerClipLoss(sam_loss_ratio=0.5)(img, txt, scale, rf, rm, pf, pm, output_dict=True)
    assert int(out["local_anchors"]) == 2


# --------------------------------------------------------------------------- loss wiring


def test_lambda_zero_is_exactly_clip_loss():
    rf, rm, pf, pm = _batch(4, 4)
    img, txt, scale = _global(4)
    ref = ClipLoss()(img, txt, scale)
    for loss in (
        PowerClipLoss(sam_loss_ratio=0.0)(img, txt, scale, rf, rm, pf, pm),
        PowerClipLoss(sam_loss_ratio=0.1)(img, txt, scale),  # no region/phrase inputs
    ):
        assert torch.equal(loss, ref)
    out = PowerClipLoss(sam_loss_ratio=0.0)(img, txt, scale, rf, rm, pf, pm, output_dict=True)
    assert torch.equal(out["loss"], ref) and out["local_loss"] == 0


def test_total_equals_clip_plus_lambda_manual_local():
    lam, tau = 0.25, 0.01
    rf, rm, pf, pm = _batch(3, 3, m=4, p=3, d=8, seed=5)
    rm[1, 2:] = False
    img, txt, scale = _global(3, 8)
    scores, _, _ = nla_scores(rf, rm, pf, pm, tau=tau)
    logits = scale * scores
    i2t = sum(-torch.log_softmax(logits[b], 0)[b] for b in range(3)) / 3
    t2i = sum(-torch.log_softmax(logits[:, c], 0)[c] for c in range(3)) / 3
    manual = ClipLoss()(img, txt, scale) + lam * (i2t + t2i) / 2
    out = PowerClipLoss(sam_loss_ratio=lam, tau=tau)(img, txt, scale, rf, rm, pf, pm, output_dict=True)
    assert torch.allclose(out["loss"], manual, rtol=1e-6, atol=1e-6)
    assert torch.allclose(out["local_loss"], (i2t + t2i) / 2, rtol=1e-6, atol=1e-6)
    assert int(out["local_anchors"]) == 3 and int(out["local_skipped_pairs"]) == 0


def test_invalid_text_is_not_a_negative():
    rf, rm, pf, pm = _batch(3, 3, seed=9)
    pm[2] = False
    img, txt, scale = _global(3)
    scores, _, _ = nla_scores(rf, rm, pf, pm)
    logits = scale * scores
    # anchors 0 and 1; columns/rows of pair 2 excluded from both softmaxes
    i2t = sum(-torch.log_softmax(logits[b, :2], 0)[b] for b in range(2)) / 2
    t2i = sum(-torch.log_softmax(logits[:, c], 0)[c] for c in range(2)) / 2  # image 2 valid: negative
    out = PowerClipLoss(sam_loss_ratio=1.0)(img, txt, scale, rf, rm, pf, pm, output_dict=True)
    assert torch.allclose(out["local_loss"], (i2t + t2i) / 2, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- simulated world_size = 2


class _FakeGather:
    """Stands in for ``gather_features`` on one rank: returns the full (2-rank) batch, with the calling
    rank's slice being the caller's own tensors (grad-carrying) unless local_loss, like the real one."""

    def __init__(self, full: list[torch.Tensor]):
        self.full = full

    def _one(self, t, local_loss, rank, world_size):
        b = t.shape[0]
        for f in self.full:
            if f.shape[1:] == t.shape[1:] and f.dtype == t.dtype and torch.equal(
                    f[rank * b:(rank + 1) * b], t.detach()):
                parts = list(f.detach().chunk(world_size))
                if not local_loss:
                    parts[rank] = t
                return torch.cat(parts)
        raise AssertionError("unknown tensor")

    def __call__(self, a, b, local_loss=False, gather_with_grad=False, rank=0, world_size=1, use_horovod=False):
        return self._one(a, local_loss, rank, world_size), self._one(b, local_loss, rank, world_size)


@pytest.mark.parametrize("local_loss", [False, True])
def test_simulated_world_size_two(monkeypatch, local_loss):
    rf, rm, pf, pm = _batch(4, 4, seed=21)
    img, txt, scale = _global(4)
    full = [img, txt, rf, pf, rm.float(), pm.float()]
    fake = _FakeGather(full)
    monkeypatch.setattr(pl, "gather_features", fake)
    import open_clip.loss as ocl

    monkeypatch.setattr(ocl, "gather_features", fake)

    ref = PowerClipLoss(sam_loss_ratio=0.5)(img, txt, scale, rf, rm, pf, pm, output_dict=True)
    per_rank = []
    for rank in range(2):
        s = slice(2 * rank, 2 * rank + 2)
        mod = PowerClipLoss(sam_loss_ratio=0.5, rank=rank, world_size=2, local_loss=local_loss)
        per_rank.append(mod(img[s], txt[s], scale, rf[s], rm[s], pf[s], pm[s], output_dict=True))
    if local_loss:
        # each rank averages its own anchors; with equal counts the rank mean is the global loss
        loss = sum(o["local_loss"] for o in per_rank) / 2
        assert all(int(o["local_anchors"]) == 2 for o in per_rank)
    else:
        loss = per_rank[0]["local_loss"]
        assert torch.allclose(per_rank[1]["local_loss"], loss)
        assert int(per_rank[0]["local_anchors"]) == 4
    assert torch.allclose(loss, ref["local_loss"], rtol=1e-6, atol=1e-6)
