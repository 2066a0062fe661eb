"""powerclip.sam: SAM / SAM 2 segmenters.

Fast tests cover argument checking (no model is built). The slow ones build SAM ViT-B and SAM 2.1 Hiera-T
with random weights on CPU (no checkpoints offline) -- a format check: thresholds at 0 so masks survive,
a 2x2 point grid, each model built once per module and each (model, image) segmented once (plus one
repeat per model for determinism).
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

SAM_SMALL = {"model_type": "vit_b"}
SAM2_SMALL = {"config": "configs/sam2.1/sam2.1_hiera_t.yaml"}
FORMAT_CHECK = {
    "allow_random_weights": True,
    "device": "cpu",
    "points_per_side": 2,
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
}


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
    common = ["checkpoint", "device", "allow_random_weights", "points_per_side", "points_per_batch",
              "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_n_layers", "min_mask_region_area"]
    assert valid_kwargs("sam") == ["model_type", *common]
    assert valid_kwargs("sam2") == ["config", *common]


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
        SamSegmenter(model_type="vit_b", allow_random_weights=True, min_mask_region_area=100)


def test_sam2_min_mask_region_area_needs_cuda_extension():
    # sam2 1.1.0 does hole filling with the sam2._C CUDA kernel: on CPU, or without the extension, refuse.
    with pytest.raises((ImportError, ValueError), match="sam2._C"):
        Sam2Segmenter(**SAM2_SMALL, allow_random_weights=True, device="cpu", min_mask_region_area=100)


# ---------------------------------------------------------------- slow: random-weight models on CPU


@pytest.fixture(scope="module")
def segmenters():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return {
        "sam": build_sam_segmenter("sam", **SAM_SMALL, **FORMAT_CHECK),
        "sam2": build_sam_segmenter("sam2", **SAM2_SMALL, **FORMAT_CHECK),
    }


@pytest.fixture(scope="module")
def results(segmenters):
    """(source, image name) -> regions, each computed once (an encoder pass costs ~3-30 s on 2 CPU cores)."""
    cache: dict[tuple[str, str], list[Region]] = {}

    def get(source: str, name: str) -> list[Region]:
        if (source, name) not in cache:
            cache[source, name] = segmenters[source](disks(*IMAGES[name]))
        return cache[source, name]

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
        assert isinstance(region.area, float) and 0 < region.area <= width * height
        assert len(region.bbox) == 4 and all(isinstance(v, float) for v in region.bbox)
        x, y, w, h = region.bbox
        assert x >= 0 and y >= 0 and w >= 1 and h >= 1
        assert x + w <= width and y + h <= height


@pytest.mark.slow
@pytest.mark.parametrize("source", ["sam", "sam2"])
def test_deterministic(segmenters, results, source):
    first = results(source, "wide80x48")
    again = segmenters[source](disks(*IMAGES["wide80x48"]))
    assert again == first


@pytest.mark.slow
def test_accepts_non_rgb_input(results, segmenters):
    # A non-RGB (here RGBA, opaque) image is converted to RGB first: same pixels, same regions.
    rgba = disks(*IMAGES["square64"]).convert("RGBA")
    assert segmenters["sam2"](rgba) == results("sam2", "square64")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["sam", "sam2"])
def test_checkpoint_round_trip(tmp_path, segmenters, source):
    # The real-run path: a checkpoint file in each library's format (SAM: a bare state dict; SAM 2: {"model": ...})
    # is loaded strictly into a freshly built model. Built only, no encoder pass.
    import torch

    state = segmenters[source].model.state_dict()
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
