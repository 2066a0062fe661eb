"""powerclip.model: pools, token features on the global pooling path, gather_mean, checkpoints.

Parameter counts (random init, open_clip 3.3.0), asserted in ``test_tiny_configs_build``:
  PowerCLIP-Tiny-64-8   3,526,881 total = 255,648 vision + 3,271,232 text + 1 logit_scale
  PowerCLIP-Tiny-224-16 3,594,849 total = 323,616 vision + 3,271,232 text + 1 logit_scale
(the text tower is mostly the 49408 x 64 token embedding).
"""

from __future__ import annotations

import json

import open_clip
import open_clip.model as oc_model
import open_clip.transformer as oc_transformer
import pytest
import torch

from powerclip import model as pm

TINY = "PowerCLIP-Tiny-224-16"  # the paper's 14x14 grid
FAST = "PowerCLIP-Tiny-64-8"  # the CPU demo model, 8x8 grid
CAPTIONS = ["a red square", "a small blue circle to the left of a large green triangle on a white table"]


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return pm.create_model(TINY, seed=0).eval()


@pytest.fixture(scope="module")
def text() -> torch.Tensor:
    return open_clip.get_tokenizer(TINY)(CAPTIONS)


def images(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = model.visual.image_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("name", "total", "vision", "grid"),
    [(FAST, 3_526_881, 255_648, 8), (TINY, 3_594_849, 323_616, 14)],
    ids=["tiny-64-8-3.53M", "tiny-224-16-3.59M"],
)
def test_tiny_configs_build(name: str, total: int, vision: int, grid: int) -> None:
    assert name in pm.register_model_configs()
    model = pm.create_model(name, seed=0)
    assert isinstance(model, oc_model.CLIP)
    assert model.visual.pool_type == "avg" and model.text_pool_type == "avg"
    assert model.visual.grid_size == (grid, grid)
    assert model.visual.transformer.resblocks[0].attn.num_heads == 3  # width 96 / head_width 32
    counts = pm.count_parameters(model)
    assert (counts["total"], counts["vision"]) == (total, vision)
    assert model.powerclip_cfg["model_name"] == name
    assert model.powerclip_cfg["model_cfg"] == open_clip.get_model_config(name)
    assert (model.powerclip_cfg["vision_pool"], model.powerclip_cfg["text_pool"]) == ("avg", "avg")


def test_register_and_install_are_idempotent() -> None:
    paths_before = len(open_clip.factory._MODEL_CONFIG_PATHS)
    pm.register_model_configs()
    pm.install_text_avg_pool()
    pm.install_text_avg_pool()
    assert len(open_clip.factory._MODEL_CONFIG_PATHS) == paths_before
    wrapper = oc_model.text_global_pool
    assert wrapper is oc_transformer.text_global_pool  # one wrapper shared by both modules
    assert getattr(wrapper, "_powerclip_avg", False)
    assert not getattr(wrapper.__wrapped__, "_powerclip_avg", False)  # wraps the original, not itself


def test_pool_wrapper_delegates_other_pool_types() -> None:
    pm.install_text_avg_pool()
    original = oc_model.text_global_pool.__wrapped__
    x = torch.randn(2, 6, 4)
    text = torch.tensor([[49406, 5, 49407, 0, 0, 0], [49406, 7, 8, 9, 49407, 0]])
    for pool in ("argmax", "first", "last", "none"):
        assert torch.equal(oc_model.text_global_pool(x, text, pool), original(x, text, pool_type=pool))
    assert torch.equal(
        oc_model.text_global_pool(x, text, "eos", eos_token_id=49407),
        original(x, text, pool_type="eos", eos_token_id=49407),
    )
    torch.testing.assert_close(oc_model.text_global_pool(x, text, "avg")[0], x[0, :3].mean(0))
    torch.testing.assert_close(oc_model.text_global_pool(x, text, "avg")[1], x[1, :5].mean(0))


def test_global_image_feature_is_whole_grid_region(tiny: torch.nn.Module) -> None:
    imgs = images(tiny)
    with torch.no_grad():
        pooled, tokens = pm.encode_image_tokens(tiny, imgs)
        reference = tiny.encode_image(imgs)
    assert tokens.shape == (2, 196, 64)  # no CLS, joint space
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, tokens.mean(1), rtol=1e-5, atol=1e-5)
    everything = torch.arange(196).expand(2, 1, 196)
    region, valid = pm.gather_mean(tokens, everything, torch.ones_like(everything, dtype=torch.bool))
    assert valid.all()
    torch.testing.assert_close(region[:, 0], pooled, rtol=1e-5, atol=1e-5)


