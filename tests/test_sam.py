"""powerclip.sam: SAM / SAM 2 segmenters, and the boxes-only generator against the stock one.

Fast tests cover argument checking (no model is built), the box convention and the agreement measure. The
slow ones build SAM ViT-B and SAM 2.1 Hiera-T with random weights on CPU (no checkpoints offline): both
quality thresholds at 0 so masks survive, a 4x4 point grid, each model built once per module and each
(model, generator, image) segmented once (plus one repeat per model for determinism). Random weights give
small logits (|x| < 0.4): at the mask threshold 0 every mask is scattered over the whole image and every box
is the whole image, which would make the box comparison vacuous; at 0.1 many masks are a few blobs with
boxes of their own (checked: the comparison needs distinct boxes smaller than the image).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

from powerclip.regions import Region
from powerclip.sam import (
    Sam2Segmenter,
    SamSegmenter,
    build_sam_segmenter,
    sam2_config_names,
    valid_kwargs,
)
from powerclip.sam_boxes import region_agreement

SAM_SMALL = {"model_type": "vit_b"}
SAM2_SMALL = {"config": "configs/sam2.1/sam2.1_hiera_t.yaml"}
FORMAT_CHECK = {
    "allow_random_weights": True,
    "device": "cpu",
    "points_per_side": 4,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "mask_threshold": 0.1,
}
# The bar for "the same regions": box IoU >= 0.9 for >= 95 % of the top-k regions, rank by rank.
TOP_K, MIN_IOU, MIN_AGREEMENT = 32, 0.9, 0.95


def disks(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (30, 30, 30))
    draw = ImageDraw.Draw(image)
    draw.ellipse((0.1 * width, 0.1 * height, 0.5 * width, 0.5 * height), fill=(220, 40, 40))
    draw.ellipse((0.5 * width, 0.4 * height, 0.9 * width, 0.9 * height), fill=(40, 200, 60))
    draw.ellipse((0.15 * width, 0.6 * height, 0.35 * width, 0.85 * height), fill=(40, 60, 220))
    return image


IMAGES = {"square64": (64, 64), "wide80x48": (80, 48)}


# ---------------------------------------------------------------- fast: argument checking, no model built


def test_import_is_cheap():
    code = "import sys, powerclip.sam; print(any(m in sys.modules for m in ('torch', 'segment_anything', 'sam2')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(
    ("cls", "kwargs", "expected", "key"),
    [
        (SamSegmenter, {}, "sam_vit_h_4b8939.pth", "segment.sam.checkpoint"),
        (SamSegmenter, SAM_SMALL, "sam_vit_b_01ec64.pth", "segment.sam.checkpoint"),
        (Sam2Segmenter, {}, "sam2.1_hiera_large.pt", "segment.sam2.checkpoint"),
        (Sam2Segmenter, SAM2_SMALL, "sam2.1_hiera_tiny.pt", "segment.sam2.checkpoint"),
    ],
)
def test_missing_checkpoint_is_a_helpful_error(cls, kwargs, expected, key):
    with pytest.raises(ValueError, match="no checkpoint") as info:
        cls(**kwargs)
    message = str(info.value)
    assert expected in message
    assert key in message  # the config key that sets it
    assert "allow_random_weights" in message


@pytest.mark.parametrize("source", ["sam", "sam2"])
def test_nonexistent_checkpoint(tmp_path, source):
    missing = tmp_path / "nope" / "weights.pth"
    with pytest.raises(FileNotFoundError, match="weights.pth"):
        build_sam_segmenter(source, checkpoint=str(missing))


@pytest.mark.parametrize("source", ["sam", "sam2"])
def test_factory_rejects_unknown_kwargs(source):
    with pytest.raises(TypeError, match="points_per_sid") as info:
        build_sam_segmenter(source, points_per_sid=8, checkpoint="x.pth")
    assert "points_per_side" in str(info.value)  # the valid names are listed
    assert "min_mask_region_area" in str(info.value)


def test_factory_rejects_unknown_source():
    with pytest.raises(ValueError, match="sam, sam2"):
        build_sam_segmenter("sam3")


def test_valid_kwargs():
    common = ["checkpoint", "device", "allow_random_weights", "generator", "precision", "compile", "image_batch_size",
              "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh",
              "crop_n_layers", "min_mask_region_area", "mask_threshold"]  # fmt: skip
    assert valid_kwargs("sam") == ["model_type", *common]
    assert valid_kwargs("sam2") == ["config", *common]


@pytest.mark.parametrize("cls", [SamSegmenter, Sam2Segmenter])
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"generator": "fast"}, "boxes, stock"),
        ({"precision": "fp16"}, "auto, fp32, bf16"),
        ({"image_batch_size": 0}, "image_batch_size must be >= 1"),
        ({"generator": "stock", "image_batch_size": 4}, "image_batch_size > 1 needs generator 'boxes' \\(segment.sam2?.generator\\)"),
        ({"crop_n_layers": 1}, "crop_n_layers > 0 .* needs generator 'stock' \\(segment.sam2?.generator\\)"),
    ],
)
def test_generator_options_are_checked_before_the_model_is_built(cls, options, match):
    # No checkpoint and no allow_random_weights: had the options passed, the error would name the checkpoint.
    with pytest.raises(ValueError, match=match):
        cls(**options)


def test_sam_stock_generator_is_fp32_only():
    with pytest.raises(ValueError, match="only in fp32"):
        SamSegmenter(generator="stock", precision="bf16")


def test_sam_boxes_path_refuses_opencv_post_processing():
    with pytest.raises(ValueError, match="min_mask_region_area > 0 .* needs generator 'stock' \\(segment.sam2?.generator\\)"):
        SamSegmenter(model_type="vit_b", allow_random_weights=True, min_mask_region_area=100)


def test_unknown_model_type_and_config():
    with pytest.raises(ValueError, match="vit_h, vit_l, vit_b"):
        SamSegmenter(model_type="vit_x", allow_random_weights=True)
    with pytest.raises(ValueError, match="sam2.1_hiera_t.yaml"):
        Sam2Segmenter(config="configs/sam2.1/sam2.1_hiera_xl.yaml", allow_random_weights=True)


def test_sam2_config_names():
    names = sam2_config_names()
    for size in ("t", "s", "b+", "l"):
        assert f"configs/sam2.1/sam2.1_hiera_{size}.yaml" in names


def test_sam_min_mask_region_area_needs_cv2():
    try:
        import cv2  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("opencv is installed")
    with pytest.raises(ImportError, match="opencv"):
        SamSegmenter(model_type="vit_b", allow_random_weights=True, generator="stock", min_mask_region_area=100)


def test_sam2_min_mask_region_area_needs_cuda_extension():
    # sam2 1.1.0 does hole filling with the sam2._C CUDA kernel: on CPU, or without the extension, refuse.
    with pytest.raises((ImportError, ValueError), match="sam2._C"):
        Sam2Segmenter(**SAM2_SMALL, allow_random_weights=True, device="cpu", min_mask_region_area=100)


# ---------------------------------------------------------------- slow: random-weight models on CPU


@pytest.fixture(scope="module")
def segmenters():
    """(source, generator) -> segmenter, each built once, on first use. Both generators of a source get the
    same random weights (the same seed); SAM 2's boxes-only one encodes 2 images per pass in segment_batch."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    built = {}

    def get(source: str, generator: str = "boxes"):
        if (source, generator) not in built:
            options = {**(SAM_SMALL if source == "sam" else SAM2_SMALL), **FORMAT_CHECK, "generator": generator}
            if (source, generator) == ("sam2", "boxes"):
                options["image_batch_size"] = 2
            built[source, generator] = build_sam_segmenter(source, **options)
        return built[source, generator]

    return get


