"""How good a region source's regions are, measured while they are made and summarised per source.

The segment stage (:func:`powerclip.regions.segment_shard`) calls :meth:`QualityTally.add` for every image
with its kept regions (cells of the patch grid, in stored order: largest first, the order the trainer's
top-k takes) and, where the sample carries exact objects (the synthetic source's ``{key}.json``), the
objects' boxes mapped onto the same grid. The tally records, by rank r of a region in that order:

* ``regions_at_rank[r]``: images with an r-th region;
* ``background_at_rank[r]``: r-th regions that cover at least :data:`BACKGROUND_COVERAGE` of the grid (a
  "background" box: it holds every object and says nothing about any one);
* ``first_match_at_rank[r]``: objects whose first region with a cell IoU of at least :data:`MATCH_IOU` is
  the r-th (objects never matched are ``objects - sum(first_match_at_rank)``).

These histograms go into the shard's ``stats.json`` (``info.quality``), so the quality at any top-k is a sum
over ranks below k: :func:`quality_rows` turns the shards' statistics of each source into the rows of
``results/<dataset>/regions/quality.csv`` for the run table's top-k values. Only the standard library and
numpy: it runs in the segment stage's environment.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# A region matches an object when the IoU of their cell sets on the patch grid is at least this.
MATCH_IOU = 0.5
# A region covering at least this share of the grid's cells is a background box.
BACKGROUND_COVERAGE = 0.9
QUALITY_COLUMNS = (
    "source", "k", "shards", "images", "regions_per_image", "topk_per_image", "background_share", "objects",
    "object_recall",
)  # fmt: skip


def cell_iou(a: Iterable[int], b: Iterable[int]) -> float:
    """Intersection over union of two sets of grid cells."""
    a, b = set(a), set(b)
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def _bump(histogram: list[int], rank: int) -> None:
    if rank >= len(histogram):
        histogram.extend([0] * (rank + 1 - len(histogram)))
    histogram[rank] += 1


@dataclass
class QualityTally:
    """Per-rank histograms of one shard's regions (module docstring); ``objects`` counts ground-truth
    objects inside the crop, ``objects_outside_crop`` those the centre crop cut away (not scored)."""

    num_cells: int
    regions_at_rank: list[int] = field(default_factory=list)
    background_at_rank: list[int] = field(default_factory=list)
    first_match_at_rank: list[int] = field(default_factory=list)
    objects: int = 0
    objects_outside_crop: int = 0
    images_with_objects: int = 0

    def add(self, regions: Sequence[Sequence[int]], objects: Sequence[Sequence[int] | None] | None = None) -> None:
        """One image: its regions in stored order, and its objects' cells (None: outside the crop) if known."""
        for rank, cells in enumerate(regions):
            _bump(self.regions_at_rank, rank)
            if len(set(cells)) >= BACKGROUND_COVERAGE * self.num_cells:
                _bump(self.background_at_rank, rank)
        if objects is None:
            return
        self.images_with_objects += 1
        for target in objects:
            if target is None:
                self.objects_outside_crop += 1
                continue
            self.objects += 1
            rank = next((r for r, cells in enumerate(regions) if cell_iou(cells, target) >= MATCH_IOU), None)
            if rank is not None:
                _bump(self.first_match_at_rank, rank)

    def to_dict(self) -> dict:
        """The ``info.quality`` block of the stage statistics."""
        out = {
            "match_iou": MATCH_IOU,
            "background_coverage": BACKGROUND_COVERAGE,
            "num_cells": self.num_cells,
            "regions_at_rank": self.regions_at_rank,
            "background_at_rank": self.background_at_rank,
        }
        if self.images_with_objects:
            out.update(
                images_with_objects=self.images_with_objects,
                objects=self.objects,
                objects_outside_crop=self.objects_outside_crop,
                first_match_at_rank=self.first_match_at_rank,
            )
        return out


def _sum_below(histograms: Iterable[Sequence[int]], k: int | None) -> int:
    return sum(sum(h[:k]) for h in histograms)


def quality_rows(stats_by_source: Mapping[str, Sequence[Mapping]], ks: Sequence[int]) -> list[dict]:
    """Rows of ``quality.csv``: for each source (its shards' ``stats.json`` dicts) and each k.

    ``regions_per_image``: kept regions per image; ``topk_per_image``: regions among the top k per image;
    ``background_share``: the share of those top-k regions that are background boxes; ``object_recall``:
    the share of ground-truth objects matched by one of the image's top-k regions (empty when the shards
    carry no objects). A shard written before region quality was recorded raises a ValueError naming it.
    """
    rows = []
    for source, shards in stats_by_source.items():
        quality = []
        for stats in shards:
            if "quality" not in stats.get("info", {}):
                raise ValueError(
                    f"regions {source}, shard {stats.get('shard')!r}: its stats.json has no info.quality (written "
                    "before region quality was recorded); delete the shard's regions sidecar and rerun"
                )
            quality.append(stats["info"]["quality"])
        images = sum(s["samples_in"] for s in shards)
        regions = _sum_below((q["regions_at_rank"] for q in quality), None)
        with_objects = [q for q in quality if "objects" in q]
        objects = sum(q["objects"] for q in with_objects)
        for k in ks:
            top = _sum_below((q["regions_at_rank"] for q in quality), k)
            background = _sum_below((q["background_at_rank"] for q in quality), k)
            matched = _sum_below((q["first_match_at_rank"] for q in with_objects), k)
            rows.append(
                {
                    "source": source,
                    "k": int(k),
                    "shards": len(shards),
                    "images": images,
                    "regions_per_image": regions / images if images else float("nan"),
                    "topk_per_image": top / images if images else float("nan"),
                    "background_share": background / top if top else float("nan"),
                    "objects": objects if with_objects else "",
                    "object_recall": (matched / objects if objects else float("nan")) if with_objects else "",
                }
            )
    return rows


def _cell(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return value


def write_quality_table(
    stats_paths: Mapping[str, Sequence[str | os.PathLike]], ks: Sequence[int], out_csv: str | os.PathLike
) -> list[dict]:
    """Read ``{source: [stats.json, ...]}``, write ``quality.csv`` atomically (4 decimals); return its rows."""
    from powerclip.shards import atomic_output

    if not ks:
        raise ValueError("no top-k value to report region quality at")
    stats = {source: [json.loads(Path(p).read_text()) for p in paths] for source, paths in stats_paths.items()}
    rows = quality_rows(stats, sorted(set(int(k) for k in ks)))
    with atomic_output(out_csv) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=QUALITY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return rows


__all__ = ["BACKGROUND_COVERAGE", "MATCH_IOU", "QualityTally", "cell_iou", "quality_rows", "write_quality_table"]
