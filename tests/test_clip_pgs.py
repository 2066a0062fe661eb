"""clip-pgs: the selection (pgs_select) on real photographs (scikit-image's sample images) and by hand, the
method's training forward, and two CPU steps through the loop with a reloadable checkpoint."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_flip import (
    assert_reloads_for_evaluation,
    batch_of,
    build_method,
    raw_shards,
    tokens_reaching_transformer,
    train_two_steps,
)  # noqa: F401

from powerclip.methods import pgs_select as P
from powerclip.methods.token_drop import seed_draws

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "camera")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """scikit-image's sample photographs, centre-cropped, resized to 224 px and normalised as CLIP's input."""
    from skimage import data, transform

    out = []
    for name in PHOTOS:
        image = getattr(data, name)()
        image = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]
        h, w = image.shape[:2]
        side = min(h, w)
        image = image[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
        out.append(
            torch.tensor(transform.resize(image, (224, 224), anti_aliasing=True), dtype=torch.float32).permute(2, 0, 1)
        )
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (torch.stack(out) - mean) / std


def pixel_patches(images: torch.Tensor, patch: int = 16) -> torch.Tensor:
    return P.normalize_patches(P.patchify(images, patch))


# ----------------------------------------------------------------------------------- the edge prior
def test_the_released_edge_map_is_rounding_noise_uncorrelated_with_edges(photos):
    """The released map filters per-patch means of normalised patches, which are 0 up to rounding: it is
    uncorrelated with the image's edges and changes with the float precision (docs/method.md has the
    numbers)."""
    pixels = pixel_patches(photos)
    assert float(pixels.mean(dim=-1).abs().max()) < 1e-4
    released = P.edge_map("released", photos, pixels, (14, 14), 16)
    paper = P.edge_map("paper", photos, pixels, (14, 14), 16)
    released64 = P.edge_map("released", photos.double(), pixel_patches(photos.double()), (14, 14), 16)
    with_edges = [spearmanr(released[i], paper[i]).statistic for i in range(len(PHOTOS))]
    with_itself = [spearmanr(released[i], released64[i]).statistic for i in range(len(PHOTOS))]
    assert abs(np.mean(with_edges)) < 0.3
    assert np.mean(with_itself) < 0.8  # the same formula in float64 gives another map
    assert float(paper.min()) == 0.0 and float(paper.max()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("edge", ["released", "paper"])
def test_the_edge_prior_decides_the_seeds_as_the_chosen_behaviour_says(photos, edge):
    """released: the highest values of its map seed the masked clusters; paper: the lowest-edge patches
    do, so high-edge (object) patches are never seeds."""
    pixels = pixel_patches(photos)
    prior = P.edge_map(edge, photos, pixels, (14, 14), 16)
    sim = P.similarity(torch.zeros(len(PHOTOS), 196, 8), pixels, 0.0)
    torch.manual_seed(0)
    selection = P.select_patches(sim, prior, edge, 0.05, 0.5, 0.3)
    n_seeds = P.seed_count(196, 0.05)
    assert selection.seeds.shape == (len(PHOTOS), n_seeds) == (len(PHOTOS), 10)
    expected = prior.topk(n_seeds, dim=1, largest=edge == "released").indices
    for got, want in zip(selection.seeds, expected):
        assert set(got.tolist()) == set(want.tolist())
    if edge == "paper":
        top_edges = prior.topk(98, dim=1).indices  # the upper half of each image's edge map
        assert not any(set(s.tolist()) & set(t.tolist()) for s, t in zip(selection.seeds, top_edges))


# ---------------------------------------------------------------------------------- transport
def test_sinkhorn_makes_rows_and_columns_sum_to_one(photos):
    torch.manual_seed(0)
    for weight in (0.0, 0.5, 1.0):
        sim = P.similarity(torch.randn(len(PHOTOS), 196, 32), pixel_patches(photos), weight)
        plan = P.sinkhorn(sim)
        assert float((plan.sum(dim=2) - 1).abs().max()) < 1e-3
        assert float((plan.sum(dim=1) - 1).abs().max()) < 1e-3
        assert float(plan.min()) >= 0


def test_the_released_iteration_does_not_converge_on_real_images(photos):
    """Signed cosines and stale sums: its rows end far from 1 (what the default reproduces)."""
    sim = P.similarity(torch.zeros(len(PHOTOS), 196, 8), pixel_patches(photos), 0.0)
    assert float((P.sinkhorn_released(sim).sum(dim=2) - 1).abs().max()) > 10
    assert torch.equal(P.transport_normalize(sim, "none"), sim)


# ----------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("num_patches, seed_ratio", [(16, 0.25), (196, 0.02)])  # 4 seeds
def test_selection_keeps_a_common_number_with_unflagged_patches_first(num_patches, seed_ratio):
    """Two clusters of similar patches and loners, by hand: flagged = the clusters of the seeds; K as released."""
    L, size = num_patches, num_patches * 3 // 8
    cluster = torch.tensor([0] * size + [1] * size + list(range(2, L - 2 * size + 2)))
    sim = (cluster[:, None] == cluster[None, :]).float().expand(3, L, L).clone()
    for r in (0.0, 0.3, 0.5):
        torch.manual_seed(1)
        s = P.select_patches(sim, None, "none", seed_ratio, 0.5, r)
        assert s.seeds.shape == (3, P.seed_count(L, seed_ratio)) == (3, 4)
        seeded = cluster[s.seeds]
        for b in range(3):
            assert torch.equal(s.flagged[b], torch.isin(cluster, seeded[b]))
        k = min(P.max_kept(L, r), L - int(s.flagged.sum(dim=1).min()))
        assert s.keep.shape == (3, k)
        for b in range(3):
            free = (~s.flagged[b]).nonzero().flatten()
            n_free = min(len(free), k)
            assert torch.equal(s.keep[b, :n_free], free[:n_free])  # unflagged first, in grid order
            assert bool(s.flagged[b, s.keep[b, n_free:]].all())
            assert len(set(s.keep[b].tolist())) == k


def test_selection_is_deterministic_for_a_seed_and_varies_across_seeds(photos):
    sim = P.transport_normalize(P.similarity(torch.zeros(len(PHOTOS), 196, 8), pixel_patches(photos), 0.0), "paper")

    def keep(seed):
        seed_draws(seed, 0)
        return P.select_patches(sim, None, "none", 0.05, 0.5, 0.3).keep

    assert torch.equal(keep(0), keep(0))
    assert not torch.equal(keep(0), keep(1))
    assert keep(0).shape[1] <= int(196 * 0.7)


def test_attention_terms():
    """released: +1 between unflagged tokens (CLS included), tiled with repeat as released; paper: kept
    flagged tokens hidden as keys, each image its own term."""
    flagged = torch.tensor([[False, True, False, True], [True, True, False, False]])
    selection = P.Selection(keep=torch.tensor([[0, 2, 1], [1, 2, 3]]), flagged=flagged, seeds=torch.empty(2, 0))
    released = P.attention_bias("released", selection, heads=3, dtype=torch.float32)
    free = torch.tensor([[1.0, 1, 1, 0], [1, 0, 1, 1]])  # CLS, then the kept patches' "unflagged"
    assert released.shape == (6, 4, 4)
    for index in range(6):  # nn.MultiheadAttention reads index b * heads + h; released gives image index % B
        b = index % 2
        assert torch.equal(released[index], free[b][:, None] * free[b][None, :])
    paper = P.attention_bias("paper", selection, heads=3, dtype=torch.float32)
    for index in range(6):
        b = index // 3
        assert bool(torch.isinf(paper[index][:, free[b] == 0]).all())
        assert bool((paper[index][:, free[b] == 1] == 0).all())
    assert P.attention_bias("none", selection, heads=3, dtype=torch.float32) is None


def test_the_paper_term_gives_each_image_its_own_attention():
    """Through the tower's transformer, an image of a batch gets what it gets alone."""
    method = build_method("clip-pgs", "--pgs-attention", "paper", "--pgs-edge", "paper", "--pgs-threshold", "0")
    method.train()
    transformer = method.model.visual.transformer
    heads = transformer.resblocks[0].attn.num_heads
    images = batch_of()["image"]
    seed_draws(0, 0)
    tokens = torch.randn(4, 64, transformer.width)
    selection, bias = method.select(images, tokens)
    x = torch.cat(
        [
            torch.zeros(4, 1, transformer.width),
            torch.gather(tokens, 1, selection.keep[..., None].expand(-1, -1, transformer.width)),
        ],
        1,
    )
    with torch.no_grad():
        together = transformer(x, attn_mask=bias)
        for b in range(4):
            own = P.Selection(selection.keep[b : b + 1], selection.flagged[b : b + 1], selection.seeds[b : b + 1])
            alone = transformer(x[b : b + 1], attn_mask=P.attention_bias("paper", own, heads, x.dtype))
            torch.testing.assert_close(together[b : b + 1], alone)
    assert bool(torch.isinf(bias).any())  # some kept tokens are flagged: the term is not empty


