"""flip: open_clip's patch dropout in training only, tokens really removed; trains through the loop and its
checkpoint rebuilds for evaluation with every token. Also the helpers test_clip_pgs.py shares."""

import csv

import pytest
import torch
from test_train import train_argv

from powerclip.synthetic import ShapesConfig, write_shard

MODEL = "PowerCLIP-Tiny-64-8"  # 64 px, patch 8: L = 64 patch tokens


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory):
    """Two shapes shards of 16 samples, no sidecars (the token-dropping methods read none)."""
    root = tmp_path_factory.mktemp("raw")
    for i in range(2):
        write_shard(root / "shards" / f"{i:05d}.tar", f"{i:05d}", i, 16, seed=0, config=ShapesConfig())
    return root


def method_args(method: str, *extra: str):
    """The trainer's arguments for ``method`` on the tiny model (schema defaults for everything else)."""
    from powerclip.train_params import parse_args

    return parse_args(["--train-data", "x.tar", "--checkpoint", "c", "--work-dir", "w", "--model", MODEL,
                       "--batch-size", "4", "--epochs", "2", "--samples-per-epoch", "8", "--lr", "1e-3",
                       "--method", method, *extra])  # fmt: skip


def build_method(method: str, *extra: str):
    from powerclip.methods import method_class

    args = method_args(method, *extra)
    cls = method_class(method)
    return cls.from_args(cls.build_model(args), args)


def tokens_reaching_transformer(model, images: torch.Tensor) -> list[int]:
    """Sequence lengths (CLS included) entering the image tower's transformer during ``encode_image``."""
    seen: list[int] = []
    hook = model.visual.transformer.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[1]))
    try:
        with torch.no_grad():
            model.encode_image(images)
    finally:
        hook.remove()
    return seen


def batch_of(n: int = 4, size: int = 64) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"image": torch.randn(n, 3, size, size, generator=generator),
            "text": torch.randint(1, 49000, (n, 77), generator=generator)}  # fmt: skip


def train_two_steps(raw_shards, tmp_path, method: str, *extra: str) -> list[dict]:
    """Two CPU steps through powerclip.train.main (no sidecars); the rows of metrics.csv."""
    from powerclip.train import main

    argv = train_argv(raw_shards, tmp_path, "--method", method, *extra)
    i = argv.index("--phrases-dir")
    del argv[i : i + 4]
    assert main(argv)["steps"] == 2
    return list(csv.DictReader((tmp_path / "metrics.csv").open()))


def assert_reloads_for_evaluation(tmp_path, method: str, *extra: str):
    """The checkpoint rebuilds in the evaluation loader: same embeddings as the method's own model
    with the trained weights, in eval mode, and every patch token reaches the transformer."""
    from powerclip.evaluation.loader import load_powerclip
    from powerclip.methods import method_class
    from powerclip.model import load_model

    path = tmp_path / "checkpoint.pt"
    loaded, _, _ = load_powerclip(pretrained=str(path))
    trained = method_class(method).build_model(method_args(method, *extra))
    trained.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    trained.eval()
    batch = batch_of()
    with torch.no_grad():
        for other in (loaded, load_model(path).eval()):
            assert torch.equal(other.encode_image(batch["image"]), trained.encode_image(batch["image"]))
            assert torch.equal(other.encode_text(batch["text"]), trained.encode_text(batch["text"]))
    assert tokens_reaching_transformer(loaded, batch["image"]) == [65]
    return loaded


@pytest.mark.parametrize("prob", [0.5, 0.75, 0.3])
def test_flip_keeps_int_l_times_one_minus_p_tokens_in_training_and_all_in_evaluation(prob):
    method = build_method("flip", "--patch-dropout", str(prob))
    images = batch_of()["image"]
    method.train()
    assert tokens_reaching_transformer(method.model, images) == [int(64 * (1 - prob)) + 1]
    _, dropped = method.encode_image(images)
    assert dropped == pytest.approx(1 - int(64 * (1 - prob)) / 64)
    method.eval()
    assert tokens_reaching_transformer(method.model, images) == [65]
    assert method.encode_image(images)[1] == 0.0


def kept_patch_indices(method, images: torch.Tensor) -> torch.Tensor:
    """(B, K) sorted indices of the embedded patches that leave the patch dropout module; checks that CLS
    comes first unchanged and that every other token is one embedded patch (dropped, not masked)."""
    dropout = method.model.visual.patch_dropout
    seen = []
    hook = dropout.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    try:
        with torch.no_grad():
            method.encode_image(images)
    finally:
        hook.remove()
    ((full, kept),) = seen
    assert torch.equal(kept[:, 0], full[:, 0])
    same = (kept[:, 1:, None, :] == full[:, None, 1:, :]).all(dim=-1)  # (B, K, L)
    assert bool((same.sum(dim=-1) == 1).all())
    return same.float().argmax(dim=-1).sort(dim=-1).values


def test_flip_drops_a_random_subset_and_keeps_cls():
    """CLS plus a random subset of the embedded patches, drawn anew each step."""
    method = build_method("flip")
    method.train()
    images = batch_of()["image"]
    first, second = kept_patch_indices(method, images), kept_patch_indices(method, images)
    assert all(len(set(row.tolist())) == 32 for row in first)
    assert not torch.equal(first, second)


def test_flip_masks_follow_the_run_seed():
    def masks(seed):
        method = build_method("flip", "--seed", str(seed))
        method.train()
        return kept_patch_indices(method, batch_of()["image"])

    assert torch.equal(masks(0), masks(0))
    assert not torch.equal(masks(0), masks(1))


def test_flip_trains_two_steps_and_reloads_with_every_token(raw_shards, tmp_path):
    rows = train_two_steps(raw_shards, tmp_path, "flip", "--patch-dropout", "0.5")
    assert [float(r["mask_ratio"]) for r in rows] == [0.5, 0.5]
    assert all(float(r["loss"]) == float(r["contrastive_loss"]) > 0 for r in rows)
    loaded = assert_reloads_for_evaluation(tmp_path, "flip", "--patch-dropout", "0.5")
    assert loaded.visual.patch_dropout.prob == 0.5  # rebuilt as trained, inactive in eval mode
    assert loaded.powerclip_cfg["create_kwargs"] == {"force_patch_dropout": 0.5}
