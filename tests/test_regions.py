import pytest

from powerclip.regions import (
    FelzenszwalbSegmenter,
    PatchGrid,
    RandomBoxSegmenter,
    Region,
    regions_to_cells,
)

GRID = PatchGrid(image_size=224, patch_size=16)  # 14 x 14, as in the paper


def test_full_image_box_covers_every_cell():
    assert GRID.box_to_cells((0, 0, 224, 224), 224, 224) == list(range(196))


def test_exact_single_cell():
    # cell (row 2, col 3) spans x 48..64, y 32..48
    assert GRID.box_to_cells((48, 32, 16, 16), 224, 224) == [2 * 14 + 3]


def test_half_cell_overlap_rule():
    # x from 40 to 72: covers col 2 by 8 px (half: kept), col 3 fully, col 4 by 8 px (kept)
    assert GRID.box_to_cells((40, 0, 32, 16), 224, 224) == [2, 3, 4]
    # x from 41 to 71: col 2 by 7 px and col 4 by 7 px (less than half: dropped)
    assert GRID.box_to_cells((41, 0, 30, 16), 224, 224) == [3]


def test_thin_box_keeps_the_cell_under_its_centre():
    assert GRID.box_to_cells((100, 100, 2, 2), 224, 224) == [6 * 14 + 6]


def test_edges_and_boxes_spilling_outside():
    assert GRID.box_to_cells((216, 216, 100, 100), 224, 224) == [195]  # clipped to the last cell
    assert GRID.box_to_cells((-50, -50, 66, 66), 224, 224) == [0]
    assert GRID.box_to_cells((300, 0, 10, 10), 224, 224) is None  # entirely outside


def test_non_square_image_follows_resize_and_centre_crop():
    # 448 x 224 (w x h): resized to 448 x 224 (shorter side 224), then 112 px cut on each side.
    assert GRID.crop_geometry(448, 224) == (1.0, 1.0, 112, 0)
    assert GRID.box_to_cells((0, 0, 100, 224), 448, 224) is None  # falls in the cropped-away band
    assert GRID.box_to_cells((112, 0, 16, 16), 448, 224) == [0]
    # 100 x 200: scaled by 2.24, crop removes 112 px top and bottom
    sx, sy, left, top = GRID.crop_geometry(100, 200)
    assert (left, top) == (0, 112) and sx == pytest.approx(2.24)
    assert GRID.box_to_cells((0, 50, 100, 100), 100, 200) == list(range(196))


def test_small_grid_of_the_demo():
    grid = PatchGrid(image_size=64, patch_size=8)
    assert grid.num_cells == 64
    assert grid.box_to_cells((8, 8, 16, 8), 64, 64) == [9, 10]


def test_grid_validation():
    with pytest.raises(ValueError, match="multiple"):
        PatchGrid(image_size=100, patch_size=16)


def test_regions_sorted_by_area_deduped_and_capped():
    regions = [
        Region(area=10, bbox=(0, 0, 16, 16)),
        Region(area=500, bbox=(0, 0, 224, 224)),
        Region(area=20, bbox=(1, 1, 15, 15)),  # same single cell as the first: duplicate
        Region(area=30, bbox=(500, 500, 5, 5)),  # outside
        Region(area=40, bbox=(16, 16, 16, 16)),
    ]
    from collections import Counter

    counts = Counter()
    cells = regions_to_cells(regions, GRID, 224, 224, max_regions=3, counters=counts)
    assert cells == [list(range(196)), [15], [0]]
    assert counts["regions_found"] == 5 and counts["regions_outside_crop"] == 1
    assert counts["regions_duplicate"] == 1 and counts["regions_capped"] == 0 and counts["regions_kept"] == 3
    counts.clear()
    assert regions_to_cells(regions, GRID, 224, 224, max_regions=2, counters=counts) == [list(range(196)), [15]]
    assert counts["regions_capped"] == 2 and counts["regions_kept"] == 2
    assert len(regions_to_cells(regions, GRID, 224, 224, dedupe=False)) == 4


def test_felzenszwalb_finds_the_synthetic_objects():
    from powerclip.synthetic import ShapesConfig, ShapesGenerator

    gen = ShapesGenerator(ShapesConfig(), seed=3)
    seg = FelzenszwalbSegmenter(scale=500, sigma=0.5, min_size=30)
    found = total = 0
    for i in range(20):
        sample = gen.sample(0, i)
        regions = seg(sample["image"])
        assert all(r.area > 0 for r in regions)
        for obj in sample["meta"]["objects"]:
            x, y, w, h = obj["bbox"]
            total += 1
            found += any(
                abs(r.bbox[0] - x) <= 2 and abs(r.bbox[1] - y) <= 2 and abs(r.bbox[2] - w) <= 3 and abs(r.bbox[3] - h) <= 3
                for r in regions
            )
    assert found / total >= 0.9


