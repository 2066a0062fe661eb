"""SAM and SAM 2 as region sources: automatic mask generation -> :class:`~powerclip.regions.Region` lists.

Two sources, both callables ``PIL.Image -> list[Region]`` (a :data:`~powerclip.regions.Segmenter`):

* ``"sam"`` -- :class:`SamSegmenter`, Segment Anything (``segment_anything``, Kirillov et al. 2023):
  ``sam_model_registry[model_type]`` + ``SamAutomaticMaskGenerator``. The paper's setting is ViT-H with the
  checkpoint ``sam_vit_h_4b8939.pth`` (model types ``vit_h``, ``vit_l``, ``vit_b``).
* ``"sam2"`` -- :class:`Sam2Segmenter`, SAM 2 / SAM 2.1 (``sam2``): ``build_sam2(config, ckpt)`` +
  ``SAM2AutomaticMaskGenerator``. The default is SAM 2.1 Hiera-L with the checkpoint
  ``sam2.1_hiera_large.pt``; configs are names inside the installed ``sam2`` package, e.g.
  ``configs/sam2.1/sam2.1_hiera_{t,s,b+,l}.yaml`` (and ``configs/sam2/sam2_hiera_*.yaml`` for SAM 2.0).

Real runs need the checkpoints; they are not downloaded here (the workflow has no internet). Passing
``allow_random_weights=True`` without a checkpoint keeps the model's random initialisation (seeded, so
reproducible): the output then has the right *format* but no meaning -- a format check for tests only.
With random weights the default quality filters (``pred_iou_thresh``, ``stability_score_thresh``) keep no
masks at all; tests set both to 0.

A mask's ``bbox`` is SAM's own: XYWH in the input image's pixels, computed from the mask's first/last
foreground column/row, so ``w = last_col - first_col`` (a one-pixel-wide mask has ``w == 0``);
``area`` is the mask's pixel count. Both generators resize internally (SAM: long side to 1024; SAM 2: to
1024x1024) and map masks back to the original size, so the encoder costs the same for any input size.

Precision: SAM runs in fp32 everywhere -- segment_anything has no bf16 support upstream (its predictor
hands tensors to numpy, which has no bf16; facebookresearch/segment-anything PR #787 is unmerged), so
autocast is not used for it. SAM 2 on CUDA runs under ``torch.autocast("cuda", dtype=torch.bfloat16)`` as
the upstream sam2 examples do (only when ``torch.cuda.is_bf16_supported()``); on CPU it runs in fp32.
Neither CUDA path was run here (no GPU). Inference always runs under ``torch.inference_mode()``.

``import powerclip.sam`` is cheap: torch, segment_anything and sam2 are imported when a segmenter is built.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from powerclip.regions import Region

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

log = logging.getLogger(__name__)

SAM_MODEL_TYPES = ("vit_h", "vit_l", "vit_b")
SAM_CHECKPOINTS = {
    "vit_h": "sam_vit_h_4b8939.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_b": "sam_vit_b_01ec64.pth",
}
SAM_CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM2_CHECKPOINTS = {
    "configs/sam2.1/sam2.1_hiera_t.yaml": "sam2.1_hiera_tiny.pt",
    "configs/sam2.1/sam2.1_hiera_s.yaml": "sam2.1_hiera_small.pt",
    "configs/sam2.1/sam2.1_hiera_b+.yaml": "sam2.1_hiera_base_plus.pt",
    "configs/sam2.1/sam2.1_hiera_l.yaml": "sam2.1_hiera_large.pt",
    "configs/sam2/sam2_hiera_t.yaml": "sam2_hiera_tiny.pt",
    "configs/sam2/sam2_hiera_s.yaml": "sam2_hiera_small.pt",
    "configs/sam2/sam2_hiera_b+.yaml": "sam2_hiera_base_plus.pt",
    "configs/sam2/sam2_hiera_l.yaml": "sam2_hiera_large.pt",
}
SAM2_CHECKPOINT_URLS = {  # by config folder
    "configs/sam2.1": "https://dl.fbaipublicfiles.com/segment_anything_2/092824/",
    "configs/sam2": "https://dl.fbaipublicfiles.com/segment_anything_2/072824/",
}
# Seed for the random initialisation used with allow_random_weights=True (reproducible format checks).
RANDOM_WEIGHTS_SEED = 0
# Where the workflow config (config/config.yaml) sets the checkpoint; named in the error messages.
CHECKPOINT_CONFIG_KEY = "segment.{source}.checkpoint"


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` if available else ``"cpu"``; anything else is returned unchanged."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} requested but torch.cuda.is_available() is False")
    return device


def _check_checkpoint(checkpoint: str | Path | None, allow_random_weights: bool, what: str, hint: str) -> Path | None:
    if checkpoint is None:
        if not allow_random_weights:
            raise ValueError(f"{what}: no checkpoint given. {hint}")
        log.warning("%s: no checkpoint, keeping RANDOM weights -- output is a format check only, not segmentation", what)
        return None
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}: checkpoint not found: {str(path)!r}. {hint}")
    return path


def _check_common(points_per_side: int, points_per_batch: int, crop_n_layers: int, min_mask_region_area: int) -> None:
    if points_per_side < 1:
        raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
    if points_per_batch < 1:
        raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
    if crop_n_layers < 0:
        raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
    if min_mask_region_area < 0:
        raise ValueError(f"min_mask_region_area must be >= 0, got {min_mask_region_area}")


@contextlib.contextmanager
def _seeded(enabled: bool) -> Iterator[None]:
    """Fixed torch seed for a random initialisation, without disturbing the caller's RNG state."""
    if not enabled:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        yield


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    if getattr(image, "mode", "RGB") != "RGB":
        image = image.convert("RGB")
    array = np.array(image, dtype=np.uint8)  # a writable copy (torch warns on read-only numpy buffers)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {array.shape}")
    return array


