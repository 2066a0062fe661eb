"""CLIP-PGS's patch generation-to-selection: which patch tokens of a batch reach the image transformer.

Pure tensor functions, reproducing ``PatchDropout_PGS`` of the released code (clip-pgs/CLIP-PGS,
``open_clip/transformer.py``) step by step; where the released code and the paper disagree, the released
behaviour is ``"released"`` and the paper's reading ``"paper"`` (docs/method.md, "clip-pgs", has the
measured differences):

1. pixel patches of the input image, each normalised to zero mean and unit standard deviation;
2. similarity S = w·cos(patch embeddings) + (1 − w)·cos(pixel patches), w = the epoch's progress;
3. optimal-transport normalisation S ← S + Sinkhorn(S) (:func:`sinkhorn_released`, :func:`sinkhorn`);
4. candidate seeds: the patches ranked last by uniform noise, with the Sobel edge prior (:func:`edge_map`)
   added ×10⁶ to the noise, so that it decides the ranking;
5. cluster growth: a patch is flagged when its similarity to any seed exceeds the threshold;
6. selection: the same number K of tokens for every image of the batch, at most ⌊L·(1 − min mask ratio)⌋,
   unflagged patches first, then flagged ones in random order;
7. the attention term over the kept tokens (:func:`attention_bias`).

Random draws use the global torch generator (as open_clip's PatchDropout), so a seeded run is reproducible
and a resumed run continues its stream (powerclip.train saves the generator state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The behaviours of the steps where the released code and the paper disagree (run-table columns pgs_*).
BEHAVIOURS = ("released", "paper", "none")
EDGE_WEIGHT = 1e6  # the released code's factor: the edge prior outranks the uniform noise
NORM_EPS = 1e-6  # the released code's epsilon of every normalisation (patches, cosine, edge min-max)
SINKHORN_ITERATIONS = 50
SINKHORN_TOLERANCE = 1e-3

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_SOBEL_Y = _SOBEL_X.t().contiguous()


def _check_behaviour(name: str, value: str) -> None:
    if value not in BEHAVIOURS:
        raise ValueError(f"{name} must be one of {BEHAVIOURS}, got {value!r}")


# ------------------------------------------------------------------------------------------------ pixels
def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, patch²·C), patches in row-major grid order (the ViT's token order), pixels in
    the released layout (row, column, channel): the rounding of the per-patch sums depends on it."""
    batch, channels, height, width = images.shape
    x = images.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // patch) * (width // patch), patch * patch * channels)


def normalize_patches(patches: torch.Tensor) -> torch.Tensor:
    """Each patch to zero mean and unit (unbiased) standard deviation over its pixels, as released."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = patches.std(dim=-1, keepdim=True)
    return (patches - mean) / (std + NORM_EPS)


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """(B, L, D) -> (B, L, L) cosine similarities between all pairs of rows."""
    x = x / (x.norm(dim=-1, keepdim=True) + NORM_EPS)
    return torch.bmm(x, x.transpose(1, 2))


def similarity(tokens: torch.Tensor, pixels: torch.Tensor, weight: float) -> torch.Tensor:
    """w·cos(patch embeddings) + (1 − w)·cos(normalised pixel patches); w moves from pixels to embeddings
    over training (the released code: epoch / 32 in its 32-epoch runs)."""
    return weight * cosine_matrix(tokens) + (1.0 - weight) * cosine_matrix(pixels)


# ------------------------------------------------------------------------------------- optimal transport
def sinkhorn_released(
    matrix: torch.Tensor, iterations: int = SINKHORN_ITERATIONS, eps: float = SINKHORN_TOLERANCE
) -> torch.Tensor:
    """The released iteration verbatim: both sums taken before either division, and applied to the signed
    cosine matrix. It does not converge: on real photographs its rows end millions away from 1
    (docs/method.md); kept as the default because it is what produced the published PGS numbers."""
    for _ in range(iterations):
        sum_1 = matrix.sum(dim=1, keepdim=True)
        sum_2 = matrix.sum(dim=2, keepdim=True)
        ones_1, ones_2 = torch.ones_like(sum_1), torch.ones_like(sum_2)
        if torch.allclose(sum_1, ones_1, atol=eps) and torch.allclose(sum_2, ones_2, atol=eps):
            break
        matrix = matrix / (sum_1 + eps)
        matrix = matrix / (sum_2 + eps)
    return matrix


def sinkhorn(
    matrix: torch.Tensor, iterations: int = SINKHORN_ITERATIONS, tol: float = SINKHORN_TOLERANCE
) -> torch.Tensor:
    """The paper's reading: Sinkhorn–Knopp on the non-negative part of the similarity (no transport between
    dissimilar patches), rows then columns with fresh sums, until every row and column sums to 1 within
    ``tol``. The diagonal (self-similarity 1) keeps every row and column positive."""
    plan = matrix.clamp_min(0)
    for _ in range(iterations):
        plan = plan / plan.sum(dim=2, keepdim=True).clamp_min(NORM_EPS)
        plan = plan / plan.sum(dim=1, keepdim=True).clamp_min(NORM_EPS)
        if (plan.sum(dim=2) - 1).abs().max() < tol:  # columns are exact after the column step
            break
    return plan


def transport_normalize(matrix: torch.Tensor, behaviour: str) -> torch.Tensor:
    """S + Sinkhorn(S) (``released`` or ``paper`` iteration), or S unchanged (``none``)."""
    _check_behaviour("pgs_otn", behaviour)
    if behaviour == "none":
        return matrix
    return matrix + (sinkhorn_released if behaviour == "released" else sinkhorn)(matrix)


# ------------------------------------------------------------------------------------------ edge prior
def _sobel_magnitude(gray: torch.Tensor) -> torch.Tensor:
    kernels = torch.stack([_SOBEL_X, _SOBEL_Y]).unsqueeze(1).to(gray)
    grad = F.conv2d(gray, kernels, padding=1)
    return grad.square().sum(dim=1).sqrt()  # (B, H, W)


def _min_max(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return (flat - low) / (high - low + NORM_EPS)


def edge_map(
    behaviour: str, images: torch.Tensor, pixels: torch.Tensor, grid: tuple[int, int], patch: int
) -> torch.Tensor | None:
    """The Sobel edge prior per patch, min-max normalised to [0, 1] per image: (B, L), or None (``none``).

    ``released``: the Sobel filter on the grid of per-patch means of the *normalised* pixel patches
    (``pixels``), which are zero up to rounding, so the map is rounding noise. ``paper``: the Sobel
    magnitude of the input image's grey level at full resolution, averaged over each patch."""
    _check_behaviour("pgs_edge", behaviour)
    if behaviour == "none":
        return None
    if behaviour == "released":
        gray = pixels.mean(dim=-1).view(-1, 1, *grid)
        return _min_max(_sobel_magnitude(gray))
    magnitude = _sobel_magnitude(images.mean(dim=1, keepdim=True))
    return _min_max(F.avg_pool2d(magnitude.unsqueeze(1), patch))