def test_random_boxes_are_deterministic_per_key():
    from PIL import Image

    image = Image.new("RGB", (80, 60))
    seg = RandomBoxSegmenter(min_regions=2, max_regions=5, seed=1)
    a, b, c = seg(image, "k1"), seg(image, "k1"), seg(image, "k2")
    assert a == b and a != c
    assert 2 <= len(a) <= 5
    for r in a:
        x, y, w, h = r.bbox
        assert 0 <= x and x + w <= 80 and 0 <= y and y + h <= 60
        assert r.area == pytest.approx(w * h)
    assert RandomBoxSegmenter(seed=2)(image, "k1") != RandomBoxSegmenter(seed=1)(image, "k1")


def _shapes_shard(path, n=4, image_size=64):
    from powerclip.synthetic import ShapesConfig, write_shard

    write_shard(path, "s", 0, n, seed=0, config=ShapesConfig(image_size=image_size))
    return path


def test_segment_shard_counts_images_without_regions(tmp_path):
    from powerclip.csr import decode_regions
    from powerclip.regions import segment_shard
    from powerclip.shards import iter_samples, read_keys

    raw = _shapes_shard(tmp_path / "raw.tar")
    keys = read_keys(raw)

    def every_other(image, calls=[]):  # noqa: B006 - a call counter
        calls.append(1)
        return [Region(area=10.0, bbox=(0, 0, 20, 20))] if len(calls) % 2 else []

    stats = segment_shard(raw, tmp_path / "r.tar", tmp_path / "r.json", "s", "felzenszwalb", PatchGrid(64, 8), segmenter=every_other)
    samples = list(iter_samples(tmp_path / "r.tar"))
    assert [s["__key__"] for s in samples] == keys
    cells = [decode_regions(s["samlens.npy"], s["samcat.npy"]) for s in samples]
    assert cells[0] == [[0, 1, 2, 8, 9, 10, 16, 17, 18]] and cells[1] == [] and cells[3] == []
    assert stats["samples_out"] == 2 and stats["skipped_by_reason"] == {"no_region": 2}


def test_segment_shard_failure_names_shard_and_key(tmp_path):
    from powerclip.regions import segment_shard
    from powerclip.shards import ShardWriter

    raw = tmp_path / "broken.tar"
    with ShardWriter(raw) as sink:
        sink.write("k_bad", {"jpg": b"\xff\xd8 not really a jpeg", "txt": b"x"})
    with pytest.raises(RuntimeError, match=r"shard broken .*sample 'k_bad'"):
        segment_shard(raw, tmp_path / "r.tar", tmp_path / "r.json", "broken", "random", PatchGrid(64, 8))
    assert not (tmp_path / "r.tar").exists() and not (tmp_path / "r.json").exists()
    with ShardWriter(raw) as sink:
        sink.write("k_noimage", {"txt": b"x"})
    with pytest.raises(ValueError, match=r"shard broken, sample 'k_noimage' has no image"):
        segment_shard(raw, tmp_path / "r.tar", tmp_path / "r.json", "broken", "random", PatchGrid(64, 8))


@pytest.mark.slow
def test_segment_shard_with_sam2_random_weights(tmp_path):
    """The SAM2 path end to end on CPU: random weights, so only the format is checked."""
    from powerclip.csr import decode_regions
    from powerclip.regions import segment_shard
    from powerclip.shards import iter_samples, read_keys

    raw = _shapes_shard(tmp_path / "raw.tar", n=2)
    options = {
        "config": "configs/sam2.1/sam2.1_hiera_t.yaml",
        "allow_random_weights": True,
        "points_per_side": 2,
        "pred_iou_thresh": 0.0,
        "stability_score_thresh": 0.0,
        "device": "cpu",
    }
    stats = segment_shard(raw, tmp_path / "r.tar", tmp_path / "r.json", "s", "sam2", PatchGrid(64, 8), options=options)
    samples = list(iter_samples(tmp_path / "r.tar"))
    assert [s["__key__"] for s in samples] == read_keys(raw)
    for sample in samples:
        for region in decode_regions(sample["samlens.npy"], sample["samcat.npy"]):
            assert region and all(0 <= c < 64 for c in region)
    assert stats["samples_in"] == 2 == stats["samples_out"] + stats["samples_skipped"]
    assert stats["counters"]["regions_found"] >= 1


# ------------------------------------------------------------------------------ oracle regions and quality
def test_oracle_sidecar_cells_are_the_generator_boxes_mapped_by_the_grid(tmp_path):
    import json

    from powerclip.csr import decode_regions
    from powerclip.regions import segment_shard
    from powerclip.shards import iter_samples

    raw = _shapes_shard(tmp_path / "raw.tar", n=6)
    grid = PatchGrid(64, 8)
    stats = segment_shard(raw, tmp_path / "r.tar", tmp_path / "r.json", "s", "oracle", grid)
    metas = [json.loads(s["json"]) for s in iter_samples(raw, fields={"json"})]
    for meta, sample in zip(metas, iter_samples(tmp_path / "r.tar"), strict=True):
        by_area = sorted(meta["objects"], key=lambda o: -o["area"])  # stored largest first, as every source
        expected = [grid.box_to_cells(o["bbox"], meta["width"], meta["height"]) for o in by_area]
        assert decode_regions(sample["samlens.npy"], sample["samcat.npy"]) == expected
    objects = sum(len(m["objects"]) for m in metas)
    assert stats["samples_out"] == 6 and stats["counters"]["regions_kept"] == objects
    # the oracle finds every object, at a rank below the number of objects of its image
    quality = stats["info"]["quality"]
    assert stats["counters"]["objects"] == stats["counters"]["objects_matched"] == objects == quality["objects"]
    assert sum(quality["first_match_at_rank"][:4]) == objects and sum(quality["background_at_rank"]) == 0


