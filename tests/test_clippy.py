"""clippy (CLIPpy's pooling, both variants) and clip-stock: pooling by hand, two CPU training steps through the
trainer, and the checkpoint rebuilt by the evaluation loader with identical embeddings.

The published variant runs offline on towers of the same families as DINO ViT-B/16 and Sentence-T5, small and
built from local configs: timm's ``test_vit`` (a 6-block ViT with a class token) and a 2-block T5 encoder with a
T5 tokenizer over a fixed unigram vocabulary, written into a folder here; "pretrained" weights are saved the way the Hub holds them
(a timm ``local-dir:`` folder, a transformers folder with Sentence-T5's ``2_Dense/``).
"""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from powerclip.synthetic import ShapesConfig, write_shard

REPO = Path(__file__).resolve().parent.parent
MODEL = "PowerCLIP-Tiny-64-8"
IMAGE_TOWER = "test_vit"  # timm's tiny ViT (class token, patch 16, width 64, dynamic image size)
WORDS = ("a an the small large red green blue yellow orange purple pink white black circle square triangle star "
         "cross to left right of above below and is , . photo").split()  # fmt: skip


def write_t5_tower(folder: Path, pretrained: bool = False, seed: int = 0) -> Path:
    """A tiny T5 encoder config with a T5 tokenizer (a fixed unigram vocabulary) in ``folder`` (the layout of a Hub text tower);
    with ``pretrained`` also its weights and a Sentence-T5 dense layer (``2_Dense/model.safetensors``)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    # a fixed SentencePiece-style unigram vocabulary: the words, then single characters to spell the rest
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"\u2581{w}", -1.0) for w in WORDS), ("\u2581", -2.0),
              *((c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,.")]  # fmt: skip
    config = T5Config(vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    config.save_pretrained(folder)
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                    extra_ids=0).save_pretrained(folder)  # fmt: skip
    if pretrained:
        torch.manual_seed(seed)
        T5EncoderModel(copy.deepcopy(config)).save_pretrained(folder)  # it sets is_encoder_decoder false...
        config.save_pretrained(folder)  # ...which the Hub's Sentence-T5 config does not say
        (folder / "2_Dense").mkdir(exist_ok=True)
        save_file({"linear.weight": torch.randn(64, 32)}, str(folder / "2_Dense" / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def text_tower(tmp_path_factory) -> Path:
    return write_t5_tower(tmp_path_factory.mktemp("t5") / "tower")


@pytest.fixture(scope="module")
def raw_shards(tmp_path_factory) -> Path:
    """Two raw shapes shards of 24 samples (clippy and clip read no sidecars)."""
    root = tmp_path_factory.mktemp("raw")
    for i in range(2):
        write_shard(root / f"{i:05d}.tar", f"{i:05d}", i, 24, seed=0, config=ShapesConfig())
    return root


def published_args(text_tower: Path, *extra: str):
    from powerclip.train_params import parse_args

    return parse_args([
        "--train-data", "unused", "--checkpoint", "unused", "--work-dir", "unused", "--model", MODEL,
        "--batch-size", "8", "--epochs", "1", "--samples-per-epoch", "16", "--lr", "1e-3", "--method", "clippy",
        "--vision-pool", "max", "--text-pool", "avg", "--clippy-towers", "published",
        "--clippy-image-tower", IMAGE_TOWER, "--clippy-text-tower", str(text_tower), "--clippy-pretrained", "false",
        *extra,
    ])  # fmt: skip


def tiny_published(text_tower: Path, seed: int = 0):
    """The published towers, tiny and randomly initialised, as the clippy method builds them."""
    from powerclip.methods.clippy import ClippyMethod

    return ClippyMethod.build_model(published_args(text_tower, "--seed", str(seed)))


def embeddings(model, images: torch.Tensor, texts: list[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokenizer(texts))


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


TEXTS = ["a small red circle to the left of a large blue square", "a photo of a star", "green"]


# ------------------------------------------------------------------------------------- pooling by hand
def test_scratch_max_pool_is_the_max_over_patch_tokens_by_hand():
    from powerclip.model import create_model, encode_image_tokens

    model = create_model(MODEL, "max", "avg", seed=0).eval()
    visual, x = model.visual, images()
    with torch.no_grad():
        tokens = visual.ln_post(visual.transformer(visual._embeds(x)))  # (B, 1 + 64, width), CLS first
        by_hand = torch.stack([tokens[b, 1:].max(dim=0).values for b in range(len(x))]) @ visual.proj
        pooled, patches = encode_image_tokens(model, x)
        assert torch.allclose(model.encode_image(x), by_hand, atol=1e-6)
        assert torch.equal(pooled, model.encode_image(x)) and patches.shape == (3, 64, by_hand.shape[1])


def test_published_max_pool_is_the_max_over_patch_tokens_by_hand(text_tower):
    from powerclip.model import encode_image_tokens

    model = tiny_published(text_tower).eval()
    trunk, x = model.visual.trunk, images()
    with torch.no_grad():
        # the timm ViT by hand: patches, class token and positions, blocks, final norm; no projection
        tokens = trunk.norm(trunk.blocks(trunk._pos_embed(trunk.patch_embed(x))))
        by_hand = torch.stack([tokens[b, 1:].max(dim=0).values for b in range(len(x))])
        assert torch.allclose(model.encode_image(x), by_hand, atol=1e-6)
        pooled, patches = encode_image_tokens(model, x)  # what zero-shot segmentation reads
        assert patches.shape == (3, 16, 64) and torch.equal(pooled, patches.amax(dim=1))
    assert model.visual.patch_size == (16, 16) and model.context_length == 77


def test_published_text_pool_is_the_mean_over_real_tokens_then_the_dense_layer(text_tower):
    import open_clip

    model = tiny_published(text_tower).eval()
    tokenizer = open_clip.get_tokenizer(model.powerclip_cfg["model_name"])
    ids = tokenizer(TEXTS)
    with torch.no_grad():
        states = model.text.transformer(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        by_hand = torch.stack([states[b, ids[b] != 0].mean(dim=0) for b in range(len(TEXTS))]) @ model.text.proj.weight.T
        assert torch.allclose(model.encode_text(ids), by_hand, atol=1e-6)
    assert (ids[0] == 1).sum() == 1  # the caption ends with T5's end of sequence, then padding


def test_clippy_refuses_other_pools(text_tower):
    from powerclip.methods.clippy import ClippyMethod

    with pytest.raises(ValueError, match="vision_pool max and text_pool avg"):
        ClippyMethod.build_model(published_args(text_tower, "--vision-pool", "avg"))


def test_published_towers_load_pretrained_weights_from_local_paths(tmp_path):
    """clippy_image_tower local-dir:<timm folder> and clippy_text_tower <transformers folder>: the weights and
    Sentence-T5's dense layer end up in the towers; the checkpoint's config never asks for them again."""
    import timm
    from safetensors.torch import load_file
    from timm.models._hub import save_for_hf
    from transformers import T5EncoderModel

    torch.manual_seed(3)
    trunk = timm.create_model(IMAGE_TOWER, num_classes=0)
    save_for_hf(trunk, str(tmp_path / "vit"), safe_serialization=True)
    text = write_t5_tower(tmp_path / "t5", pretrained=True)
    from powerclip.methods.clippy import ClippyMethod

    args = published_args(text, "--clippy-image-tower", f"local-dir:{tmp_path / 'vit'}", "--clippy-pretrained", "true")
    model = ClippyMethod.build_model(args)
    assert torch.equal(model.visual.trunk.pos_embed, trunk.pos_embed)
    assert torch.equal(model.visual.trunk.blocks[5].mlp.fc2.weight, trunk.blocks[5].mlp.fc2.weight)
    encoder = T5EncoderModel.from_pretrained(text).encoder
    assert torch.equal(model.text.transformer.block[1].layer[1].DenseReluDense.wo.weight,
                       encoder.block[1].layer[1].DenseReluDense.wo.weight)  # fmt: skip
    assert torch.equal(model.text.proj.weight, load_file(str(text / "2_Dense" / "model.safetensors"))["linear.weight"])
    cfg = model.powerclip_cfg
    assert cfg["create_kwargs"] == {"pretrained_image": False, "pretrained_text": False}
    assert cfg["tower_weights"] == {"image": f"local-dir:{tmp_path / 'vit'}", "text": str(text)}


# ------------------------------------------------------------------ training and the evaluation loader
def train(raw_shards: Path, out: Path, *method_args: str) -> Path:
    from powerclip.train import main

    argv = [
        "--train-data", str(raw_shards / "{00000,00001}.tar"), "--samples-per-epoch", "16", "--epochs", "1",
        "--batch-size", "8", "--workers", "0", "--shuffle-buffer", "16", "--model", MODEL, "--lr", "1e-3",
        "--warmup", "1", "--seed", "0", "--threads", "1", "--log-every", "1",
        "--checkpoint", str(out / "checkpoint.pt"), "--metrics", str(out / "metrics.csv"), "--work-dir", str(out / "work"),
        *method_args,
    ]  # fmt: skip
    assert main(argv)["steps"] == 2
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(r["loss"] == r["contrastive_loss"] for r in rows)
    assert float(rows[0]["loss"]) > 0
    return out / "checkpoint.pt"


def assert_reloads_identically(checkpoint: Path, reference_args, pools: tuple[str, str]) -> None:
    """The evaluation loader rebuilds ``checkpoint`` with ``pools`` and the trained weights: its embeddings equal
    those of the method's own model carrying the same weights, bit for bit."""
    from powerclip.evaluation.loader import load_powerclip
    from powerclip.methods import method_class

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert (state["powerclip_cfg"]["vision_pool"], state["powerclip_cfg"]["text_pool"]) == pools
    reference = method_class(reference_args.method).build_model(reference_args)
    reference.load_state_dict(state["state_dict"], strict=True)
    model, transform, tokenizer = load_powerclip(pretrained=str(checkpoint))
    x = images()
    got, want = embeddings(model, x, TEXTS, tokenizer), embeddings(reference, x, TEXTS, tokenizer)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert transform.transforms[0].size in (64, (64, 64))


