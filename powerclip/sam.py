"""SAM and SAM 2 as region sources: automatic mask generation -> :class:`~powerclip.regions.Region` lists.

Two sources, both callables ``PIL.Image -> list[Region]`` (a :data:`~powerclip.grid.Segmenter`):

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

Two generators (``generator``), both over the same point grid with the same filters:

* ``"boxes"`` (default) -- :class:`powerclip.sam_boxes.BoxesGenerator`: the image encoder once per image,
  the decoder on ``points_per_batch`` points at a time, every mask reduced to its box and pixel area on the
  device (no RLE, no per-mask CPU work: the workflow keeps nothing else of a mask). ``image_batch_size``
  images share an encoder pass in :meth:`~_AmgSegmenter.segment_batch`; ``powerclip.regions.segment_shard``
  calls the segmenter one image at a time, so there it has no effect.
* ``"stock"`` -- the packages' ``SamAutomaticMaskGenerator`` / ``SAM2AutomaticMaskGenerator``, kept for
  checking and for what the boxes-only path does not do (crops, SAM's opencv hole/island removal).

``tests/test_sam.py`` checks on CPU, with the same random weights and points, that both give the same
regions in the same order. ``mask_threshold`` is the logit above which a pixel is in a mask (0, as upstream).

A mask's ``bbox`` is SAM's own: XYWH in the input image's pixels, computed from the mask's first/last
foreground column/row, so ``w = last_col - first_col`` (a one-pixel-wide mask has ``w == 0``);
``area`` is the mask's pixel count. Both models resize internally (SAM: long side to 1024; SAM 2: to
1024x1024) and map masks back to the original size, so the encoder costs the same for any input size.

Precision (``precision``): ``"auto"`` runs the encoders and the decoder under
``torch.autocast(<device>, dtype=torch.bfloat16)`` on a CUDA device that supports bf16 and in fp32 on the
CPU; ``"fp32"`` and ``"bf16"`` force one (bf16 on CPU works but is slow without bf16 instructions). The
boxes-only path upsamples and thresholds the logits in fp32. SAM's *stock* generator runs only in fp32:
segment_anything hands its tensors to numpy, which has no bf16 (facebookresearch/segment-anything PR #787
is unmerged). SAM 2's stock generator under autocast is what the upstream sam2 examples do.
``compile=True`` compiles the image encoder in place with ``torch.compile`` (off by default: the first image
then takes minutes). Inference always runs under ``torch.inference_mode()``.

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

from powerclip.grid import Region
from powerclip.sam_boxes import BoxesGenerator, Sam2Adapter, SamAdapter, boxes_to_regions

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
GENERATORS = ("boxes", "stock")
PRECISIONS = ("auto", "fp32", "bf16")
# Options of the stock generators that both generators share (same names, same meaning).
AMG_OPTIONS = (
    "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh",
    "crop_n_layers", "min_mask_region_area",
)  # fmt: skip
# What reconfigure() may change: everything but the model and its device.
GENERATOR_OPTIONS = ("generator", "precision", "compile", "image_batch_size", *AMG_OPTIONS, "mask_threshold")
# Seed for the random initialisation used with allow_random_weights=True (reproducible format checks).
RANDOM_WEIGHTS_SEED = 0
# Where the workflow config (config/config.yaml) sets the checkpoint; named in the error messages.
CHECKPOINT_CONFIG_KEY = "segment.{source}.checkpoint"
GENERATOR_CONFIG_KEY = "segment.{source}.generator"


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


def _check_options(options: dict[str, Any], source: str) -> None:
    """Checks of the generator options that need no model (run before one is built)."""
    for name in ("points_per_side", "points_per_batch", "image_batch_size"):
        if options[name] < 1:
            raise ValueError(f"{name} must be >= 1, got {options[name]}")
    for name in ("crop_n_layers", "min_mask_region_area"):
        if options[name] < 0:
            raise ValueError(f"{name} must be >= 0, got {options[name]}")
    if options["generator"] not in GENERATORS:
        raise ValueError(f"unknown generator {options['generator']!r}; valid: {', '.join(GENERATORS)}")
    if options["precision"] not in PRECISIONS:
        raise ValueError(f"unknown precision {options['precision']!r}; valid: {', '.join(PRECISIONS)}")
    key = GENERATOR_CONFIG_KEY.format(source=source)
    if options["generator"] == "stock" and options["image_batch_size"] != 1:
        raise ValueError(f"image_batch_size > 1 needs generator 'boxes' ({key}): the stock one encodes an image at a time")
    if options["generator"] == "boxes" and options["crop_n_layers"] > 0:
        raise ValueError(f"crop_n_layers > 0 (crops) needs generator 'stock' ({key}): boxes segments the whole image")
    if source == "sam" and options["generator"] == "stock" and options["precision"] == "bf16":
        # segment_anything's stock generator hands its tensors to numpy, which has no bf16 (PR #787 unmerged).
        raise ValueError(f"SAM's stock generator runs only in fp32 (segment_anything hands its tensors to numpy, "
                         f"which has no bf16): use generator 'boxes' ({key}), or precision 'auto' or 'fp32'")


def _generator_options(values: dict[str, Any]) -> dict[str, Any]:
    """The generator options among a constructor's arguments (``locals()``)."""
    return {name: values[name] for name in GENERATOR_OPTIONS}


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
    """Shared call path: RGB arrays -> the boxes-only generator or the stock generator -> regions.

    Subclasses build ``self.model`` and provide the stock generator, the boxes-only adapter and the image
    encoder; :meth:`_configure` sets the generator up from the options, :meth:`reconfigure` changes them on
    the same model (how the tests and ``bench/bench_sam.py`` compare the generators on identical weights).
    """

    source = ""
    model: Any
    device: str
    options: dict[str, Any]
    generator: Any = None  # the stock generator, or None
    boxes: BoxesGenerator | None = None  # the boxes-only generator, or None
    bf16: bool = False  # whether the encoders and the decoder run under bf16 autocast
    _compiled: bool = False

    def _stock_generator(self, mask_threshold: float, **amg_options: Any) -> Any:
        raise NotImplementedError

    def _adapter(self, mask_threshold: float, min_mask_region_area: int) -> Any:
        raise NotImplementedError

    def _image_encoder(self) -> Any:
        raise NotImplementedError

    def _check_device_options(self, options: dict[str, Any]) -> None:
        """Source-specific checks (optional packages, CUDA-only features); raise on a bad combination."""

    def _use_bf16(self, precision: str, generator: str) -> bool:
        import torch

        cuda = self.device.startswith("cuda")
        supported = not cuda or torch.cuda.is_bf16_supported()
        if precision == "bf16" and not supported:
            raise ValueError(f"precision='bf16' requested but {self.device} does not support bf16")
        numpy_bound = self.source == "sam" and generator == "stock"  # fp32 only, see _check_options
        return precision == "bf16" or (precision == "auto" and cuda and supported and not numpy_bound)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            import torch

            return torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _configure(self, options: dict[str, Any]) -> None:
        _check_options(options, self.source)
        self._check_device_options(options)
        self.bf16 = self._use_bf16(options["precision"], options["generator"])
        if options["compile"] and not self._compiled:
            self._image_encoder().compile()  # in place: the model's state_dict keys are unchanged
            self._compiled = True
        elif self._compiled and not options["compile"]:
            raise ValueError("the image encoder is already compiled; build a new segmenter for compile=False")
        amg_options = {name: options[name] for name in AMG_OPTIONS}
        if options["generator"] == "stock":
            self.generator = self._stock_generator(options["mask_threshold"], **amg_options)
            self.boxes = None
        else:
            self.generator = None
            self.boxes = BoxesGenerator(
                self._adapter(options["mask_threshold"], options["min_mask_region_area"]),
                points_per_side=options["points_per_side"],
                points_per_batch=options["points_per_batch"],
                pred_iou_thresh=options["pred_iou_thresh"],
                stability_score_thresh=options["stability_score_thresh"],
                box_nms_thresh=options["box_nms_thresh"],
                image_batch_size=options["image_batch_size"],
                autocast=self._autocast,
            )
        self.options = dict(options)
        log.info("%s on %s: %s (bf16 autocast: %s)", self.source, self.device, self.options, self.bf16)

    def reconfigure(self, **changes: Any) -> _AmgSegmenter:
        """Change generator options (``generator``, thresholds, ...) on the same model; returns self."""
        unknown = sorted(set(changes) - set(GENERATOR_OPTIONS))
        if unknown:
            raise TypeError(f"not a generator option: {', '.join(unknown)}; valid: {', '.join(GENERATOR_OPTIONS)}")
        self._configure({**self.options, **changes})
        return self

    def segment_batch(self, images: list[Image.Image]) -> list[list[Region]]:
        """Regions of several images; the boxes-only generator encodes ``image_batch_size`` at a time."""
        import torch

        arrays = [_to_rgb_array(image) for image in images]
        with torch.inference_mode():
            if self.boxes is not None:
                found = [boxes_to_regions(rows) for rows in self.boxes.generate(arrays)]
            else:
                found = []
                for array in arrays:
                    with self._autocast():
                        found.append(_masks_to_regions(self.generator.generate(array)))
        for array, regions in zip(arrays, found, strict=True):
            log.debug("%s: %d regions on a %dx%d image", self.source, len(regions), array.shape[1], array.shape[0])
        return found

    def __call__(self, image: Image.Image) -> list[Region]:
        return self.segment_batch([image])[0]