def test_oracle_refuses_samples_without_objects(tmp_path):
    from powerclip.regions import segment_shard
    from powerclip.shards import ShardWriter

    from servers import image_bytes

    raw = tmp_path / "web.tar"
    with ShardWriter(raw) as sink:
        sink.write("k0", {"jpg": image_bytes("JPEG", (10, 200, 10)), "txt": b"a green picture", "json": b'{"url": "x"}'})
    with pytest.raises(RuntimeError, match=r"shard web .*sample 'k0'.*oracle region source needs the exact objects.*no objects"):
        segment_shard(raw, tmp_path / "r.tar", tmp_path / "r.json", "web", "oracle", PatchGrid(64, 8))
    assert not (tmp_path / "r.tar").exists()


def test_region_quality_by_rank_and_the_table(tmp_path):
    import csv
    import json

    from powerclip.evaluation.region_quality import QualityTally, cell_iou, write_quality_table

    assert cell_iou([0, 1, 2, 3], [2, 3, 4, 5]) == pytest.approx(2 / 6)
    tally = QualityTally(num_cells=16)
    everything, left, right = list(range(16)), [0, 1, 4, 5], [2, 3, 6, 7]
    # image 1: background first, then the left object's box; objects left and right (right never found)
    tally.add([everything, left], [left, right])
    # image 2: a 3-cell region half on the right object (IoU 3/4: a match at rank 0), one object outside the crop
    tally.add([[2, 3, 6]], [right, None])
    # image 3: no ground truth; one background region
    tally.add([list(range(15))])
    q = tally.to_dict()
    assert q["regions_at_rank"] == [3, 1] and q["background_at_rank"] == [2]
    assert q["first_match_at_rank"] == [1, 1] and q["objects"] == 3 and q["objects_outside_crop"] == 1
    stats = tmp_path / "00000.stats.json"
    stats.write_text(json.dumps({"shard": "00000", "samples_in": 3, "info": {"quality": q}}))
    rows = write_quality_table({"mine": [stats]}, [1, 5], tmp_path / "quality.csv")
    k1, k5 = rows
    assert k1["topk_per_image"] == pytest.approx(3 / 3) and k1["background_share"] == pytest.approx(2 / 3)
    assert k1["object_recall"] == pytest.approx(1 / 3) and k5["object_recall"] == pytest.approx(2 / 3)
    assert k5["regions_per_image"] == pytest.approx(4 / 3) and k5["background_share"] == pytest.approx(2 / 4)
    with open(tmp_path / "quality.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["k"] for r in table] == ["1", "5"] and table[1]["object_recall"] == "0.6667" and table[0]["objects"] == "3"
    # a source without ground truth: counts only, recall left empty
    q.pop("objects")
    stats.write_text(json.dumps({"shard": "00000", "samples_in": 3, "info": {"quality": q}}))
    (row,) = write_quality_table({"web": [stats]}, [5], tmp_path / "quality.csv")
    assert row["object_recall"] == "" and row["objects"] == ""
    stats.write_text(json.dumps({"shard": "00000", "samples_in": 3}))
    with pytest.raises(ValueError, match="shard '00000'.*no info.quality"):
        write_quality_table({"web": [stats]}, [5], tmp_path / "quality.csv")


def test_each_source_is_built_through_the_registry_with_its_config_block():
    from powerclip.regions import SEGMENTERS, OracleSegmenter, build_segmenter

    from powerclip.settings import load_schema

    assert set(SEGMENTERS) == {"sam", "sam2", "felzenszwalb", "random", "oracle"}
    # the sources the config schema (and so the workflow's wildcards) allow are exactly the registry's
    assert load_schema("config")["properties"]["segment"]["properties"]["sources"]["items"]["enum"] == list(SEGMENTERS)
    assert isinstance(build_segmenter("felzenszwalb", {"scale": 500, "sigma": 0.5, "min_size": 30}), FelzenszwalbSegmenter)
    # the stage's seed is the default; the block's own seed (the demo config sets one) wins
    assert build_segmenter("random", {"max_regions": 5}, seed=3).seed == 3
    random = build_segmenter("random", {"seed": 7, "max_regions": 5}, seed=3)
    assert isinstance(random, RandomBoxSegmenter) and (random.seed, random.max_regions) == (7, 5)
    assert isinstance(build_segmenter("oracle"), OracleSegmenter)
    with pytest.raises(ValueError, match="oracle region source has no options"):
        build_segmenter("oracle", {"scale": 1})
    with pytest.raises(TypeError):
        build_segmenter("felzenszwalb", {"scael": 500})
    with pytest.raises(ValueError, match="unknown region source 'slic'"):
        build_segmenter("slic")