def test_global_text_feature_is_whole_caption_phrase(tiny: torch.nn.Module, text: torch.Tensor) -> None:
    with torch.no_grad():
        pooled, states = pm.encode_text_tokens(tiny, text)
        reference = tiny.encode_text(text)
    assert states.shape == (2, 77, 64)
    torch.testing.assert_close(pooled, reference, rtol=0, atol=1e-6)
    lengths = (text != 0).sum(1)  # SOT..EOT inclusive
    assert text[0, 0] == pm.SOT_TOKEN_ID and text[0, lengths[0] - 1] == pm.EOT_TOKEN_ID
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(pooled[b], states[b, :n].mean(0), rtol=1e-5, atol=1e-5)
    positions = torch.arange(77).expand(2, 1, 77)
    phrase, valid = pm.gather_mean(states, positions, (text != 0)[:, None, :])
    assert valid.all()
    torch.testing.assert_close(phrase[:, 0], pooled, rtol=1e-5, atol=1e-5)


def test_padding_does_not_leak(tiny: torch.nn.Module, text: torch.Tensor) -> None:
    short_alone = text[:1]
    with torch.no_grad():
        alone = tiny.encode_text(short_alone)
        batched = tiny.encode_text(text)
        alone_tokens, _ = pm.encode_text_tokens(tiny, short_alone)
    assert (text[0] == 0).sum() > (text[1] == 0).sum()  # the short caption carries more padding
    torch.testing.assert_close(batched[:1], alone, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(alone_tokens, alone, rtol=0, atol=1e-6)
    # An average that included padding would move when the context grows; ours does not see it at all.
    states = torch.randn(1, 77, 64)
    states_changed = states.clone()
    assert (short_alone != 0).sum() == 5  # SOT a red square EOT
    states_changed[0, 5:40] = float("nan")
    states_changed[0, 40:] = 1e6
    torch.testing.assert_close(
        pm.masked_token_mean(states_changed, short_alone), pm.masked_token_mean(states, short_alone)
    )


def test_cls_and_argmax_pools_delegate_and_differ(tiny: torch.nn.Module, text: torch.Tensor) -> None:
    model = pm.create_model(TINY, vision_pool="cls", text_pool="argmax", seed=0).eval()
    assert model.visual.pool_type == "tok" and model.text_pool_type == "argmax"
    imgs = images(model)
    with torch.no_grad():
        pooled, tokens = pm.encode_image_tokens(model, imgs)
        torch.testing.assert_close(pooled, model.encode_image(imgs), rtol=0, atol=1e-6)
        assert tokens.shape == (2, 196, 64)
        assert not torch.allclose(pooled, tokens.mean(1), atol=1e-3)
        assert not torch.allclose(pooled, tiny.encode_image(imgs), atol=1e-3)  # same weights (seed 0)
        tpooled, states = pm.encode_text_tokens(model, text)
        eot = text.argmax(-1)
        torch.testing.assert_close(tpooled, states[torch.arange(2), eot], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tpooled, model.encode_text(text), rtol=0, atol=1e-6)
        assert not torch.allclose(tpooled, tiny.encode_text(text), atol=1e-3)


def test_custom_text_clip_avg_pool(text: torch.Tensor) -> None:
    model = pm.create_model(FAST, seed=0, force_custom_text=True).eval()
    assert isinstance(model, oc_model.CustomTextCLIP) and model.text.pool_type == "avg"
    with torch.no_grad():
        pooled, states = pm.encode_text_tokens(model, text)
        torch.testing.assert_close(pooled, model.encode_text(text), rtol=0, atol=1e-6)
        torch.testing.assert_close(pooled, pm.masked_token_mean(states, text), rtol=1e-5, atol=1e-5)


def test_gather_mean_hand_example_and_gradients() -> None:
    tokens = torch.arange(12.0).reshape(1, 4, 3).requires_grad_(True)  # token j = [3j, 3j+1, 3j+2]
    index = torch.tensor([[[0, 2, -1], [3, 3, 1], [-1, -1, -1]]])
    mask = torch.tensor([[[True, True, False], [True, True, True], [False, False, False]]])
    features, valid = pm.gather_mean(tokens, index, mask)
    expected = torch.tensor([[[3.0, 4.0, 5.0], [7.0, 8.0, 9.0], [0.0, 0.0, 0.0]]])  # (t0+t2)/2, (2*t3+t1)/3
    torch.testing.assert_close(features, expected)
    assert valid.tolist() == [[True, True, False]]
    features[:, :2].sum().backward()
    grad = tokens.grad[0, :, 0]
    torch.testing.assert_close(grad, torch.tensor([0.5, 1 / 3, 0.5, 2 / 3]))
    # an empty row and ungathered tokens: exactly zero, finite gradient
    tokens.grad = None
    features, _ = pm.gather_mean(tokens, index[:, 2:], mask[:, 2:])
    features.sum().backward()
    assert torch.equal(tokens.grad, torch.zeros_like(tokens))
    tokens.grad = None
    features, _ = pm.gather_mean(tokens, index[:, :1], mask[:, :1])
    (features.norm() + torch.nn.functional.normalize(features, dim=-1).sum()).backward()
    assert torch.isfinite(tokens.grad).all()
    assert torch.equal(tokens.grad[0, [1, 3]], torch.zeros(2, 3))


def test_gather_mean_rejects_bad_input() -> None:
    tokens = torch.randn(2, 4, 3)
    with pytest.raises(IndexError):
        pm.gather_mean(tokens, torch.full((2, 1, 1), 4), torch.ones(2, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError):
        pm.gather_mean(tokens, torch.zeros(2, 1, 1, dtype=torch.long), torch.ones(2, 1, 2, dtype=torch.bool))
    empty, valid = pm.gather_mean(
        tokens, torch.zeros(2, 0, 3, dtype=torch.long), torch.zeros(2, 0, 3, dtype=torch.bool)
    )
    assert empty.shape == (2, 0, 3) and valid.shape == (2, 0)


def test_grad_checkpointing_and_autocast(text: torch.Tensor) -> None:
    model = pm.create_model(FAST, seed=0).train()
    imgs = images(model)

    def run() -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = pm.forward_features(model, imgs, text)
        loss = sum(v.float().sum() for k, v in out.items() if k != "logit_scale")
        loss.backward()
        return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain, plain_grads = run()
    model.set_grad_checkpointing(True)
    checkpointed, ckpt_grads = run()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=0, atol=0)
    assert len(plain_grads) == len(ckpt_grads)
    for a, b in zip(plain_grads, ckpt_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pm.forward_features(model, imgs, text)
    assert torch.isfinite(out["patch_tokens"].float()).all()
    torch.testing.assert_close(
        out["image_features"].float(), out["patch_tokens"].float().mean(1), rtol=0.05, atol=0.05
    )


def test_forward_features_keys(tiny: torch.nn.Module, text: torch.Tensor) -> None:
    with torch.no_grad():
        out = pm.forward_features(tiny, images(tiny), text)
    assert set(out) == {"image_features", "text_features", "patch_tokens", "token_states", "logit_scale"}
    torch.testing.assert_close(out["logit_scale"], tiny.logit_scale.exp())
    from powerclip.methods.clip import ClipMethod

    method = ClipMethod(tiny, loss=None)
    assert pm.unwrap_model(torch.nn.DataParallel(method)) is tiny


def test_seeded_create_model_is_reproducible() -> None:
    rng_before = torch.get_rng_state()
    a = pm.create_model(FAST, seed=3).state_dict()
    b = pm.create_model(FAST, seed=3).state_dict()
    c = pm.create_model(FAST, seed=4).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)  # fork_rng: the caller's stream is untouched
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])