@pytest.fixture(scope="module")
def results(segmenters):
    """(source, image name, generator) -> regions, each computed once (an encoder pass costs ~3-80 s on 2 shared CPU cores)."""
    cache: dict[tuple[str, str, str], list[Region]] = {}

    def get(source: str, name: str, generator: str = "boxes") -> list[Region]:
        if (source, name, generator) not in cache:
            cache[source, name, generator] = segmenters(source, generator)(disks(*IMAGES[name]))
        return cache[source, name, generator]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source", "name"),
    # SAM's ViT-B encoder pass is the expensive one (~15-30 s here): it gets only the non-square image
    # (letterboxed to 1024 inside SAM), SAM 2 (~3-7 s) gets both.
    [("sam", "wide80x48"), ("sam2", "square64"), ("sam2", "wide80x48")],
)
def test_regions_format(results, source, name):
    width, height = IMAGES[name]
    regions = results(source, name)
    assert isinstance(regions, list)
    assert len(regions) >= 1
    for region in regions:
        assert isinstance(region, Region)
        assert isinstance(region.area, float) and 0 <= region.area <= width * height
        if region.area == 0:  # an empty mask, kept at thresholds 0 by both generators: SAM's box [0, 0, 0, 0]
            assert region.bbox == (0.0, 0.0, 1.0, 1.0)
        assert len(region.bbox) == 4 and all(isinstance(v, float) for v in region.bbox)
        x, y, w, h = region.bbox
        assert x >= 0 and y >= 0 and w >= 1 and h >= 1
        assert x + w <= width and y + h <= height


