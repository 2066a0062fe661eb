"""powerclip.evaluation.suites: layout clip-benchmark reads, ground truth, and the bag-of-words contract of the minimal pairs.

The bag-of-words (BoW) models below are real ``nn.Module``s with ``encode_image``/``encode_text``; their
text embedding is a sum of per-token embeddings taken over the *sorted* token ids, so it is exactly
order-insensitive (bit-identical for equal multisets). What they score, through clip-benchmark's own
reader and ``image_caption_selection`` metric:

* binding / order / binding_heldout: positive and negative embed identically, so every item is an exact
  tie: clip-benchmark's ``acc`` credits ties to the positive (argmax, positive at index 0) -> 1.0, the
  tie-splitting accuracy -> exactly 0.5;
* relation: with one-hot token embeddings the two captions differ only in the relation word's
  coordinate (same norm), so the model has one fixed preference per word pair, right on exactly half of
  the balanced items -> exactly 0.5 under every rule; with dense embeddings, 0.5 within sampling error;
* control: a BoW model that sees which colours are in the image solves every colour item, so control
  is not tied to 50 %.
"""

from __future__ import annotations

import io
import math
import tarfile
from collections import Counter
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from torch import nn

from powerclip.evaluation import suites
from powerclip.evaluation.metrics import SelectionScores, caption_selection_scores, selection_metrics
from powerclip.model import register_model_configs
from powerclip.synthetic import COLORS, RELATIONS, ShapesConfig

N = 40  # a multiple of 4: the relation cycle (left, right, above, below) is then exactly balanced
SEED = 0
# the workflow's `synthetic` block (config/config.yaml): wrapper keys must be ignored
GENERATOR_CONFIG = {
    "samples_per_shard": 1000,
    "seed": SEED,
    "split": "train",
    "image_size": 64,
    "min_objects": 2,
    "max_objects": 4,
    "holdout_combos": ["red triangle", "blue circle", "yellow square", "green star"],
}
# the suites clip-benchmark reads (the region-level ones are read by our own tasks: tests/test_region_eval.py)
CB_SUITES = {s: t for s, t in suites.SUITES.items() if t in suites.DATASET_TYPES}
PAIR_SUITES = [s for s, t in CB_SUITES.items() if t == "image_caption_selection"]
SAME_WORDS = ["shapes_binding", "shapes_order", "shapes_binding_heldout"]
MODEL = "PowerCLIP-Tiny-64-8"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("suites")
    info = suites.write_suites(out, GENERATOR_CONFIG, seed=SEED, n=N, suites=list(CB_SUITES))
    assert info == {s: (t, N) for s, t in CB_SUITES.items()}
    return out


@pytest.fixture(scope="module")
def tokenizer():
    register_model_configs()
    return open_clip.get_tokenizer(MODEL)


@pytest.fixture(scope="module")
def transform():
    from open_clip.transform import image_transform

    return image_transform(64, is_train=False)