def _masks_to_regions(masks: list[dict[str, Any]]) -> list[Region]:
    """SAM's mask records -> regions. SAM's XYWH box has w = last column - first column (inclusive
    indices); +1 makes it the pixel extent, as for the other sources, so a one-pixel-wide mask keeps w = 1."""
    regions = []
    for m in masks:
        x, y, w, h = (float(v) for v in m["bbox"])
        regions.append(Region(area=float(m["area"]), bbox=(x, y, w + 1.0, h + 1.0)))
    return regions


class _AmgSegmenter:
    """Shared call path: RGB array -> generator.generate() under inference_mode (+ autocast) -> regions."""

    source = ""
    generator: Any
    device: str
    _autocast_bf16: bool = False

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._autocast_bf16:
            import torch

            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, image: Image.Image) -> list[Region]:
        import torch

        array = _to_rgb_array(image)
        with torch.inference_mode(), self._autocast():
            masks = self.generator.generate(array)
        regions = _masks_to_regions(masks)
        log.debug("%s: %d regions on a %dx%d image", self.source, len(regions), array.shape[1], array.shape[0])
        return regions


class SamSegmenter(_AmgSegmenter):
    """Segment Anything (v1) automatic mask generation as a region source.

    ``checkpoint`` is required unless ``allow_random_weights=True`` (format check only). The generator
    parameters are SAM's ``SamAutomaticMaskGenerator`` ones (defaults = SAM's, tuned for ViT-H);
    ``min_mask_region_area > 0`` needs opencv (``cv2``).
    """

    source = "sam"

    def __init__(
        self,
        model_type: str = "vit_h",
        checkpoint: str | Path | None = None,
        device: str = "auto",
        allow_random_weights: bool = False,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        min_mask_region_area: int = 0,
    ) -> None:
        if model_type not in SAM_MODEL_TYPES:
            raise ValueError(f"unknown SAM model_type {model_type!r}; valid: {', '.join(SAM_MODEL_TYPES)}")
        _check_common(points_per_side, points_per_batch, crop_n_layers, min_mask_region_area)
        hint = (
            f"Download {SAM_CHECKPOINTS[model_type]} (model_type={model_type!r}) from {SAM_CHECKPOINT_URL} "
            f"and set its path with the config key {CHECKPOINT_CONFIG_KEY.format(source='sam')} (SamSegmenter(checkpoint=...)); "
            "allow_random_weights=True runs untrained weights (format check only)."
        )
        ckpt = _check_checkpoint(checkpoint, allow_random_weights, f"SAM {model_type}", hint)
        if min_mask_region_area > 0:
            try:
                import cv2  # noqa: F401
            except ImportError as exc:
                raise ImportError(
                    "SamSegmenter(min_mask_region_area>0) removes small regions with opencv, which is not "
                    "installed: pip install opencv-python-headless, or set min_mask_region_area=0"
                ) from exc

        import torch
        from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

        self.model_type = model_type
        self.checkpoint = ckpt
        self.device = resolve_device(device)
        with _seeded(ckpt is None):
            model = sam_model_registry[model_type](checkpoint=None)
        if ckpt is not None:
            # Loaded here rather than by sam_model_registry: map_location keeps a GPU-saved file loadable on CPU.
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            log.info("SAM %s: loaded %s", model_type, ckpt)
        self.model = model.to(self.device).eval()
        # SAM is run in fp32 even on CUDA: bf16 autocast is not supported by segment_anything's predictor.
        self._autocast_bf16 = False
        self.generator = SamAutomaticMaskGenerator(
            self.model,
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            box_nms_thresh=box_nms_thresh,
            crop_n_layers=crop_n_layers,
            min_mask_region_area=min_mask_region_area,
        )
        log.info(
            "SAM %s on %s: points_per_side=%d pred_iou_thresh=%s stability_score_thresh=%s",
            model_type, self.device, points_per_side, pred_iou_thresh, stability_score_thresh,
        )


def sam2_config_names() -> list[str]:
    """The model configs shipped inside the installed ``sam2`` package (names for ``build_sam2``)."""
    from importlib.resources import files

    root = files("sam2")
    names = []
    for sub in ("configs/sam2", "configs/sam2.1"):
        folder = root.joinpath(sub)
        if folder.is_dir():
            names += sorted(f"{sub}/{f.name}" for f in folder.iterdir() if f.name.endswith(".yaml"))
    return names


