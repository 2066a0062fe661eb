"""Region-level evaluation: the region suites, the grounding / region-binding / segmentation tasks and their metrics.

The models here are real ``nn.Module``s with the interface the tasks read (``powerclip.evaluation.regions.TokenModel``),
built from the pixels so that their answers are known:

* ``ColourTokens(where=True)``: each patch token counts the patch's pixels of each palette colour, and a token of a
  caption is the one-hot of its colour word (zero for other words). An object's region feature is then (nearly) its
  own colour, exactly the direction of its phrase's feature: grounding and region binding score 1.0.
* ``ColourTokens(where=False)``: every patch token is the image's set of colours (which colours occur, not where):
  all regions of an image are equal in every colour component, so every choice among regions or among phrases is a
  tie, and the tie-aware accuracies are exactly chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from torch import nn

from powerclip.evaluation import region_suites, runner, suites
from powerclip.evaluation.metrics import padded_choices, segmentation_confusion, segmentation_metrics, selection_metrics
from powerclip.evaluation.regions import (
    OpenClipTokens,
    crop_box,
    grounding_metrics,
    grounding_scores,
    read_region_suite,
    region_binding_metrics,
    region_binding_scores,
)
from powerclip.model import create_model, encode_image_tokens, encode_text_tokens, register_model_configs, save_checkpoint
from powerclip.regions import PatchGrid
from powerclip.synthetic import COLORS, rle_decode

N = 24
REGION = [s for s, t in suites.SUITES.items() if t in runner.REGION_TASKS]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("region_suites")
    suites.write_suites(out, {}, seed=0, n=N, suites=REGION)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    register_model_configs()
    return open_clip.get_tokenizer("PowerCLIP-Tiny-64-8")


@pytest.fixture(scope="module")
def transform():
    from open_clip.transform import image_transform

    return image_transform(64, is_train=False)


class ColourTokens(nn.Module):
    """Patch tokens = per-colour pixel counts of each 8x8 patch (``where``) or the image's colour set everywhere."""

    image_size, patch_size = 64, 8

    def __init__(self, tokenizer, where: bool):
        super().__init__()
        self.where = where
        self.register_buffer("palette", torch.tensor(list(COLORS.values()), dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1))
        word_of = torch.full((49408,), -1, dtype=torch.long)
        for c, ids in enumerate(tokenizer(list(COLORS))):  # every BPE piece of a colour word ("cyan" has two)
            word_of[ids[(ids != 0) & (ids < 49406)]] = c
        self.register_buffer("word_of", word_of)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        rgb = ((images * self.std + self.mean) * 255).permute(0, 2, 3, 1)  # (B, H, W, 3)
        close = ((rgb[..., None, :] - self.palette).abs().amax(-1) <= 40).float()  # (B, H, W, colours)
        b, h, w, c = close.shape
        counts = close.reshape(b, h // 8, 8, w // 8, 8, c).sum(dim=(2, 4)).reshape(b, -1, c)  # (B, 64 patches, colours)
        if self.where:
            return counts
        present = (counts.sum(dim=1, keepdim=True) >= 8).float()  # which colours occur, anywhere
        return present.expand_as(counts).contiguous()

    def text_tokens(self, text: torch.Tensor) -> torch.Tensor:
        words = self.word_of[text]
        return torch.nn.functional.one_hot(words.clamp_min(0), len(COLORS)).float() * (words >= 0).unsqueeze(-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.text_tokens(text).sum(dim=1)


# ------------------------------------------------------------------------------------------ metrics by hand
def test_segmentation_metrics_equal_a_hand_computation():
    # 3 classes (0 = background), a 4 x 4 label map with one void pixel (255)
    label = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 0, 255], [2, 2, 0, 0]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 0], [2, 0, 0, 2], [2, 2, 0, 0]])
    confusion = segmentation_confusion(pred, label, 3)
    # rows = label, columns = prediction; the void pixel is not counted
    assert confusion.tolist() == [[6, 1, 0], [1, 3, 0], [1, 0, 3]] and confusion.sum() == 15
    # IoU: background 6 / (7 + 8 - 6) = 6/9, class 1 3 / (4 + 4 - 3) = 3/5, class 2 3 / (4 + 3 - 3) = 3/4
    # foreground: label fg 8 pixels, predicted fg 7, both fg 6 (a class 1 / 2 confusion would still count) -> 6/9
    metrics = segmentation_metrics(confusion)
    assert metrics["miou"] == pytest.approx((6 / 9 + 3 / 5 + 3 / 4) / 3)
    assert metrics["jaccard"] == pytest.approx(6 / 9)
    assert metrics["pixel_acc"] == pytest.approx(12 / 15)