@pytest.mark.parametrize(
    "name, method_args, pools",
    [
        ("clippy", ("--method", "clippy", "--vision-pool", "max", "--text-pool", "avg"), ("max", "avg")),
        ("clip-stock", ("--method", "clip", "--vision-pool", "cls", "--text-pool", "argmax"), ("cls", "argmax")),
    ],
)
def test_scratch_rows_train_and_reload(raw_shards, tmp_path, name, method_args, pools):
    from powerclip.train_params import parse_args

    checkpoint = train(raw_shards, tmp_path, *method_args)
    args = parse_args(["--train-data", "x", "--checkpoint", "x", "--work-dir", "x", "--model", MODEL, "--batch-size",
                       "8", "--epochs", "1", "--samples-per-epoch", "16", "--lr", "1e-3", *method_args])  # fmt: skip
    assert_reloads_identically(checkpoint, args, pools)
    from powerclip.model import load_model

    model = load_model(checkpoint)
    assert (model.visual.pool_type, model.text_pool_type) == {"max": ("max", "avg"), "cls": ("tok", "argmax")}[pools[0]]


def test_published_towers_train_and_reload(raw_shards, text_tower, tmp_path):
    args = published_args(text_tower)
    method_args = ("--method", "clippy", "--vision-pool", "max", "--text-pool", "avg", "--clippy-towers", "published",
                   "--clippy-image-tower", IMAGE_TOWER, "--clippy-text-tower", str(text_tower),
                   "--clippy-pretrained", "false")  # fmt: skip
    checkpoint = train(raw_shards, tmp_path, *method_args)
    assert_reloads_identically(checkpoint, args, ("max", "avg"))


