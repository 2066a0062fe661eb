"""CLIPS (powerclip.methods.clips): sub-caption sampling and the other text views, the captioner's mask and
loss, training through the real trainer, and the two towers reloaded by the evaluation loader."""

from __future__ import annotations

import csv
import random
from argparse import Namespace
from collections import Counter

import numpy as np
import pytest
import torch

from powerclip.data import (
    TEXT_REDUCTIONS,
    CaptionViews,
    DataConfig,
    SampleProcessor,
    collate,
    joined_samples,
    sentences,
    subcaption_span,
    text_views,
)
from powerclip.methods.captioner import Captioner, cross_causal_mask
from powerclip.recaptions import synthetic_recaptions
from powerclip.synthetic import ShapesConfig, write_shard

LONG = ("The image shows a kitchen. A red kettle sits on the stove! Is the window open? Yes, wide open. "
        "Three cups stand on a wooden shelf beside a small green plant in a clay pot. The floor is tiled.")  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-16")


def test_sentences_split_after_end_marks_only():
    assert sentences("  A cat.  A dog!\nWhy? no end") == ["A cat.", "A dog!", "Why?", "no end"]
    assert sentences("a small red circle, and a large blue square") == ["a small red circle, and a large blue square"]
    assert sentences("pi is 3.14 here.") == ["pi is 3.14 here."]


def test_subcaptions_are_whole_consecutive_sentences_within_the_budget_from_every_start(tokenizer):
    parts = sentences(LONG)
    lengths = [len(tokenizer.encode(p)) for p in parts]
    assert max(lengths) <= 30 and len(parts) == 6
    rng = np.random.default_rng(0)
    starts = Counter()
    for _ in range(600):
        start, end = subcaption_span(lengths, 30, rng)
        starts[start] += 1
        assert end > start and sum(lengths[start:end]) <= 30
        # maximal: the next sentence would not have fitted
        assert end == len(parts) or sum(lengths[start : end + 1]) > 30
    assert set(starts) == set(range(len(parts)))  # every sentence starts a sub-caption
    assert min(starts.values()) > 600 / len(parts) / 2  # uniformly (within a loose margin)
    # through the tokenizer, with the start and end of text: whole sentences, at most K = 32 tokens
    cfg = CaptionViews("subcaption", tokens=32, views=2)
    for seed in range(30):
        rows = text_views(LONG, cfg, tokenizer, np.random.default_rng(seed), 77)
        for row in rows:
            ids = row[row != 0].tolist()
            assert len(ids) <= 32 and ids[0] == tokenizer.sot_token_id and ids[-1] == tokenizer.eot_token_id
            text = tokenizer.decode(ids[1:-1]).strip()
            joined = [" ".join(parts[a:b]).lower() for a in range(len(parts)) for b in range(a + 1, len(parts) + 1)]
            assert any(text.replace(" ", "") == j.replace(" ", "") for j in joined), text


def test_a_sentence_longer_than_the_budget_is_truncated(tokenizer):
    long_sentence = "a " + "very " * 60 + "long sentence."
    rows = text_views(long_sentence, CaptionViews("subcaption", tokens=16), tokenizer, np.random.default_rng(0), 77)
    assert (rows != 0).sum(1).tolist() == [16, 16] and rows[:, 15].tolist() == [tokenizer.eot_token_id] * 2
    assert (rows[:, 16:] == 0).all()


