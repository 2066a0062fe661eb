"""Image regions -> patch-grid cells: the geometry shared by every region source.

A segmenter returns regions in the *original* image's pixel coordinates (area + bounding box). The
trainer resizes the shorter side to ``image_size`` and centre-crops (torchvision ``Resize`` +
``CenterCrop``), then cuts the crop into ``(image_size // patch_size)**2`` patches. A region's box goes
through the same resize/crop and becomes the row-major indices of the cells it covers: a cell belongs to
the box when the box overlaps it by at least ``min_overlap`` of a cell along *each* axis. Along an axis
where the box is too thin to overlap any cell that much, the cell holding the box's centre is used, so a
box that intersects the crop always keeps at least one cell. Boxes entirely outside the crop are dropped.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Region:
    """One region in original-image pixel coordinates: ``bbox`` = (x, y, w, h), as SAM reports it."""

    area: float
    bbox: tuple[float, float, float, float]


# A segmenter maps an RGB PIL image to its regions (any order; they are sorted by area afterwards).
Segmenter = Callable[["Image.Image"], list[Region]]  # noqa: F821


@dataclass(frozen=True)
class PatchGrid:
    image_size: int = 224
    patch_size: int = 16
    min_overlap: float = 0.5

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0.0 < self.min_overlap <= 1.0:
            raise ValueError(f"min_overlap must be in (0, 1], got {self.min_overlap}")

    @property
    def cells_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_cells(self) -> int:
        return self.cells_per_side**2

    def crop_geometry(self, width: int, height: int) -> tuple[float, float, int, int]:
        """(scale_x, scale_y, left, top) of torchvision's Resize(image_size) + CenterCrop(image_size)."""
        size = self.image_size
        if width <= height:
            new_w, new_h = size, int(size * height / width)
        else:
            new_w, new_h = int(size * width / height), size
        left = int(round((new_w - size) / 2.0))
        top = int(round((new_h - size) / 2.0))
        return new_w / width, new_h / height, left, top

    def _axis_cells(self, lo: float, hi: float) -> list[int]:
        p = self.patch_size
        cells = [c for c in range(self.cells_per_side) if min(hi, (c + 1) * p) - max(lo, c * p) >= self.min_overlap * p]
        if not cells:
            centre = min(int((lo + hi) / 2 // p), self.cells_per_side - 1)
            cells = [centre]
        return cells

    def box_to_cells(self, bbox_xywh: Sequence[float], width: int, height: int) -> list[int] | None:
        """Cells (row-major) covered by a box given in original-image pixels; None if outside the crop."""
        x, y, w, h = (float(v) for v in bbox_xywh)
        sx, sy, left, top = self.crop_geometry(width, height)
        size = self.image_size
        x0, x1 = max(0.0, x * sx - left), min(float(size), (x + w) * sx - left)
        y0, y1 = max(0.0, y * sy - top), min(float(size), (y + h) * sy - top)
        if x1 <= x0 or y1 <= y0:
            return None
        cols = self._axis_cells(x0, x1)
        rows = self._axis_cells(y0, y1)
        g = self.cells_per_side
        return [r * g + c for r in rows for c in cols]


def regions_to_cells(
    regions: Sequence[Region],
    grid: PatchGrid,
    width: int,
    height: int,
    max_regions: int | None = None,
    dedupe: bool = True,
    counters=None,
) -> list[list[int]]:
    """Regions -> cell lists by descending area (ties keep the segmenter's order).

    ``dedupe`` drops a region whose cell set equals that of a larger region (SAM often returns nested
    masks with the same box on a coarse grid; duplicates would waste top-k slots). ``counters`` (a
    Counter) receives regions_found / regions_outside_crop / regions_duplicate / regions_capped / regions_kept.
    """
    order = sorted(range(len(regions)), key=lambda i: -float(regions[i].area))
    kept: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    tally = {"regions_found": len(regions), "regions_outside_crop": 0, "regions_duplicate": 0, "regions_capped": 0}
    for i in order:
        cells = grid.box_to_cells(regions[i].bbox, width, height)
        if cells is None:
            tally["regions_outside_crop"] += 1
            continue
        signature = tuple(cells)
        if dedupe and signature in seen:
            tally["regions_duplicate"] += 1
            continue
        if max_regions is not None and len(kept) >= max_regions:
            tally["regions_capped"] += 1
            continue
        seen.add(signature)
        kept.append(cells)
    tally["regions_kept"] = len(kept)
    if counters is not None:
        counters.update(tally)
    return kept


class FelzenszwalbSegmenter:
    """scikit-image's graph-based segmentation: the offline stand-in for SAM (no weights needed)."""

    def __init__(self, scale: float = 100.0, sigma: float = 0.8, min_size: int = 20):
        self.scale, self.sigma, self.min_size = float(scale), float(sigma), int(min_size)

    def __call__(self, image) -> list[Region]:
        from skimage.measure import regionprops
        from skimage.segmentation import felzenszwalb

        labels = felzenszwalb(np.asarray(image), scale=self.scale, sigma=self.sigma, min_size=self.min_size)
        regions = []
        for prop in regionprops(labels + 1):
            r0, c0, r1, c1 = prop.bbox
            regions.append(Region(area=float(prop.area), bbox=(float(c0), float(r0), float(c1 - c0), float(r1 - r0))))
        return regions


class RandomBoxSegmenter:
    """Random boxes, the paper's random-mask ablation; deterministic per (seed, sample key)."""

    def __init__(self, min_regions: int = 3, max_regions: int = 8, min_side: float = 0.1, max_side: float = 0.6, seed: int = 0):
        if not 0 < min_regions <= max_regions:
            raise ValueError(f"need 0 < min_regions <= max_regions, got {min_regions}, {max_regions}")
        if not 0 < min_side <= max_side <= 1:
            raise ValueError(f"need 0 < min_side <= max_side <= 1, got {min_side}, {max_side}")
        self.min_regions, self.max_regions = int(min_regions), int(max_regions)
        self.min_side, self.max_side, self.seed = float(min_side), float(max_side), int(seed)

    def __call__(self, image, key: str = "") -> list[Region]:
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode("utf-8"))])
        width, height = image.size
        n = int(rng.integers(self.min_regions, self.max_regions + 1))
        regions = []
        for _ in range(n):
            w = rng.uniform(self.min_side, self.max_side) * width
            h = rng.uniform(self.min_side, self.max_side) * height
            x = rng.uniform(0, width - w)
            y = rng.uniform(0, height - h)
            regions.append(Region(area=float(w * h), bbox=(float(x), float(y), float(w), float(h))))
        return regions