class Sam2Segmenter(_AmgSegmenter):
    """SAM 2 / SAM 2.1 automatic mask generation as a region source.

    ``config`` is a config name inside the ``sam2`` package (see :func:`sam2_config_names`); ``checkpoint``
    must match it and is required unless ``allow_random_weights=True`` (format check only). The generator
    parameters are ``SAM2AutomaticMaskGenerator``'s (defaults = SAM 2's, tuned for Hiera-L).
    ``min_mask_region_area > 0`` in sam2 1.1.0 fills holes / removes sprinkles in the 256x256 low-res
    masks with the ``sam2._C`` CUDA extension (it does not use opencv), so it needs that extension and CUDA.
    """

    source = "sam2"

    def __init__(
        self,
        config: str = "configs/sam2.1/sam2.1_hiera_l.yaml",
        checkpoint: str | Path | None = None,
        device: str = "auto",
        allow_random_weights: bool = False,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        min_mask_region_area: int = 0,
    ) -> None:
        _check_common(points_per_side, points_per_batch, crop_n_layers, min_mask_region_area)
        available = sam2_config_names()
        if config not in available:
            raise ValueError(f"unknown SAM 2 config {config!r}; the installed sam2 package has: {', '.join(available)}")
        hint = (
            f"Download {SAM2_CHECKPOINTS.get(config, 'the checkpoint matching ' + config)} from "
            f"{SAM2_CHECKPOINT_URLS.get(config.rsplit('/', 1)[0], 'https://github.com/facebookresearch/sam2')} and set its path with the config key {CHECKPOINT_CONFIG_KEY.format(source='sam2')} "
            "(Sam2Segmenter(checkpoint=...)); allow_random_weights=True runs untrained weights (format check only)."
        )
        ckpt = _check_checkpoint(checkpoint, allow_random_weights, f"SAM 2 {config}", hint)
        self.device = resolve_device(device)
        if min_mask_region_area > 0:
            self._check_hole_filling()

        import torch
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
        from sam2.build_sam import build_sam2

        self.config = config
        self.checkpoint = ckpt
        with _seeded(ckpt is None):
            # build_sam2 skips loading when ckpt_path is None; with a path it torch.load()s it on CPU and
            # loads the "model" entry strictly.
            model = build_sam2(config, str(ckpt) if ckpt is not None else None, device=self.device, mode="eval")
        self.model = model.eval()
        self._autocast_bf16 = self.device.startswith("cuda") and torch.cuda.is_bf16_supported()
        with warnings.catch_warnings():
            # SAM2Transforms (built by the generator's predictor) calls torch.jit.script, deprecated in torch 2.14.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
            self.generator = SAM2AutomaticMaskGenerator(
                self.model,
                points_per_side=points_per_side,
                points_per_batch=points_per_batch,
                pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh,
                box_nms_thresh=box_nms_thresh,
                crop_n_layers=crop_n_layers,
                min_mask_region_area=min_mask_region_area,
            )
        log.info(
            "SAM 2 %s on %s (bf16 autocast: %s): points_per_side=%d pred_iou_thresh=%s stability_score_thresh=%s",
            config, self.device, self._autocast_bf16, points_per_side, pred_iou_thresh, stability_score_thresh,
        )

    def _check_hole_filling(self) -> None:
        try:
            from sam2 import _C  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "Sam2Segmenter(min_mask_region_area>0) needs the sam2._C CUDA extension (connected components), "
                "which this sam2 install lacks (built with SAM2_BUILD_CUDA=0?): rebuild sam2 with its CUDA "
                "extension or set min_mask_region_area=0"
            ) from exc
        if not self.device.startswith("cuda"):
            raise ValueError("Sam2Segmenter(min_mask_region_area>0) works only on CUDA (sam2._C is a CUDA kernel)")


SEGMENTER_CLASSES: dict[str, type[_AmgSegmenter]] = {"sam": SamSegmenter, "sam2": Sam2Segmenter}


def valid_kwargs(source: str) -> list[str]:
    """Keyword arguments accepted by :func:`build_sam_segmenter` for ``source``."""
    if source not in SEGMENTER_CLASSES:
        raise ValueError(f"unknown SAM source {source!r}; valid: {', '.join(SEGMENTER_CLASSES)}")
    params = inspect.signature(SEGMENTER_CLASSES[source].__init__).parameters
    return [name for name in params if name != "self"]


def build_sam_segmenter(source: str, **kwargs: Any) -> SamSegmenter | Sam2Segmenter:
    """``"sam"`` -> :class:`SamSegmenter`, ``"sam2"`` -> :class:`Sam2Segmenter`; unknown kwargs are an error."""
    valid = valid_kwargs(source)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown option(s) for segmenter source {source!r}: {', '.join(unknown)}; valid: {', '.join(valid)}"
        )
    return SEGMENTER_CLASSES[source](**kwargs)  # type: ignore[return-value]