class SamSegmenter(_AmgSegmenter):
    """Segment Anything (v1) automatic mask generation as a region source.

    ``checkpoint`` is required unless ``allow_random_weights=True`` (format check only). The generator
    parameters are SAM's ``SamAutomaticMaskGenerator`` ones (defaults = SAM's, tuned for ViT-H);
    ``min_mask_region_area > 0`` needs opencv (``cv2``) and the stock generator. ``generator``,
    ``precision``, ``compile`` and ``image_batch_size``: see the module docstring.
    """

    source = "sam"

    def __init__(
        self,
        model_type: str = "vit_h",
        checkpoint: str | Path | None = None,
        device: str = "auto",
        allow_random_weights: bool = False,
        generator: str = "boxes",
        precision: str = "auto",
        compile: bool = False,  # noqa: A002 -- the config key's name
        image_batch_size: int = 1,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        min_mask_region_area: int = 0,
        mask_threshold: float = 0.0,
    ) -> None:
        if model_type not in SAM_MODEL_TYPES:
            raise ValueError(f"unknown SAM model_type {model_type!r}; valid: {', '.join(SAM_MODEL_TYPES)}")
        options = _generator_options(locals())
        _check_options(options, self.source)
        self._check_device_options(options)
        hint = (
            f"Download {SAM_CHECKPOINTS[model_type]} (model_type={model_type!r}) from {SAM_CHECKPOINT_URL} "
            f"and set its path with the config key {CHECKPOINT_CONFIG_KEY.format(source='sam')} (SamSegmenter(checkpoint=...)); "
            "allow_random_weights=True runs untrained weights (format check only)."
        )
        ckpt = _check_checkpoint(checkpoint, allow_random_weights, f"SAM {model_type}", hint)

        import torch
        from segment_anything import sam_model_registry

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
        self._configure(options)

    def _check_device_options(self, options: dict[str, Any]) -> None:
        if options["min_mask_region_area"] == 0:
            return
        if options["generator"] == "boxes":
            raise ValueError("SAM's min_mask_region_area > 0 (opencv hole/island removal, per mask on the CPU) needs "
                             f"generator 'stock' ({GENERATOR_CONFIG_KEY.format(source='sam')}): boxes has no per-mask CPU work")
        try:
            import cv2  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "SamSegmenter(min_mask_region_area>0) removes small regions with opencv, which is not "
                "installed: pip install opencv-python-headless, or set min_mask_region_area=0"
            ) from exc

    def _stock_generator(self, mask_threshold: float, **amg_options: Any) -> Any:
        from segment_anything import SamAutomaticMaskGenerator

        self.model.mask_threshold = mask_threshold  # segment_anything reads it from the model
        return SamAutomaticMaskGenerator(self.model, **amg_options)

    def _adapter(self, mask_threshold: float, min_mask_region_area: int) -> SamAdapter:
        self.model.mask_threshold = mask_threshold
        return SamAdapter(self.model)

    def _image_encoder(self) -> Any:
        return self.model.image_encoder


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
    masks with the ``sam2._C`` CUDA extension (it does not use opencv), so it needs that extension and CUDA
    (both generators). ``generator``, ``precision``, ``compile`` and ``image_batch_size``: see the module docstring.
    """

    source = "sam2"

    def __init__(
        self,
        config: str = "configs/sam2.1/sam2.1_hiera_l.yaml",
        checkpoint: str | Path | None = None,
        device: str = "auto",
        allow_random_weights: bool = False,
        generator: str = "boxes",
        precision: str = "auto",
        compile: bool = False,  # noqa: A002 -- the config key's name
        image_batch_size: int = 1,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        min_mask_region_area: int = 0,
        mask_threshold: float = 0.0,
    ) -> None:
        options = _generator_options(locals())
        _check_options(options, self.source)
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
        self._check_device_options(options)

        from sam2.build_sam import build_sam2

        self.config = config
        self.checkpoint = ckpt
        with _seeded(ckpt is None):
            # build_sam2 skips loading when ckpt_path is None; with a path it torch.load()s it on CPU and
            # loads the "model" entry strictly.
            model = build_sam2(config, str(ckpt) if ckpt is not None else None, device=self.device, mode="eval")
        self.model = model.eval()
        self._configure(options)

    def _check_device_options(self, options: dict[str, Any]) -> None:
        if options["min_mask_region_area"] == 0:
            return
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

    def _stock_generator(self, mask_threshold: float, **amg_options: Any) -> Any:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        with _quiet_jit_script():
            return SAM2AutomaticMaskGenerator(self.model, mask_threshold=mask_threshold, **amg_options)

    def _adapter(self, mask_threshold: float, min_mask_region_area: int) -> Sam2Adapter:
        with _quiet_jit_script():
            return Sam2Adapter(self.model, mask_threshold, min_mask_region_area)

    def _image_encoder(self) -> Any:
        return self.model.image_encoder


@contextlib.contextmanager
def _quiet_jit_script() -> Iterator[None]:
    """SAM2Transforms calls torch.jit.script, deprecated in torch 2.14: its FutureWarning is not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        yield


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