@pytest.mark.slow
@pytest.mark.parametrize("source", ["sam", "sam2"])
def test_deterministic(segmenters, results, source):
    first = results(source, "wide80x48")
    again = segmenters(source)(disks(*IMAGES["wide80x48"]))
    assert again == first


@pytest.mark.slow
def test_accepts_non_rgb_input(results, segmenters):
    # A non-RGB (here RGBA, opaque) image is converted to RGB first: same pixels, same regions.
    rgba = disks(*IMAGES["square64"]).convert("RGBA")
    assert segmenters("sam2")(rgba) == results("sam2", "square64")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["sam", "sam2"])
def test_checkpoint_round_trip(tmp_path, segmenters, source):
    # The real-run path: a checkpoint file in each library's format (SAM: a bare state dict; SAM 2: {"model": ...})
    # is loaded strictly into a freshly built model. Built only, no encoder pass.
    import torch

    state = segmenters(source).model.state_dict()
    path = tmp_path / f"{source}.pt"
    torch.save(state if source == "sam" else {"model": state}, path)
    small = SAM_SMALL if source == "sam" else SAM2_SMALL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # a different random init, so equality below comes from the file
        loaded = build_sam_segmenter(source, **small, checkpoint=str(path), device="cpu")
    assert loaded.checkpoint == path
    loaded_state = loaded.model.state_dict()
    assert loaded_state.keys() == state.keys()
    assert all(torch.equal(loaded_state[k], state[k]) for k in state)


def test_sam_boxes_become_pixel_extents():
    from powerclip.sam import _masks_to_regions

    # SAM reports a one-pixel mask at (3, 4) as XYWH [3, 4, 0, 0] (inclusive max - min)
    (region,) = _masks_to_regions([{"area": 1, "bbox": [3, 4, 0, 0]}])
    assert region.bbox == (3.0, 4.0, 1.0, 1.0)


def test_boxes_rows_give_the_stock_records_regions():
    # The boxes-only path hands over (x0, y0, x1, y1, area) rows; the stock generator records (XYWH bbox from
    # the same box function, area from the RLE). Both must become the same regions, the empty mask included.
    torch = pytest.importorskip("torch")
    from segment_anything.utils.amg import area_from_rle, batched_mask_to_box, box_xyxy_to_xywh, mask_to_rle_pytorch

    from powerclip.sam import _masks_to_regions
    from powerclip.sam_boxes import boxes_to_regions

    masks = torch.rand(6, 12, 17, generator=torch.Generator().manual_seed(0)) > 0.9
    masks[0] = False
    masks[0, 3, 4] = True  # one pixel at x=4, y=3
    masks[1] = False
    masks[1, 2:5, 6:16] = True  # a 10 x 3 rectangle
    masks[2] = False  # empty
    boxes = batched_mask_to_box(masks)
    records = [
        {"area": area_from_rle(rle), "bbox": box_xyxy_to_xywh(box).tolist()}
        for rle, box in zip(mask_to_rle_pytorch(masks), boxes, strict=True)
    ]
    rows = torch.cat([boxes.float(), masks.sum(dim=(-2, -1))[:, None].float()], dim=1).numpy()
    regions = boxes_to_regions(rows)
    assert regions == _masks_to_regions(records)
    assert regions[:3] == [Region(1.0, (4.0, 3.0, 1.0, 1.0)), Region(30.0, (6.0, 2.0, 10.0, 3.0)),
                           Region(0.0, (0.0, 0.0, 1.0, 1.0))]  # fmt: skip


def _region(area, x, y, w, h):
    return Region(float(area), (float(x), float(y), float(w), float(h)))


def test_region_agreement_compares_rank_by_rank():
    ref = [_region(100, 0, 0, 10, 10), _region(50, 20, 20, 5, 10), _region(20, 5, 30, 4, 5)]
    assert region_agreement(ref, list(reversed(ref))) == 1.0  # the area rank counts, not the list order
    assert region_agreement([], []) == 1.0
    assert region_agreement(ref, [ref[0], _region(50, 24, 20, 5, 10), ref[2]]) == pytest.approx(2 / 3)  # IoU 1/9
    # the same boxes, but the two smaller regions' areas exchanged: ranks 2 and 3 no longer match
    swapped = [ref[0], _region(20, 20, 20, 5, 10), _region(50, 5, 30, 4, 5)]
    assert region_agreement(ref, swapped) == pytest.approx(1 / 3)
    assert region_agreement(ref, ref[:2]) == pytest.approx(2 / 3)  # a missing region is a miss
    assert region_agreement(ref[:2], ref) == pytest.approx(2 / 3)  # and so is an extra one
    assert region_agreement(ref, swapped, top_k=1) == 1.0
    # the IoU bar: 10x10 vs 10x9 is 0.9
    assert region_agreement([_region(1, 0, 0, 10, 10)], [_region(1, 0, 0, 10, 9)], min_iou=0.9) == 1.0
    assert region_agreement([_region(1, 0, 0, 10, 10)], [_region(1, 0, 0, 10, 8)], min_iou=0.9) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("source", ["sam", "sam2"])
