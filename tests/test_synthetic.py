import hashlib
import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from powerclip.shards import StageStats, iter_samples
from powerclip.synthetic import (
    COLORS,
    SHAPES,
    ShapesConfig,
    ShapesGenerator,
    relation,
    rle_decode,
    rle_encode,
    write_shard,
)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_gives_identical_bytes(tmp_path):
    cfg = ShapesConfig()
    write_shard(tmp_path / "a.tar", "00003", 3, 25, seed=7, config=cfg)
    write_shard(tmp_path / "b.tar", "00003", 3, 25, seed=7, config=cfg)
    write_shard(tmp_path / "c.tar", "00003", 3, 25, seed=8, config=cfg)
    write_shard(tmp_path / "d.tar", "00004", 4, 25, seed=7, config=cfg)
    assert sha(tmp_path / "a.tar") == sha(tmp_path / "b.tar")
    assert len({sha(tmp_path / n) for n in ("a.tar", "c.tar", "d.tar")}) == 3


def test_shard_layout_and_stats(tmp_path):
    stats = StageStats("fetch_shard", "00000")
    write_shard(tmp_path / "s.tar", "00000", 0, 12, seed=0, config=ShapesConfig(image_size=96), stats=stats)
    samples = list(iter_samples(tmp_path / "s.tar"))
    assert [s["__key__"] for s in samples] == [f"00000_{i:06d}" for i in range(12)]
    for s in samples:
        assert set(s) == {"__key__", "jpg", "txt", "json"}
        assert Image.open(io.BytesIO(s["jpg"])).size == (96, 96)
    stats.check()
    assert stats.samples_in == stats.samples_out == 12


@pytest.fixture(scope="module")
def train_samples():
    gen = ShapesGenerator(ShapesConfig(), seed=0)
    return [gen.sample(0, i) for i in range(300)]


def test_objects_attributes_and_masks(train_samples):
    cfg = ShapesConfig()
    for sample in train_samples[:50]:
        meta = sample["meta"]
        objs = meta["objects"]
        assert cfg.min_objects <= len(objs) <= cfg.max_objects
        assert len({o["color"] for o in objs}) == len(objs) and len({o["shape"] for o in objs}) == len(objs)
        pixels = np.asarray(sample["image"]).astype(int)
        for o in objs:
            mask = rle_decode(o["mask"])
            assert mask.sum() == o["area"] > 0
            ys, xs = np.nonzero(mask)
            assert o["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            # the pixels under the mask carry the object's colour (jitter + JPEG: loose tolerance)
            inner = pixels[mask].mean(axis=0)
            assert np.abs(inner - np.asarray(COLORS[o["color"]])).max() < 40
        masks = [rle_decode(o["mask"]) for o in objs]
        assert (np.sum(masks, axis=0) <= 1).all()  # objects never overlap


def test_vocabulary_is_rich_enough(train_samples):
    objs = [o for s in train_samples for o in s["meta"]["objects"]]
    assert len({o["color"] for o in objs}) >= 6
    assert len({o["shape"] for o in objs}) >= 4
    assert {o["size"] for o in objs} == {"small", "large"}


def test_heldout_combos_never_in_train_always_in_heldout(train_samples):
    cfg = ShapesConfig()
    held = set(cfg.holdout_combos)
    assert not any(f"{o['color']} {o['shape']}" in held for s in train_samples for o in s["meta"]["objects"])
    gen = ShapesGenerator(cfg, seed=0)
    for i in range(50):
        objs = gen.sample(0, i, split="heldout")["meta"]["objects"]
        assert any(f"{o['color']} {o['shape']}" in held for o in objs)


def test_captions_state_true_relations_with_balanced_phrasing(train_samples):
    words = Counter()
    for sample in train_samples:
        caption, meta = sample["caption"], sample["meta"]
        for o in meta["objects"]:
            assert o["phrase"] in caption
        for rel in meta["relations"]:
            a, b = meta["objects"][rel["subject"]], meta["objects"][rel["object"]]
            (ax, ay), (bx, by) = [(o["bbox"][0] + o["bbox"][2] / 2, o["bbox"][1] + o["bbox"][3] / 2) for o in (a, b)]
            if rel["relation"] == "left_of":
                assert ax < bx
            elif rel["relation"] == "above":
                assert ay < by
        for word in ("left", "right", "above", "below"):
            words[word] += caption.count(word)
    # "A left of B" is said as "B right of A" half of the time: no word predicts the layout
    assert 0.4 < words["left"] / (words["left"] + words["right"]) < 0.6
    assert 0.4 < words["above"] / (words["above"] + words["below"]) < 0.6


def test_rle_round_trip_and_coco_compatibility():
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (64, 64), (1, 1)]:
        mask = rng.random(shape) > 0.5
        rle = rle_encode(mask)
        assert (rle_decode(rle) == mask).all()
    mask = np.zeros((6, 4), bool)
    mask[1:3, 2] = True
    assert rle_encode(mask) == {"size": [6, 4], "counts": [13, 2, 9]}
    pycocotools = pytest.importorskip("pycocotools.mask")
    coco = pycocotools.frPyObjects(rle_encode(mask), 6, 4)
    assert (pycocotools.decode(coco).astype(bool) == mask).all()


def test_config_validation():
    with pytest.raises(ValueError, match="holdout combo"):
        ShapesConfig(holdout_combos=("red banana",))
    with pytest.raises(ValueError, match="max_objects"):
        ShapesConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match="unknown shapes generator keys"):
        ShapesConfig.from_dict({"colours": ["red"]})
    assert len(SHAPES) >= 4 and len(COLORS) >= 6


def test_relation_needs_a_dominant_axis():
    from powerclip.synthetic import ShapeObject

    def obj(x, y):
        mask = np.zeros((64, 64), bool)
        mask[y : y + 4, x : x + 4] = True
        return ShapeObject("red", "square", "small", (x, y, x + 4, y + 4), mask)

    assert relation(obj(0, 30), obj(40, 30)) == "left_of"
    assert relation(obj(30, 40), obj(30, 0)) == "below"
    assert relation(obj(0, 0), obj(20, 20)) is None  # diagonal: ambiguous, never captioned