# ----------------------------------------------------------------------------------- the method
@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("behaviour", ["released", "paper", "none"])
def test_at_most_the_cap_reaches_the_transformer_in_training_and_all_in_evaluation(ratio, behaviour):
    options = ["--pgs-min-mask-ratio", str(ratio)] + [f"--pgs-{k}={behaviour}" for k in ("edge", "otn", "attention")]
    method = build_method("clip-pgs", *options)
    batch = batch_of(8)
    seen = []
    hook = method.model.visual.transformer.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].shape[1]))
    method.train()
    for step in (0, 5):  # pixel similarity only, then half embedding
        method.set_progress(step, 8)
        out = method(batch)
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
    method.eval()
    with torch.no_grad():
        method.encode_image(batch["image"])
    hook.remove()
    assert all(1 < n <= int(64 * (1 - ratio)) + 1 for n in seen[:2]) and seen[2] == 65
    assert float(out["mask_ratio"]) == pytest.approx(1 - (seen[1] - 1) / 64)


def test_the_similarity_moves_from_pixels_to_embeddings_by_epoch():
    method = build_method("clip-pgs")  # 2 epochs
    weights = []
    for step in range(8):
        method.set_progress(step, 8)
        weights.append(method.embedding_weight)
    assert weights == [0.0] * 4 + [0.5] * 4  # the released epoch / 32 at 32 epochs


def test_clip_pgs_trains_two_steps_through_the_loop_and_reloads(raw_shards, tmp_path, monkeypatch):
    from powerclip.methods.clip_pgs import ClipPgsMethod

    calls = []
    original = ClipPgsMethod.set_progress
    monkeypatch.setattr(
        ClipPgsMethod,
        "set_progress",
        lambda self, step, total: calls.append((step, total)) or original(self, step, total),
    )
    rows = train_two_steps(raw_shards, tmp_path, "clip-pgs", "--pgs-min-mask-ratio", "0.5")
    assert calls == [(0, 2), (1, 2)]  # the loop tells the method where it is
    assert all(float(r["mask_ratio"]) >= 0.5 and float(r["loss"]) > 0 for r in rows)
    loaded = assert_reloads_for_evaluation(tmp_path, "clip-pgs", "--pgs-min-mask-ratio", "0.5")
    assert loaded.powerclip_cfg["create_kwargs"] == {}  # a stock open_clip model
