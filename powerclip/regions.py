"""Region sources (felzenszwalb, random, oracle; SAM and SAM 2 in ``powerclip.sam``) and the regions
sidecar of a shard: each source's regions mapped onto the patch grid (``powerclip.grid``) by
:func:`regions_to_cells`.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from powerclip.grid import PatchGrid, Region  # noqa: F401  (PatchGrid re-exported)

log = logging.getLogger(__name__)


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


def _random_segmenter(options: dict, seed: int) -> RandomBoxSegmenter:
    return RandomBoxSegmenter(**{"seed": seed, **options})  # the block's own seed wins


def _oracle_segmenter(options: dict, seed: int) -> OracleSegmenter:
    if options:
        raise ValueError(f"the oracle region source has no options, got {sorted(options)}")
    return OracleSegmenter()


def _sam_segmenter(source: str, options: dict, seed: int):
    from powerclip.sam import build_sam_segmenter  # heavy, optional (segment-anything / sam2)

    return build_sam_segmenter(source, **options)


# source name -> builder(its config block, the stage's seed); unknown keys of a block are an error
SEGMENTERS: dict[str, Callable[[dict, int], object]] = {
    "sam": functools.partial(_sam_segmenter, "sam"),
    "sam2": functools.partial(_sam_segmenter, "sam2"),
    "felzenszwalb": lambda options, seed: FelzenszwalbSegmenter(**options),
    "random": _random_segmenter,
    "oracle": _oracle_segmenter,
}
REGION_SOURCES = tuple(SEGMENTERS)


def build_segmenter(source: str, options: dict | None = None, seed: int = 0):
    """The segmenter of a region source, from its config block (unknown keys are an error)."""
    if source not in SEGMENTERS:
        raise ValueError(f"unknown region source {source!r}; choose from {REGION_SOURCES}")
    return SEGMENTERS[source](dict(options or {}), seed)


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