@pytest.mark.parametrize(("vision_pool", "text_pool"), [("avg", "avg"), ("cls", "argmax")])
def test_checkpoint_round_trip(tmp_path, text: torch.Tensor, vision_pool: str, text_pool: str) -> None:
    model = pm.create_model(TINY, vision_pool=vision_pool, text_pool=text_pool, seed=5).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # a non-initial value must survive too
    path = pm.save_checkpoint(tmp_path / "run" / "checkpoint.pt", model, step=7, note="x")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp left
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 7 and raw["note"] == "x"
    for source in (path, raw):
        loaded = pm.load_model(source).eval()
        assert loaded.powerclip_cfg == model.powerclip_cfg
        assert (loaded.visual.pool_type, loaded.text_pool_type) == (
            model.visual.pool_type,
            model.text_pool_type,
        )
        imgs = images(model)
        with torch.no_grad():
            assert torch.equal(loaded.encode_image(imgs), model.encode_image(imgs))
            assert torch.equal(loaded.encode_text(text), model.encode_text(text))
            assert torch.equal(loaded.logit_scale, model.logit_scale)


def test_load_model_rebuilds_an_unregistered_config(tmp_path, text: torch.Tensor) -> None:
    """A checkpoint carries its model config, so it loads where the config was never registered."""
    name = "PowerCLIPTest-Gone"
    cfg_file = tmp_path / f"{name}.json"
    cfg_file.write_text(json.dumps(open_clip.get_model_config(FAST)))
    open_clip.add_model_config(cfg_file)
    model = pm.create_model(name, seed=8).eval()
    path = pm.save_checkpoint(tmp_path / "ckpt.pt", model)
    cfg_file.unlink()  # the config disappears from the registry (rescans skip missing files)
    open_clip.factory._MODEL_CONFIGS.pop(name)
    assert open_clip.get_model_config(name) is None
    loaded = pm.load_model(path).eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(text), model.encode_text(text))