def tar_members(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def cb_loader(root: Path, suite: str, transform, batch_size: int = 16):
    """The data loader exactly as clip_benchmark.cli.run builds it for a local wds dataset."""
    from clip_benchmark.datasets.builder import build_dataset

    dataset = build_dataset(
        dataset_name=f"wds/{suite}",
        root=str(root / suite),
        transform=transform,
        split="test",
        download=True,
        task=suites.SUITES[suite],
    )
    loader = torch.utils.data.DataLoader(dataset.batched(batch_size), batch_size=None, shuffle=False, num_workers=0)
    return dataset, loader


# ------------------------------------------------------------------------------------------ layout
def test_layout_and_ground_truth(root: Path):
    cfg = suites.shapes_config(GENERATOR_CONFIG)
    held = set(cfg.holdout_combos)
    for suite, task in CB_SUITES.items():
        d = root / suite
        assert (d / "test" / "nshards.txt").read_text().strip() == "1"
        assert (d / "test" / "0.tar").is_file()
        meta = suites.read_meta(d)
        assert meta["task"] == task and meta["n"] == N and len(meta["items"]) == N
        assert meta["seed"] == SEED and meta["generator_config"]["holdout_combos"] == list(cfg.holdout_combos)
        assert meta["shard_index"] >= suites.EVAL_SHARD_BASE  # training uses shards 0 .. num_shards-1
        expected_type = "classification" if task == "zeroshot_classification" else "retrieval"
        assert (d / "dataset_type.txt").read_text().strip() == expected_type
        members = tar_members(d / "test" / "0.tar")
        assert sorted(members) == [item["key"] for item in meta["items"]]
        for key, fields in members.items():
            image = Image.open(io.BytesIO(fields["jpg"]))
            assert image.size == (64, 64) and image.mode == "RGB"
        # no temp dirs left behind by the atomic writes
    assert sorted(p.name for p in root.iterdir()) == sorted(CB_SUITES)

    cls = root / "shapes_cls"
    classnames = (cls / "classnames.txt").read_text().splitlines()
    assert len(classnames) == len(cfg.colors) * len(cfg.shapes) - len(held)
    assert not held & set(classnames)
    templates = (cls / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates == list(suites.TEMPLATES) and all("{c}" in t for t in templates)
    meta = suites.read_meta(cls)
    members = tar_members(cls / "test" / "0.tar")
    for item in meta["items"]:
        assert int(members[item["key"]]["cls"]) == item["label"]
        assert classnames[item["label"]] == item["classname"] == f"{item['color']} {item['shape']}"

    ret = suites.read_meta(root / "shapes_retrieval")
    captions = [item["caption"] for item in ret["items"]]
    assert len(set(captions)) == N  # unique captions
    members = tar_members(root / "shapes_retrieval" / "test" / "0.tar")
    assert [members[i["key"]]["txt"].decode() for i in ret["items"]] == captions

    for suite in PAIR_SUITES:
        meta = suites.read_meta(root / suite)
        members = tar_members(root / suite / "test" / "0.tar")
        for item in meta["items"]:
            assert members[item["key"]]["txt"].decode().splitlines() == [item["positive"], item["negative"]]
            assert len(item["objects"]) == 2


def test_clip_benchmark_reads_every_suite(root: Path, transform):
    for suite, task in CB_SUITES.items():
        dataset, loader = cb_loader(root, suite, transform)
        meta = suites.read_meta(root / suite)
        images, targets = [], []
        for batch_images, batch_targets in loader:
            images.append(batch_images)
            targets.extend(batch_targets.tolist() if torch.is_tensor(batch_targets) else batch_targets)
        images = torch.cat(images)
        assert images.shape == (N, 3, 64, 64)
        if task == "zeroshot_classification":
            assert dataset.classes == meta["classnames"] and dataset.templates == meta["templates"]
            assert targets == [item["label"] for item in meta["items"]]
        elif task == "zeroshot_retrieval":
            assert targets == [[item["caption"]] for item in meta["items"]]
        else:
            assert targets == [[item["positive"], item["negative"]] for item in meta["items"]]


def test_deterministic_and_atomic_rewrite(tmp_path: Path, root: Path):
    path = suites.write_suite(tmp_path, "shapes_order", GENERATOR_CONFIG, seed=SEED, n=N)
    first = (path / "test" / "0.tar").read_bytes()
    assert first == (root / "shapes_order" / "test" / "0.tar").read_bytes()
    # rewriting replaces the suite in place (same bytes here) and leaves no temp/old directories
    suites.write_suite(tmp_path, "shapes_order", GENERATOR_CONFIG, seed=SEED, n=N)
    assert (path / "test" / "0.tar").read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["shapes_order"]
    # another seed gives other images
    other = suites.write_suite(tmp_path / "other", "shapes_order", GENERATOR_CONFIG, seed=SEED + 1, n=N)
    assert (other / "test" / "0.tar").read_bytes() != first


def test_shards_and_config_validation(tmp_path: Path):
    path = suites.write_suite(tmp_path, "shapes_cls", ShapesConfig(), seed=SEED, n=12, shard_size=5)
    assert (path / "test" / "nshards.txt").read_text().strip() == "3"
    assert sum(len(tar_members(path / "test" / f"{i}.tar")) for i in range(3)) == 12
    with pytest.raises(ValueError, match="unknown shapes generator keys"):
        suites.shapes_config({"image_sise": 64})
    with pytest.raises(ValueError, match="unknown suite"):
        suites.write_suite(tmp_path, "shapes_nope", {}, seed=0)


# --------------------------------------------------------------------------- the minimal-pair contract
def test_same_bag_of_words_for_binding_and_order(root: Path, tokenizer):
    for suite in SAME_WORDS:
        for item in suites.read_meta(root / suite)["items"]:
            pos, neg = item["positive"], item["negative"]
            assert pos != neg
            assert Counter(pos.split()) == Counter(neg.split())
            # and the same multiset of BPE tokens (what a text encoder actually sees)
            tp, tn = tokenizer([pos, neg])
            assert torch.equal(tp.sort().values, tn.sort().values)


def test_pairs_are_true_and_false(root: Path):
    """Positives describe the image (objects + relation from the generator); negatives do not."""
    held = set(suites.shapes_config(GENERATOR_CONFIG).holdout_combos)

    def states(obj, rel, other) -> str:
        return suites.clause(obj, rel, other)

    for suite in PAIR_SUITES:
        for item in suites.read_meta(root / suite)["items"]:
            objects, rel = item["objects"], item["relation"]
            a, b = objects[rel["subject"]], objects[rel["object"]]
            true_captions = {states(a, rel["relation"], b), states(b, RELATIONS[rel["relation"]][1], a)}
            assert item["positive"] in true_captions, (suite, item)
            assert item["negative"] not in true_captions, (suite, item)
            combos = {f"{o['color']} {o['shape']}" for o in objects}
            if suite == "shapes_binding_heldout":
                assert combos & held  # every image holds a held-out pair
            elif suite in ("shapes_binding", "shapes_control"):
                assert not combos & held
                if suite == "shapes_binding":
                    assert not set(item["negative_combos"]) & held


def test_relation_balance(root: Path):
    items = suites.read_meta(root / "shapes_relation")["items"]
    flips = {
        "to the left of": "to the right of",
        "to the right of": "to the left of",
        "above": "below",
        "below": "above",
    }
    counts = Counter(item["positive_relation"] for item in items)
    assert counts["left_of"] == counts["right_of"] == counts["above"] == counts["below"] == N // 4
    for item in items:
        pos, neg = item["positive"], item["negative"]
        phrase = RELATIONS[item["positive_relation"]][0]
        assert phrase in pos and pos.replace(phrase, flips[phrase]) == neg
        # exactly one word differs (left/right, above/below)
        assert sum((Counter(pos.split()) - Counter(neg.split())).values()) == 1


def test_control_replaces_one_attribute_with_an_absent_one(root: Path):
    items = suites.read_meta(root / "shapes_control")["items"]
    assert Counter(item["attribute"] for item in items) == {"color": N // 2, "shape": N // 2}
    for item in items:
        present = {o[item["attribute"]] for o in item["objects"]}
        assert item["original"] in present and item["replacement"] not in present
        assert item["positive"].split() != item["negative"].split()
        diff = Counter(item["negative"].split()) - Counter(item["positive"].split())
        assert diff == Counter([item["replacement"]])


# ---------------------------------------------------------------------------------- bag-of-words models
class BagOfWords(nn.Module):
    """Text = sum of per-token embeddings over the sorted token ids (exactly order-insensitive).

    ``embedding="onehot"``: token embeddings are one-hot over the vocabulary (the text embedding is the
    token count vector); ``"dense"``: a fixed random table. Image = a fixed random vector, plus (with
    ``see_colors``) a large weight on the embeddings of the colour words whose RGB appears in the image.
    """

    def __init__(self, tokenizer, embedding: str = "onehot", see_colors: bool = False, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else 49408
        self.onehot = embedding == "onehot"
        dim = self.vocab if self.onehot else 64
        if not self.onehot:
            self.embedding = nn.Embedding(self.vocab, dim, padding_idx=0)
            with torch.no_grad():
                self.embedding.weight.copy_(torch.randn(self.vocab, dim, generator=g))
                self.embedding.weight[0].zero_()
        self.image_vector = nn.Parameter(torch.rand(dim, generator=g), requires_grad=False)
        self.see_colors = see_colors
        # each colour word's embedding (sum over its BPE tokens: "cyan" is two), one row per colour
        color_ids = [t[(t != 0) & (t < 49406)] for t in tokenizer(list(COLORS))]
        with torch.no_grad():
            words = torch.stack([self.token_embedding(ids).sum(0) for ids in color_ids])
        self.register_buffer("color_words", words)
        self.register_buffer("palette", torch.tensor(list(COLORS.values()), dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1))

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        if self.onehot:
            return nn.functional.one_hot(ids, self.vocab).float()
        return self.embedding(ids)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        keep = (text != 0).float()
        if self.onehot:
            # the sum of one-hot token embeddings is the token count vector (exact integers)
            return torch.zeros(text.shape[0], self.vocab).scatter_add_(1, text, keep)
        ids = text.sort(dim=1).values  # a fixed summation order: equal multisets give equal sums, bit for bit
        return (self.embedding(ids) * (ids != 0).unsqueeze(-1)).sum(dim=1)

    def colors_present(self, images: torch.Tensor) -> torch.Tensor:
        rgb = ((images * self.std + self.mean) * 255).permute(0, 2, 3, 1).reshape(images.shape[0], -1, 1, 3)
        close = (rgb - self.palette).abs().amax(dim=-1) <= 40  # (B, pixels, colours)
        return close.sum(dim=1) >= 8  # (B, colours)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        out = self.image_vector.expand(images.shape[0], -1).clone()
        if self.see_colors:
            out += 10.0 * self.colors_present(images).float() @ self.color_words
        return out


def bow_scores(model, root: Path, suite: str, transform, tokenizer) -> tuple[dict, SelectionScores]:
    """clip-benchmark's image_caption_selection metrics on the suite, and the per-item scores."""
    from clip_benchmark.metrics import image_caption_selection

    _, loader = cb_loader(root, suite, transform)
    with torch.no_grad():
        metrics = image_caption_selection.evaluate(model, loader, tokenizer, device="cpu", amp=False)
        scores = caption_selection_scores(model, loader, tokenizer, device="cpu", amp=False)
    return metrics, scores


@pytest.mark.parametrize("embedding", ["onehot", "dense"])
def test_bag_of_words_ties_on_binding_and_order(root: Path, transform, tokenizer, embedding: str):
    model = BagOfWords(tokenizer, embedding=embedding, see_colors=True).eval()
    for suite in SAME_WORDS:
        metrics, scores = bow_scores(model, root, suite, transform, tokenizer)
        extra = selection_metrics(scores)
        assert bool(scores.identical.all())  # positive and negative embed bit-identically: all exact ties
        # clip-benchmark: argmax picks index 0 = the positive on a tie, so a BoW model "passes" nearly every
        # item; only float noise in its image @ texts.T matmul (1 ulp either way) breaks some ties
        raw = scores.scores
        assert metrics["acc"] == metrics["text_acc"] == extra["text_acc_cb"]
        assert metrics["acc"] == pytest.approx(float((raw[:, 0] >= raw[:, 1]).float().mean()), abs=1e-6)
        assert metrics["acc"] > 0.5  # biased upwards (measured at n=500: 0.97 one-hot, 0.82 dense)
        assert float((raw[:, 0] - raw[:, 1]).abs().max()) < 1e-6
        assert extra["tie_rate"] == 1.0 and extra["text_acc_strict"] == 0.0
        assert extra["text_acc_ties_split"] == 0.5  # exactly chance


@pytest.mark.parametrize("see_colors", [False, True])
def test_bag_of_words_relation_is_exactly_half(root: Path, transform, tokenizer, see_colors: bool):
    model = BagOfWords(tokenizer, embedding="onehot", see_colors=see_colors).eval()
    metrics, scores = bow_scores(model, root, "shapes_relation", transform, tokenizer)
    extra = selection_metrics(scores)
    assert extra["tie_rate"] == 0.0
    assert metrics["acc"] == extra["text_acc_strict"] == extra["text_acc_ties_split"] == 0.5


def test_bag_of_words_relation_dense_within_sampling_error(root: Path, transform, tokenizer):
    model = BagOfWords(tokenizer, embedding="dense", see_colors=True).eval()
    metrics, scores = bow_scores(model, root, "shapes_relation", transform, tokenizer)
    sigma = math.sqrt(0.25 / N)
    assert abs(metrics["acc"] - 0.5) <= 3 * sigma, metrics
    assert selection_metrics(scores)["tie_rate"] == 0.0


def test_bag_of_words_passes_control(root: Path, transform, tokenizer):
    model = BagOfWords(tokenizer, embedding="onehot", see_colors=True).eval()
    metrics, scores = bow_scores(model, root, "shapes_control", transform, tokenizer)
    items = suites.read_meta(root / "shapes_control")["items"]
    color_items = torch.tensor([item["attribute"] == "color" for item in items])
    margin = scores.scores[:, 0] - scores.scores[:, 1]
    assert bool((margin[color_items] > 0).all())  # every colour replacement detected
    assert selection_metrics(scores)["tie_rate"] == 0.0
    assert metrics["acc"] == pytest.approx(float((margin > 0).float().mean()), abs=1e-6)
    assert metrics["acc"] > 0.6  # colour items alone give 0.5; shape items add whatever the word weights give
    # the same model is held to exactly chance on binding
    _, binding = bow_scores(model, root, "shapes_binding", transform, tokenizer)
    assert selection_metrics(binding)["text_acc_ties_split"] == 0.5