class OracleSegmenter:
    """The exact objects of a sample as its regions: each object's box (``{key}.json``, the synthetic source's
    metadata) with its painted area, so a run can train with perfect regions and the region sources can be
    compared against it. It reads the sample's metadata, not the image."""

    def __call__(self, image, meta: dict | None) -> list[Region]:
        objects = object_boxes(meta)
        if objects is None:
            raise ValueError(
                "the oracle region source needs the exact objects of every sample (`objects` with a "
                "`bbox` each in {key}.json, as the synthetic source writes them); this sample has "
                f"{'no json member' if meta is None else 'no objects'}. Use the oracle only for synthetic data "
                "(or local copies of it), or choose another region source"
            )
        return [Region(area=float(area), bbox=bbox) for bbox, area in objects]


def object_boxes(meta: dict | None) -> list[tuple[tuple[float, float, float, float], float]] | None:
    """``[(bbox xywh, area), ...]`` of the exact objects in a sample's metadata, or None when it has none."""
    if not isinstance(meta, dict) or not isinstance(meta.get("objects"), list):
        return None
    try:
        return [(tuple(float(v) for v in o["bbox"]), float(o.get("area", o["bbox"][2] * o["bbox"][3]))) for o in meta["objects"]]
    except (KeyError, TypeError, IndexError, ValueError):
        return None


def _random_segmenter(seed: int = 0, **options) -> RandomBoxSegmenter:
    options.setdefault("seed", seed)
    return RandomBoxSegmenter(**options)


def _oracle_segmenter(seed: int = 0, **options) -> OracleSegmenter:
    if options:
        raise ValueError(f"the oracle region source has no options, got {sorted(options)}")
    return OracleSegmenter()


def _sam_segmenter(source: str):
    def build(seed: int = 0, **options):
        from powerclip.sam import build_sam_segmenter  # heavy, optional (segment-anything / sam2)

        return build_sam_segmenter(source, **options)

    return build