def test_boxes_path_gives_the_stock_regions(segmenters, results, source):
    """The issue's check: same weights, same points and thresholds, the boxes-only generator gives the stock
    generator's top-k regions (box IoU >= 0.9 for >= 95 %, rank by rank in area order, the areas too)."""
    import torch

    stock_state = segmenters(source, "stock").model.state_dict()
    boxes_state = segmenters(source).model.state_dict()
    assert all(torch.equal(stock_state[k], boxes_state[k]) for k in stock_state)
    width, height = IMAGES["wide80x48"]
    stock, boxes = results(source, "wide80x48", "stock"), results(source, "wide80x48")
    ranked = sorted(stock, key=lambda r: -r.area)[:TOP_K]
    # not a vacuous comparison: distinct boxes, some well inside the image
    assert len({r.bbox for r in ranked}) >= 3
    assert any(r.bbox[2] * r.bbox[3] < 0.5 * width * height for r in ranked)
    assert len(boxes) == len(stock)
    assert region_agreement(stock, boxes, TOP_K, MIN_IOU) >= MIN_AGREEMENT
    ranked_boxes = sorted(boxes, key=lambda r: -r.area)[:TOP_K]
    assert [r.area for r in ranked_boxes] == pytest.approx([r.area for r in ranked], rel=0.02)


@pytest.mark.slow
def test_boxes_path_filters_by_predicted_iou_as_stock(segmenters, results):
    # The boxes-only path filters by predicted IoU before upsampling, the stock one after: the same masks must
    # survive. SAM 2's random decoder predicts IoUs of 0.47-0.55 here; at 0.53 about a third of them pass.
    # (The stability filter cannot be exercised with random weights: their logits never pass the +1 offset.)
    found = {}
    for generator in ("boxes", "stock"):
        segmenter = segmenters("sam2", generator)
        segmenter.reconfigure(pred_iou_thresh=0.53)
        try:
            found[generator] = segmenter(disks(*IMAGES["square64"]))
        finally:
            segmenter.reconfigure(pred_iou_thresh=0.0)
    assert 1 <= len(found["stock"]) < len(results("sam2", "square64"))  # the filter changes the result
    assert len(found["boxes"]) == len(found["stock"])
    assert region_agreement(found["stock"], found["boxes"], TOP_K, MIN_IOU) >= MIN_AGREEMENT


@pytest.mark.slow
def test_segment_batch_encodes_images_together(segmenters, results):
    # SAM 2's boxes-only segmenter has image_batch_size=2: one encoder pass for both images, and the regions
    # of each image as when it is segmented alone.
    segmenter = segmenters("sam2")
    batch_sizes = []
    hook = segmenter.model.image_encoder.register_forward_hook(lambda m, args, out: batch_sizes.append(len(args[0])))
    try:
        batch = segmenter.segment_batch([disks(*IMAGES[name]) for name in IMAGES])
    finally:
        hook.remove()
    assert batch_sizes == [2]
    for name, regions in zip(IMAGES, batch, strict=True):
        alone = results("sam2", name)
        assert len(regions) == len(alone)
        assert region_agreement(alone, regions, TOP_K, MIN_IOU) >= MIN_AGREEMENT


@pytest.mark.slow
def test_reconfigure_and_compile(segmenters):
    # compile=True compiles the image encoder in place (nothing runs until the first image): the model keeps
    # its state_dict keys, so checkpoints load as before. reconfigure() swaps generators on the same model.
    segmenter = build_sam_segmenter("sam2", **SAM2_SMALL, **FORMAT_CHECK, compile=True)
    assert segmenter.model.state_dict().keys() == segmenters("sam2").model.state_dict().keys()
    assert segmenter.boxes is not None and segmenter.generator is None
    assert segmenter.reconfigure(generator="stock") is segmenter
    assert segmenter.generator is not None and segmenter.boxes is None
    assert segmenter.options["generator"] == "stock" and segmenter.options["compile"] is True
    with pytest.raises(ValueError, match="already compiled"):
        segmenter.reconfigure(compile=False)
    with pytest.raises(TypeError, match="points_per_sid"):
        segmenter.reconfigure(points_per_sid=2)