@pytest.mark.parametrize("reduction", sorted(TEXT_REDUCTIONS))
def test_every_reduction_keeps_the_budget_and_is_a_function_of_its_seed(reduction, tokenizer):
    cfg = CaptionViews(reduction, tokens=20, views=2)
    random.seed(5)
    torch.manual_seed(5)
    before = (random.random(), torch.rand(1))
    random.seed(5)
    torch.manual_seed(5)
    a = text_views(LONG, cfg, tokenizer, np.random.default_rng([1, 2, 3]), 77)
    assert (random.random(), torch.rand(1)) == before  # the global generators are left as they were
    b = text_views(LONG, cfg, tokenizer, np.random.default_rng([1, 2, 3]), 77)
    assert torch.equal(a, b) and a.shape == (2, 77)
    full = tokenizer.encode(LONG)
    for row in a:
        ids = row[row != 0].tolist()
        assert ids[0] == tokenizer.sot_token_id and ids[-1] == tokenizer.eot_token_id
        assert len(ids) <= 20 if reduction == "subcaption" else len(ids) == 20  # whole sentences may leave room
        if reduction in ("random", "block", "truncate"):  # tokens of the caption, in order
            it = iter(full)
            assert all(t in it for t in ids[1:-1])
    if reduction == "truncate":
        assert a[0, 1:19].tolist() == full[:18]
    if reduction == "block":  # one contiguous run
        start = full.index(a[0, 1].item())
        assert a[0, 1:19].tolist() == full[start : start + 18]
    with pytest.raises(ValueError, match="does not fit the model's context of 16"):
        text_views(LONG, cfg, tokenizer, np.random.default_rng(0), 16)


def test_no_query_sees_a_later_one_and_the_prefix_sees_no_query():
    mask = cross_causal_mask(3, 4)
    blocked = torch.isinf(mask)
    assert not blocked[:3, :3].any() and blocked[:3, 3:].all()  # prefix: itself only
    assert not blocked[3:, :3].any()  # every query sees the whole prefix
    assert torch.equal(blocked[3:, 3:], torch.ones(4, 4, dtype=torch.bool).triu(1))
    # the same in behaviour: a later query's parameters never reach an earlier query's output
    torch.manual_seed(0)
    cap = Captioner(width=16, heads=2, layers=2, vocab_size=50, queries=5)
    hidden = cap(torch.randn(2, 4, 16), torch.randn(2, 3, 16))
    weights = torch.randn(16)  # (a plain sum of a layer-normed vector is constant)
    for q in range(5):
        grad = torch.autograd.grad((hidden[:, q] @ weights).sum(), cap.queries, retain_graph=True)[0]
        assert (grad[q + 1 :] == 0).all() and (grad[: q + 1].abs().sum(1) > 0).all()
    # so decoding only the first queries (those with a target) gives exactly their outputs
    image, text = torch.randn(2, 4, 16), torch.randn(2, 3, 16)
    assert torch.allclose(cap(image, text, queries=3), cap(image, text)[:, :3], atol=1e-6)


def test_caption_loss_ignores_padding_and_equals_masked_cross_entropy():
    torch.manual_seed(0)
    cap = Captioner(width=16, heads=2, layers=1, vocab_size=30, queries=6)
    hidden = cap(torch.randn(2, 4, 16), torch.randn(2, 3, 16))
    caption = torch.tensor([[29, 5, 7, 28, 0, 0, 0], [29, 9, 28, 0, 0, 0, 0]])
    logits = cap.head(hidden)
    expected = torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), caption[:, 1:], ignore_index=0)
    assert torch.allclose(cap.caption_loss(hidden, caption), expected)


def clips_args(**kw) -> Namespace:
    defaults = dict(model="PowerCLIP-Tiny-64-8", vision_pool="avg", text_pool="avg", seed=0, clips_text_reduction="subcaption",
                    clips_text_tokens=32, clips_caption_tokens=48, clips_contrastive_weight=1.0, clips_caption_weight=2.0,
                    local_loss=False, gather_with_grad=False)  # fmt: skip
    return Namespace(**{**defaults, **kw})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shapes shards of 32 samples with their recaptions sidecars, in the workflow's layout."""
    root = tmp_path_factory.mktemp("clips")
    for i in range(2):
        name = f"{i:05d}"
        raw = root / "shards" / f"{name}.tar"
        write_shard(raw, name, i, 32, seed=0, config=ShapesConfig())
        synthetic_recaptions(raw, root / "recaptions" / f"{name}.tar", root / "recaptions" / f"{name}.stats.json", name)
    return root