def test_load_model_rejects_plain_state_dict(tmp_path) -> None:
    torch.save(pm.create_model(FAST, seed=0).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(KeyError, match="load_openclip_checkpoint"):
        pm.load_model(tmp_path / "plain.pt")


@pytest.mark.parametrize("layout", ["plain", "wrapped-module-prefix"])
def test_load_openclip_checkpoint_forces_avg_pools(tmp_path, text: torch.Tensor, layout: str) -> None:
    released = pm.create_model(FAST, vision_pool="cls", text_pool="argmax", seed=6).eval()
    state = released.state_dict()
    if layout == "plain":
        payload = state
    else:  # what open_clip_train writes from a DDP run
        payload = {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(payload, tmp_path / "released.pt")
    model = pm.load_openclip_checkpoint(FAST, str(tmp_path / "released.pt")).eval()
    assert (model.visual.pool_type, model.text_pool_type) == ("avg", "avg")
    assert model.powerclip_cfg["vision_pool"] == "avg" and model.powerclip_cfg["text_pool"] == "avg"
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    with torch.no_grad():
        pooled, states = pm.encode_text_tokens(model, text)
        torch.testing.assert_close(pooled, pm.masked_token_mean(states, text), rtol=1e-5, atol=1e-5)


def test_unsupported_configs_are_refused() -> None:
    vision_cfg = dict(open_clip.get_model_config(FAST)["vision_cfg"], final_ln_after_pool=True)
    with pytest.raises(NotImplementedError, match="final_ln_after_pool"):
        pm.create_model(FAST, vision_cfg=vision_cfg)
    with pytest.raises(ValueError, match="vision_pool"):
        pm.create_model(FAST, vision_pool="mean")
    with pytest.raises(ValueError, match="text_pool"):
        pm.create_model(FAST, text_pool="eos")


def test_patch_dropout_trains_on_fewer_tokens_but_token_features_need_all(text: torch.Tensor) -> None:
    """FLIP's patch dropout is active in training only; token features (regions) refuse it there."""
    model = pm.create_model(FAST, force_patch_dropout=0.5, seed=0)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    with pytest.raises(NotImplementedError, match="patch dropout"):
        pm.encode_image_tokens(model, x)
    model.eval()
    with torch.no_grad():
        pooled, tokens = pm.encode_image_tokens(model, x)
        torch.testing.assert_close(pooled, model.encode_image(x))
    assert tokens.shape[1] == 64


def test_max_vision_pool_is_the_maximum_over_patch_tokens() -> None:
    """CLIPpy's image pooling: the maximum over the patch tokens after ln_post (no CLS), then the projection."""
    model = pm.create_model(FAST, vision_pool="max", seed=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        visual = model.visual
        hidden = visual.ln_post(visual.transformer(visual._embeds(x)))
        by_hand = hidden[:, 1:].amax(dim=1) @ visual.proj
        torch.testing.assert_close(model.encode_image(x), by_hand)
        pooled, tokens = pm.encode_image_tokens(model, x)
    torch.testing.assert_close(pooled, by_hand)
    assert model.powerclip_cfg["vision_pool"] == "max"


def test_paper_model_vit_b_16_pools() -> None:
    """The paper model: stock ViT-B-16 (149.6M params) with both pools overridden (~1 s on CPU)."""
    model = pm.create_model("ViT-B-16", seed=0).eval()
    assert (model.visual.pool_type, model.text_pool_type) == ("avg", "avg")
    assert pm.count_parameters(model)["total"] == 149_620_737
    with torch.no_grad():
        pooled, tokens = pm.encode_image_tokens(model, torch.randn(1, 3, 224, 224))
    assert tokens.shape == (1, 196, 512)
    torch.testing.assert_close(pooled, tokens.mean(1), rtol=1e-5, atol=1e-5)