def test_segmentation_metrics_leave_out_absent_classes_and_count_wrong_ones():
    label = np.array([[0, 1], [1, 1]])
    confusion = segmentation_confusion(np.array([[0, 1], [1, 1]]), label, 4)
    assert segmentation_metrics(confusion)["miou"] == 1.0  # classes 2 and 3 occur nowhere: no IoU
    wrong = segmentation_confusion(np.array([[0, 1], [1, 3]]), label, 4)
    assert segmentation_metrics(wrong)["miou"] == pytest.approx((1 + 2 / 3 + 0) / 3)  # predicted 3 counts, IoU 0
    with pytest.raises(ValueError, match="outside 0..3"):
        segmentation_confusion(np.array([[0, 7], [1, 1]]), label, 4)


def test_padded_choices_score_each_item_against_its_own_candidates():
    items = [(torch.tensor([0.1, 0.9]), 1, None), (torch.tensor([0.5, 0.2, 0.5, 0.1]), 2, None), (torch.tensor([0.3, 0.3, 0.3]), 0,
             torch.tensor([True, True, False]))]  # fmt: skip
    metrics = selection_metrics(padded_choices(items))
    # item 1 right; item 2 tied with candidate 0 (1/2); item 3 three equal scores (1/3)
    assert metrics["text_acc_ties_split"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert metrics["text_acc_strict"] == pytest.approx(1 / 3) and metrics["tie_rate"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------- the suites
def test_region_suites_layout_and_ground_truth(root):
    for suite in REGION:
        meta = suites.read_meta(root / suite)
        task, split = region_suites.REGION_SUITES[suite]
        assert meta["task"] == task and meta["split"] == split and len(meta["items"]) == N
        assert not (root / suite / "dataset_type.txt").exists()  # clip-benchmark never reads these
        samples = read_region_suite(root / suite)
        assert [s["key"] for s in samples] == [i["key"] for i in meta["items"]]
        for sample in samples:
            assert all(o["heldout"] == (f"{o['color']} {o['shape']}" in meta["generator_config"]["holdout_combos"])
                       for o in sample["objects"])  # fmt: skip
            if split == "heldout":
                assert any(o["heldout"] for o in sample["objects"])
            elif task != "zeroshot_segmentation":
                assert not any(o["heldout"] for o in sample["objects"])
            for obj, (start, end) in zip(sample["objects"], sample.get("mentions", [])):
                assert sample["caption"][start:end] == f"a {obj['phrase']}"
    seg = suites.read_meta(root / "shapes_segmentation")
    assert seg["classnames"][0] == "background" and len(seg["classnames"]) == 1 + 8 * 5


def test_region_binding_negative_swaps_the_colours_and_keeps_the_words(root):
    for suite in ("shapes_region_binding", "shapes_region_binding_heldout"):
        for sample in read_region_suite(root / suite):
            a, b = sample["objects"]
            negative = sample["negative_caption"]
            assert sorted(negative.split()) == sorted(sample["caption"].split()) and negative != sample["caption"]
            for obj, other, (start, end) in zip((a, b), (b, a), sample["negative_mentions"]):
                assert negative[start:end] == f"a {obj['size']} {other['color']} {obj['shape']}"


# ----------------------------------------------------------------------------------------------- the tasks
@pytest.mark.parametrize("suite", ["shapes_grounding", "shapes_grounding_heldout"])
def test_grounding_is_perfect_when_each_region_is_its_phrase_and_chance_without_position(root, tokenizer, transform, suite):
    samples = read_region_suite(root / suite)
    sees = grounding_metrics(grounding_scores(ColourTokens(tokenizer, where=True), transform, tokenizer, samples))
    assert sees["region_to_phrase_acc"] == sees["phrase_to_region_acc"] == sees["grounding_acc"] == 1.0
    assert sees["region_to_phrase_tie_rate"] == sees["phrase_to_region_tie_rate"] == 0.0
    blind = grounding_metrics(grounding_scores(ColourTokens(tokenizer, where=False), transform, tokenizer, samples))
    objects = [len(s["objects"]) for s in samples]
    chance = len(objects) / sum(objects)  # each image's n objects are n items of chance 1/n
    assert sees["chance"] == blind["chance"] == pytest.approx(chance) and chance < 0.5
    assert blind["region_to_phrase_acc"] == pytest.approx(chance)
    assert blind["phrase_to_region_acc"] == pytest.approx(chance)


def test_region_binding_is_perfect_with_position_and_exactly_half_without(root, tokenizer, transform):
    samples = read_region_suite(root / "shapes_region_binding")
    sees = region_binding_metrics(region_binding_scores(ColourTokens(tokenizer, where=True), transform, tokenizer, samples))
    assert sees == {"text_acc_strict": 1.0, "text_acc_ties_split": 1.0, "tie_rate": 0.0}
    blind = region_binding_metrics(region_binding_scores(ColourTokens(tokenizer, where=False), transform, tokenizer, samples))
    assert blind["text_acc_ties_split"] == 0.5 and blind["tie_rate"] == 1.0


def test_the_open_clip_adapter_is_the_training_path(tokenizer):
    model = create_model("PowerCLIP-Tiny-64-8", vision_pool="cls", text_pool="argmax", seed=1).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    text = tokenizer(["a small red circle", "a large blue star is above a small green square"])
    adapter = OpenClipTokens(model)
    with torch.no_grad():
        assert torch.equal(adapter.image_tokens(images), encode_image_tokens(model, images)[1])
        assert torch.equal(adapter.text_tokens(text), encode_text_tokens(model, text)[1])
        assert torch.equal(adapter.encode_text(text), model.encode_text(text))
    assert (adapter.image_size, adapter.patch_size) == (64, 8)


def test_crop_box_is_the_centre_crop_in_original_pixels():
    grid = PatchGrid(224, 16)
    assert crop_box(grid, 224, 224) == (0, 0, 224, 224)
    assert crop_box(grid, 448, 224) == (112, 0, 336, 224)  # resize keeps 448 x 224, 112 px cut each side
    # 500 x 375 -> 298 x 224 (scale 0.596), crop x 37..261 -> original x 37 / 0.596 = 62.1 .. 261 / 0.596 = 437.9
    assert crop_box(grid, 500, 375) == (62, 0, 438, 375)


def test_runner_writes_the_same_json_for_every_region_task(root, tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", create_model("PowerCLIP-Tiny-64-8", seed=0))
    for suite in REGION:
        out = runner.run_benchmark(ckpt, suite, root / suite, None, tmp_path / f"{suite}.json", device="cpu", batch_size=7)
        assert json.loads((tmp_path / f"{suite}.json").read_text()) == out
        assert set(out) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
        assert out["task"] == region_suites.REGION_SUITES[suite][0]
        assert all(0.0 <= v <= 1.0 for v in out["metrics"].values()), out


def test_shapes_segmentation_labels_come_from_the_exact_masks(root, transform):
    from powerclip.evaluation.regions import shapes_segmentation

    data, classnames, templates = shapes_segmentation(root / "shapes_segmentation", transform)
    samples = read_region_suite(root / "shapes_segmentation")
    pixels, label, size = data[0]
    assert pixels.shape == (3, 64, 64) and size == (64, 64) and templates == list(region_suites.SEGMENTATION_TEMPLATES)
    for obj in samples[0]["objects"]:
        mask = rle_decode(obj["mask"])
        assert (label[mask] == classnames.index(f"{obj['color']} {obj['shape']}")).all()
    assert (label == 0).sum() == 64 * 64 - sum(o["area"] for o in samples[0]["objects"])