# source name -> builder(seed=..., **its config block); unknown keys of a block are an error of the builder
SEGMENTERS: dict[str, Callable[..., object]] = {
    "sam": _sam_segmenter("sam"),
    "sam2": _sam_segmenter("sam2"),
    "felzenszwalb": lambda seed=0, **options: FelzenszwalbSegmenter(**options),
    "random": _random_segmenter,
    "oracle": _oracle_segmenter,
}
REGION_SOURCES = tuple(SEGMENTERS)


def build_segmenter(source: str, options: dict | None = None, seed: int = 0):
    """The segmenter of a region source, from its config block (unknown keys are an error)."""
    if source not in SEGMENTERS:
        raise ValueError(f"unknown region source {source!r}; choose from {REGION_SOURCES}")
    return SEGMENTERS[source](seed=seed, **dict(options or {}))


def segment_shard(
    raw_tar,
    out_tar,
    stats_path,
    shard: str,
    source: str,
    grid: PatchGrid,
    segmenter=None,
    options: dict | None = None,
    max_regions: int | None = 32,
    dedupe: bool = True,
    seed: int = 0,
) -> dict:
    """Write the regions sidecar of one raw shard: ``{key}.samlens.npy`` + ``{key}.samcat.npy``.

    Every sample gets an entry, in shard order. An image with no region (after the crop) gets an empty
    entry and is counted as skipped ("no_region"). A failure of the segmenter or of image decoding stops
    the shard with an error naming the shard and the key: a broken raw shard must be fixed, not thinned.
    The regions' quality (powerclip.evaluation.region_quality: background boxes by rank and, for samples
    with exact objects in ``{key}.json``, the rank of each object's first matching region) goes into the
    statistics as ``info.quality``, with the counters ``objects`` and ``objects_matched``.
    """
    from tqdm import tqdm

    from powerclip.csr import npy_bytes, region_arrays
    from powerclip.evaluation.region_quality import QualityTally
    from powerclip.shards import ShardWriter, StageStats, decode_image, image_field, iter_samples

    stats = StageStats("segment_shard", shard)
    stats.info.update(
        source=source,
        image_size=grid.image_size,
        patch_size=grid.patch_size,
        min_overlap=grid.min_overlap,
        max_regions=max_regions,
        dedupe=dedupe,
        options=dict(options or {}),
    )
    segmenter = segmenter or build_segmenter(source, options, seed)
    takes_key = isinstance(segmenter, RandomBoxSegmenter)
    quality = QualityTally(grid.num_cells)
    with ShardWriter(out_tar) as sink:
        samples = iter_samples(raw_tar, fields={"jpg", "jpeg", "png", "webp", "json"})
        for sample in tqdm(samples, desc=f"segment {source} {shard}", mininterval=10, disable=None):
            key = sample["__key__"]
            stats.samples_in += 1
            ext = image_field(sample)
            if ext is None:
                raise ValueError(f"{raw_tar}: shard {shard}, sample {key!r} has no image (jpg/jpeg/png/webp)")
            meta = _sample_meta(sample.get("json"))
            try:
                image = decode_image(sample[ext])
                if isinstance(segmenter, OracleSegmenter):
                    found = segmenter(image, meta)
                else:
                    found = segmenter(image, key) if takes_key else segmenter(image)
            except Exception as exc:
                raise RuntimeError(f"segment_shard {source}: shard {shard} ({raw_tar}), sample {key!r}: {exc}") from exc
            cells = regions_to_cells(found, grid, *image.size, max_regions=max_regions, dedupe=dedupe, counters=stats.counters)
            objects = object_boxes(meta)
            targets = None if objects is None else [grid.box_to_cells(box, *image.size) for box, _ in objects]
            quality.add(cells, targets)
            if cells:
                stats.samples_out += 1
            else:
                stats.skip("no_region", key, f"{len(found)} regions found, none inside the crop")
            lengths, indices = region_arrays(cells, grid.num_cells)
            sink.write(key, {"samlens.npy": npy_bytes(lengths), "samcat.npy": npy_bytes(indices)})
    stats.info["quality"] = quality.to_dict()
    if quality.images_with_objects:
        stats.counters.update(objects=quality.objects, objects_matched=sum(quality.first_match_at_rank))
    return stats.write(stats_path)


def _sample_meta(raw: bytes | None) -> dict | None:
    """A sample's ``json`` member as a dict (None when absent or not a JSON object: metadata is optional)."""
    import json

    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None