def batch_of(shards, n: int, views: CaptionViews | None):
    from powerclip.data import ShardSpec

    spec = ShardSpec(str(shards / "shards" / "00000.tar"), recaptions=str(shards / "recaptions" / "00000.tar"))
    cfg = DataConfig(use_regions=False, caption_views=views)
    process = SampleProcessor(cfg)
    samples = [process(s) for s, _ in zip(joined_samples(spec, with_regions=False, with_recaptions=views is not None), range(n))]
    return collate(samples, cfg)


def test_only_a_clips_batch_carries_the_caption_fields(shards):
    plain = batch_of(shards, 4, None)
    clips = batch_of(shards, 4, CaptionViews(caption_tokens=48))
    assert set(plain) == {"key", "image", "text"}
    assert set(clips) == set(plain) | {"subcaptions", "web_text", "caption"}
    assert all(torch.equal(plain[k], clips[k]) for k in ("image", "text"))
    assert clips["subcaptions"].shape == (4, 2, 77) and clips["caption"].shape == (4, 49)


def test_the_caption_loss_falls_when_memorising_a_few_captions(shards):
    from powerclip.methods.clips import ClipsMethod

    args = clips_args()
    method = ClipsMethod.from_args(ClipsMethod.build_model(args), args)
    batch = batch_of(shards, 4, method.caption_views)
    optimizer = torch.optim.AdamW(method.parameters(), lr=5e-3)
    losses = []
    torch.manual_seed(0)
    for _ in range(20):
        out = method(batch)
        optimizer.zero_grad()
        out["caption_loss"].backward()
        optimizer.step()
        losses.append(out["caption_loss"].item())
    assert losses[0] > 8 and losses[-1] < 0.5 * losses[0], losses[::4]


