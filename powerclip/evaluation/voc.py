"""PASCAL VOC 2012 semantic segmentation in its own folder layout: the class list, the prompts and a reader.

The layout is the one ``VOCtrainval_11-May-2012.tar`` unpacks to under ``VOCdevkit/VOC2012/`` (and that
:func:`powerclip.evaluation.fetch.fetch_voc` keeps for the split it extracts)::

    <root>/ImageSets/Segmentation/<split>.txt   one image id per line
    <root>/JPEGImages/<id>.jpg                  the image
    <root>/SegmentationClass/<id>.png           palette PNG: index 0 background, 1..20 the classes, 255 void

Class names and prompts follow CLIPpy's evaluator (``kahnchana/clippy``, ``src/evaluation``: "a photo of
a/an <class>", background as a class of its own, "table" and "television monitor"), restricted to VOC's
20 classes + background (its evaluator also prompts 39 stuff classes and maps them to background).
"""

from __future__ import annotations

import os
from pathlib import Path

# stdlib only at import: the Snakefile reads VOC_DATASET when it is parsed
VOC_DATASET = "voc2012"  # the benchmark `dataset:` name that selects this reader
VOC_SPLIT = "val"  # 1,449 images with segmentation labels
VOC_SUBDIR = "VOCdevkit/VOC2012"  # inside the release tar
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "table",
    "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "television monitor",
)  # fmt: skip


def voc_prompts() -> dict[str, list[str]]:
    """One prompt per class, CLIPpy's: "a photo of an aeroplane", "a photo of a bicycle", ..."""
    return {c: [f"a photo of {'an' if c[0] in 'aeiou' else 'a'} {c}"] for c in VOC_CLASSES}


def voc_files(root: str | os.PathLike, split: str = VOC_SPLIT) -> list[tuple[str, Path, Path]]:
    """``[(id, image path, label path), ...]`` of a split, in the order of its list file. A missing list,
    image or label raises FileNotFoundError naming the file (fetch the dataset again)."""
    root = Path(root)
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise FileNotFoundError(
            f"{listing}: no list of the {split} split; {root} is not a PASCAL VOC 2012 folder (fetch it with the "
            "workflow's fetch_voc rule)"
        )
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    out = []
    for image_id in ids:
        image, label = root / "JPEGImages" / f"{image_id}.jpg", root / "SegmentationClass" / f"{image_id}.png"
        for path in (image, label):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {listing} but missing; fetch the dataset again")
        out.append((image_id, image, label))
    if not out:
        raise ValueError(f"{listing} lists no image")
    return out


def read_label(path: str | os.PathLike):
    """A VOC label map as an (H, W) uint8 array of class indices (the palette indices of the PNG; 255 = void)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"{path}: a VOC label is a palette (P) or grey (L) PNG, got mode {image.mode}")
        label = np.array(image)
    bad = np.setdiff1d(np.unique(label), [*range(len(VOC_CLASSES)), 255])
    if bad.size:
        raise ValueError(f"{path}: label values {bad.tolist()} are not VOC classes (0..20) or void (255)")
    return label


__all__ = ["VOC_CLASSES", "VOC_DATASET", "VOC_SPLIT", "VOC_SUBDIR", "read_label", "voc_files", "voc_prompts"]