@pytest.mark.slow
def test_published_checkpoint_rebuilds_in_a_fresh_process(text_tower, tmp_path):
    """The evaluation job's process knows nothing of the generated model config: it comes from the checkpoint."""
    from powerclip.model import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", tiny_published(text_tower, seed=5))
    script = (
        "import json, sys, torch; from powerclip.evaluation.loader import load_powerclip\n"
        f"m, t, tok = load_powerclip(pretrained={str(checkpoint)!r}); m.eval()\n"
        "x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))\n"
        f"with torch.no_grad(): out = [m.encode_image(x).tolist(), m.encode_text(tok({TEXTS!r})).tolist()]\n"
        "json.dump(out, sys.stdout)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout)
    from powerclip.evaluation.loader import load_powerclip

    model, _, tokenizer = load_powerclip(pretrained=str(checkpoint))
    here = embeddings(model, images(), TEXTS, tokenizer)
    assert torch.equal(torch.tensor(fresh[0]), here[0]) and torch.equal(torch.tensor(fresh[1]), here[1])


def test_published_checkpoint_runs_a_benchmark(raw_shards, text_tower, tmp_path):
    """clip-benchmark's zero-shot classification through run_benchmark (what eval_benchmark runs) with the T5
    tokenizer and the timm tower's transform."""
    from powerclip.evaluation.runner import run_benchmark
    from powerclip.evaluation.suites import write_suite
    from powerclip.model import save_checkpoint

    model = tiny_published(text_tower)
    save_checkpoint(tmp_path / "checkpoint.pt", model)
    root = write_suite(tmp_path / "suites", "shapes_cls", {}, seed=0, n=6)
    result = run_benchmark(tmp_path / "checkpoint.pt", "wds/shapes_cls", root, None, tmp_path / "out.json", device="cpu")
    assert result["task"] == "zeroshot_classification" and 0 <= result["metrics"]["acc1"] <= 1
    assert result["model"] == model.powerclip_cfg["model_name"]