# ----------------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Selection:
    """What was chosen for a batch: ``keep`` (B, K) kept patch indices (unflagged first, then flagged);
    ``flagged`` (B, L) the patches of the grown clusters; ``seeds`` (B, S) the candidate seeds."""

    keep: torch.Tensor
    flagged: torch.Tensor
    seeds: torch.Tensor


def seed_count(num_patches: int, seed_ratio: float) -> int:
    """Candidate seeds per image: L − int(L·(1 − ratio)) (the released code's ``--force-patch-dropout``)."""
    return num_patches - int(num_patches * (1 - seed_ratio))


def max_kept(num_patches: int, min_mask_ratio: float) -> int:
    """The cap on kept patch tokens: ⌊L·(1 − min mask ratio)⌋, at least 1."""
    return max(1, int(num_patches * (1 - min_mask_ratio)))


def select_patches(
    sim: torch.Tensor,
    edge: torch.Tensor | None,
    edge_behaviour: str,
    seed_ratio: float,
    threshold: float,
    min_mask_ratio: float,
) -> Selection:
    """Steps 4–6 on the normalised similarity ``sim`` (B, L, L) and the edge prior ``edge`` (B, L) or None.

    ``released`` edge prior: noise + 10⁶·edge, and the highest keys become seeds, so the highest-"edge"
    patches seed the masked clusters; ``paper``: noise + 10⁶·(1 − edge), so the lowest-edge patches seed
    them and high-edge (object) patches are protected. K = min(⌊L(1 − r)⌋, L − fewest flagged in the
    batch [+ int(smallest edge sum) with an edge prior, as released]), at least 1 (an avg-pooled tower
    needs a token). Unflagged patches share the sort key 0 and keep their grid order (a stable sort), so an
    image with more unflagged patches than K loses the last ones in raster order; the released unstable
    ``argsort`` leaves the order of these ties to the sort implementation (docs/method.md)."""
    batch, num_patches, _ = sim.shape
    noise = torch.rand(batch, num_patches, device=sim.device)
    if edge is not None:
        noise = noise + EDGE_WEIGHT * (edge if edge_behaviour == "released" else 1 - edge)
    seeds = noise.argsort(dim=1)[:, num_patches - seed_count(num_patches, seed_ratio) :]
    to_seeds = torch.gather(sim, 1, seeds.unsqueeze(-1).expand(-1, -1, num_patches))  # (B, S, L)
    flagged = (to_seeds > threshold).any(dim=1)
    cutoff = torch.exp(torch.rand(batch, num_patches, device=sim.device)) * flagged
    order = cutoff.argsort(dim=-1, stable=True)
    room = num_patches - int(flagged.sum(dim=-1).min())
    if edge is not None:
        room += int(edge.sum(dim=-1).min())
    keep = order[:, : max(1, min(max_kept(num_patches, min_mask_ratio), room))]
    return Selection(keep=keep, flagged=flagged, seeds=seeds)


def attention_bias(behaviour: str, selection: Selection, heads: int, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive attention term over [CLS, kept tokens], shaped (B·heads, K+1, K+1) as
    ``nn.MultiheadAttention`` takes it, or None (``none``).

    ``released``: the released code's "mask" arrives in ``nn.MultiheadAttention`` as a float 0/1 tensor, so
    it is +1 on the logits between two unflagged tokens (CLS counts as unflagged), and it is tiled with
    ``repeat`` where the batch-major layout needs ``repeat_interleave``: head h of image b gets the term of
    image (b·heads + h) mod B, as released. ``paper``: kept flagged tokens (there only to give every image
    the same K) are hidden as keys (−inf), each image with its own term; CLS is never hidden, so no row is
    empty."""
    _check_behaviour("pgs_attention", behaviour)
    if behaviour == "none":
        return None
    kept_flagged = torch.gather(selection.flagged, 1, selection.keep)
    cls = torch.zeros_like(kept_flagged[:, :1])
    free = ~torch.cat([cls, kept_flagged], dim=1)  # (B, K+1)
    if behaviour == "released":
        return (free.unsqueeze(2) & free.unsqueeze(1)).to(dtype).repeat(heads, 1, 1)
    bias = torch.zeros(*free.shape, free.shape[1], dtype=dtype, device=free.device)
    bias.masked_fill_(~free.unsqueeze(1), float("-inf"))
    return bias.repeat_interleave(heads, dim=0)