def test_clips_trains_two_steps_and_the_loader_rebuilds_its_two_towers(shards, tmp_path, monkeypatch):
    import powerclip.model
    from powerclip.evaluation.loader import load_powerclip
    from powerclip.methods.clips import CAPTIONER
    from powerclip.train import main

    trained = {}
    original = powerclip.model.save_checkpoint

    def keep(path, model, **extra):  # the real save, and the model it saved
        trained["model"] = model
        return original(path, model, **extra)

    monkeypatch.setattr(powerclip.model, "save_checkpoint", keep)
    argv = [
        "--method", "clips", "--train-data", str(shards / "shards" / "{00000,00001}.tar"),
        "--recaptions-dir", str(shards / "recaptions"), "--samples-per-epoch", "16", "--epochs", "1",
        "--batch-size", "8", "--workers", "0", "--shuffle-buffer", "32", "--model", "PowerCLIP-Tiny-64-8",
        "--lr", "1e-3", "--warmup", "2", "--seed", "0", "--threads", "1", "--log-every", "1",
        "--clips-caption-tokens", "48", "--checkpoint", str(tmp_path / "checkpoint.pt"),
        "--metrics", str(tmp_path / "metrics.csv"), "--work-dir", str(tmp_path / "work"),
    ]  # fmt: skip
    assert main(argv)["steps"] == 2
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2]
    for row in rows:
        total = float(row["contrastive_loss"]) + 2.0 * float(row["caption_loss"])
        assert float(row["loss"]) == pytest.approx(total, rel=1e-5) and float(row["caption_loss"]) > 5
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state_dict"]
    model = trained["model"]
    assert hasattr(model, CAPTIONER) and not any(k.startswith(CAPTIONER) for k in state)
    assert state.keys() == {k for k in model.state_dict() if not k.startswith(CAPTIONER)}
    loaded, transform, tokenizer = load_powerclip(pretrained=str(tmp_path / "checkpoint.pt"))
    assert not hasattr(loaded, CAPTIONER)
    model.eval()
    images, text = torch.randn(3, 3, 64, 64), tokenizer(["a red circle", "a blue star above a green square", "x"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(text), model.encode_text(text))


def test_a_clips_run_without_recaptions_is_refused(shards, tmp_path):
    from powerclip.train import main

    argv = ["--method", "clips", "--train-data", str(shards / "shards" / "00000.tar"), "--samples-per-epoch", "8",
            "--epochs", "1", "--batch-size", "8", "--workers", "0", "--model", "PowerCLIP-Tiny-64-8", "--lr", "1e-3",
            "--checkpoint", str(tmp_path / "c.pt"), "--work-dir", str(tmp_path / "w")]  # fmt: skip
    with pytest.raises(FileNotFoundError, match="CLIPS needs --recaptions-dir"):
        main(argv)


# ------------------------------------------------------ the released model (hf-hub:UCSC-VLAA/ViT-L-14-CLIPS-...)
WORDS = ["a", "photo", "of", "the", "cat", "dog", "red", "circle", "on", "ledge", "."]
CLIPS_LAYOUT = {  # the released open_clip_config.json's settings (the fork's ViT-L-14-CLIPS-224.json), tiny sizes
    "embed_dim": 32,
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 48, "head_width": 16, "patch_size": 14, "no_ln_pre": True,
                   "pool_type": "avg", "final_ln_after_pool": True, "norm_kwargs": {"eps": 1e-6}},
    "text_cfg": {"context_length": 16, "vocab_size": 128, "hf_tokenizer_name": "UCSC-VLAA/ViT-L-14-CLIPS-Recap-DataComp-1B",
                 "tokenizer_mode": "clips", "width": 32, "heads": 2, "layers": 2, "pool_type": "last",
                 "no_causal_mask": True, "act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}},
}  # fmt: skip


def clips_hub_folder(folder):
    """An open_clip Hub folder as the CLIPS release has it: open_clip_config.json, open_clip_pytorch_model.bin
    (a pickled state_dict of tensors) and a BERT WordPiece tokenizer whose bos/eos are [unused0]/[unused1]."""
    import json

    from open_clip.model import CLIP
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt"), bos_token="[unused0]", eos_token="[unused1]").save_pretrained(folder)
    preprocess = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear", "resize_mode": "squash"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIPS_LAYOUT, "preprocess_cfg": preprocess}))
    torch.manual_seed(3)
    model = CLIP(**CLIPS_LAYOUT).eval()
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return model


def test_the_clips_release_layout_loads_with_its_own_pooling_through_the_evaluation_loader(tmp_path):
    import json

    from powerclip.evaluation.loader import load_powerclip

    reference = clips_hub_folder(tmp_path / "released" / "weights")
    (tmp_path / "released" / "released.json").write_text(json.dumps({
        "name": "clips-vit-l-14", "source": "hf-hub:UCSC-VLAA/ViT-L-14-CLIPS-Recap-DataComp-1B", "format": "openclip",
        "weights": "weights", "model": "hf-hub:UCSC-VLAA/ViT-L-14-CLIPS-Recap-DataComp-1B", "vision_pool": "native",
        "text_pool": "native"}))  # fmt: skip
    model, transform, tokenizer = load_powerclip(pretrained=str(tmp_path / "released"))
    # built as the authors' fork builds it: LayerNorm eps 1e-6 everywhere, no ln_pre, norm after the avg pool,
    # the last (class) token of a bidirectional text tower, tanh GELU in the text tower
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    assert isinstance(model.visual.ln_pre, torch.nn.Identity) and model.visual.final_ln_after_pool
    assert (model.visual.pool_type, model.text_pool_type, model.attn_mask) == ("avg", "last", None)
    # CLIPS's tokenizer: [unused0] text [unused1], padding, and the class token 101 in the last position
    ids = tokenizer(["a photo of the cat", "dog"])
    assert ids.shape == (2, 16) and ids[0, :7].tolist() == [1, 104, 105, 106, 107, 108, 2] and ids[:, -1].tolist() == [101, 101]
    assert transform.transforms[0].size == (28, 28)  # "squash": resized to the square, not cropped
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), reference.encode_image(images))
        assert torch.equal(model.encode_text(ids), reference.encode_text(ids))
