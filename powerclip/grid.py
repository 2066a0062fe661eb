"""The patch grid and regions on it: the geometry shared by every region source and the trainer.

A segmenter returns regions in the *original* image's pixel coordinates (area + bounding box). The
trainer resizes the shorter side to ``image_size`` and centre-crops (torchvision ``Resize`` +
``CenterCrop``), then cuts the crop into ``(image_size // patch_size)**2`` patches. A region's box goes
through the same resize/crop and becomes the row-major indices of the cells it covers: a cell belongs to
the box when the box overlaps it by at least ``min_overlap`` of a cell along *each* axis. Along an axis
where the box is too thin to overlap any cell that much, the cell holding the box's centre is used, so a
box that intersects the crop always keeps at least one cell. Boxes entirely outside the crop are dropped.

No dependencies beyond the standard library: the segmenters (``powerclip.regions``, ``powerclip.sam``)
and the readers import it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


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
