"""The embedded "shapes" dataset: coloured shapes on a noisy grey background, captioned by a grammar.

Deterministic: a sample depends only on (seed, shard index, sample index), through numpy's SeedSequence,
so the same config gives byte-identical shards on any machine. Each image holds 2-4 objects with distinct
colours and distinct shapes, two sizes, at random non-overlapping positions. Captions name each object's
size, colour and shape and the spatial relation between consecutive objects; every relation is phrased
both ways with equal probability ("A to the left of B" / "B to the right of A"), so no single word
predicts the layout. ``{key}.json`` carries the exact per-object masks (COCO uncompressed RLE) and boxes,
and a short web-style caption (``web_caption``: some of the objects, no sizes, no relations) beside the
full one, for methods that pair a web caption with a long synthetic one (CLIPS: powerclip.recaptions). It
is drawn from its own random stream, so images and captions are the same with or without it.

Colour-shape combinations listed in ``holdout_combos`` never appear in the ``train`` split; the
``heldout`` split puts at least one of them in every image (for systematic-generalisation tests).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = "shapes-v1"

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 220),
    "yellow": (235, 215, 30),
    "purple": (135, 50, 190),
    "orange": (245, 135, 20),
    "pink": (245, 125, 195),
    "cyan": (30, 205, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
# Object side as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.2, "large": 0.32}
SPLITS = ("train", "heldout")
# The fifth seed word of the web caption's random stream (the sample's own stream has four).
WEB_CAPTION_STREAM = 1

# Relation names stored in metadata, and their two phrasings: (subject-first, object-first inverse).
RELATIONS = {
    "left_of": ("to the left of", "right_of"),
    "right_of": ("to the right of", "left_of"),
    "above": ("above", "below"),
    "below": ("below", "above"),
}


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 64
    min_objects: int = 2
    max_objects: int = 4
    holdout_combos: tuple[str, ...] = ("red triangle", "blue circle", "yellow square", "green star")
    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    copula_probability: float = 0.5  # "A is to the left of B" vs "A to the left of B"
    jpeg_quality: int = 95
    background_noise: float = 6.0
    placement_tries: int = 200

    def __post_init__(self):
        unknown = [c for c in self.colors if c not in COLORS] + [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown colours/shapes {unknown}; known: {list(COLORS)}, {list(SHAPES)}")
        if not 2 <= self.min_objects <= self.max_objects <= min(len(self.colors), len(self.shapes)):
            raise ValueError(
                f"need 2 <= min_objects <= max_objects <= {min(len(self.colors), len(self.shapes))},"
                f" got {self.min_objects}..{self.max_objects}"
            )
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 pixels, got {self.image_size}")
        for combo in self.holdout_combos:
            parts = combo.split()
            if len(parts) != 2 or parts[0] not in self.colors or parts[1] not in self.shapes:
                raise ValueError(f"holdout combo {combo!r} must be '<colour> <shape>' from {self.colors} x {self.shapes}")

    @classmethod
    def from_dict(cls, cfg: dict | None) -> ShapesConfig:
        cfg = dict(cfg or {})
        for key in ("holdout_combos", "colors", "shapes"):
            if key in cfg:
                cfg[key] = tuple(cfg[key])
        known = set(cls.__dataclass_fields__)
        extra = sorted(set(cfg) - known)
        if extra:
            raise ValueError(f"unknown shapes generator keys {extra}; known: {sorted(known)}")
        return cls(**cfg)


@dataclass
class ShapeObject:
    color: str
    shape: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the drawing square (exclusive end)
    mask: np.ndarray = field(repr=False)  # bool (H, W), exact painted pixels

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean()), float(ys.mean())

    def bbox_xywh(self) -> list[int]:
        ys, xs = np.nonzero(self.mask)
        return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def rle_encode(mask: np.ndarray) -> dict:
    """Bool mask -> COCO uncompressed RLE (column-major counts starting with a run of zeros)."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(h), int(w)], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    values = np.zeros(len(rle["counts"]), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, rle["counts"])
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h}x{w}={h * w}")
    return flat.reshape((w, h)).T


def _shape_polygon(shape: str, x0: float, y0: float, side: float) -> list[tuple[float, float]] | None:
    cx, cy, r = x0 + side / 2, y0 + side / 2, side / 2
    if shape == "triangle":
        return [(cx, y0), (x0 + side, y0 + side), (x0, y0 + side)]
    if shape == "diamond":
        return [(cx, y0), (x0 + side, cy), (cx, y0 + side), (x0, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    return None


def _draw_mask(shape: str, box: tuple[int, int, int, int], image_size: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    canvas = Image.new("1", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=1)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=1)
    else:
        draw.polygon(_shape_polygon(shape, x0, y0, x1 - x0 - 1), fill=1)
    return np.asarray(canvas, dtype=bool)


def relation(a: ShapeObject, b: ShapeObject, min_ratio: float = 1.3) -> str | None:
    """The spatial relation of a to b, or None when neither axis clearly dominates."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = bx - ax, by - ay
    if abs(dx) >= min_ratio * abs(dy) and abs(dx) > 0:
        return "left_of" if dx > 0 else "right_of"
    if abs(dy) >= min_ratio * abs(dx) and abs(dy) > 0:
        return "above" if dy > 0 else "below"
    return None


class ShapesGenerator:
    def __init__(self, config: ShapesConfig, seed: int):
        self.config = config
        self.seed = int(seed)
        held = {tuple(c.split()) for c in config.holdout_combos}
        combos = [(c, s) for c in config.colors for s in config.shapes]
        self.heldout = [cs for cs in combos if cs in held]
        self.allowed = {"train": [cs for cs in combos if cs not in held], "heldout": combos}

    def rng(self, shard_index: int, sample_index: int, split: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS.index(split), shard_index, sample_index])

    def web_caption(self, objects: Sequence[ShapeObject], shard_index: int, sample_index: int, split: str) -> str:
        """A short alt-text-like caption: a random non-empty subset of the objects (all but at least one when
        there are several), as "<colour> <shape>" in random order, no sizes, no relations. Its own random
        stream (a fifth seed word), so the image and the full caption are unchanged by it."""
        rng = np.random.default_rng([self.seed, SPLITS.index(split), shard_index, sample_index, WEB_CAPTION_STREAM])
        count = int(rng.integers(1, max(2, len(objects))))
        names = [f"{objects[i].color} {objects[i].shape}" for i in rng.permutation(len(objects))[:count]]
        return names[0] if count == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    def _pick_objects(self, rng: np.random.Generator, split: str) -> list[tuple[str, str, str]]:
        cfg = self.config
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        chosen: list[tuple[str, str]] = []
        if split == "heldout":
            chosen.append(self.heldout[int(rng.integers(len(self.heldout)))])
        pool = self.allowed[split]
        while len(chosen) < n:
            color, shape = pool[int(rng.integers(len(pool)))]
            if all(color != c and shape != s for c, s in chosen):
                chosen.append((color, shape))
        order = rng.permutation(n)
        sizes = list(SIZES)
        return [(chosen[i][0], chosen[i][1], sizes[int(rng.integers(len(sizes)))]) for i in order]

    def _place(self, rng: np.random.Generator, specs) -> list[ShapeObject] | None:
        size = self.config.image_size
        margin = max(1, size // 32)
        boxes: list[tuple[int, int, int, int]] = []
        for _color, _shape, size_name in specs:
            side = max(6, int(round(SIZES[size_name] * size)))
            for _ in range(self.config.placement_tries):
                x0 = int(rng.integers(margin, size - side - margin + 1))
                y0 = int(rng.integers(margin, size - side - margin + 1))
                box = (x0, y0, x0 + side, y0 + side)
                if all(
                    box[0] >= b[2] + margin or b[0] >= box[2] + margin or box[1] >= b[3] + margin or b[1] >= box[3] + margin
                    for b in boxes
                ):
                    boxes.append(box)
                    break
            else:
                return None
        return [
            ShapeObject(color, shape, size_name, box, _draw_mask(shape, box, size))
            for (color, shape, size_name), box in zip(specs, boxes)
        ]

    def _caption(self, rng: np.random.Generator, objects: Sequence[ShapeObject]):
        """Clauses over consecutive objects; None if some consecutive pair has no clear relation."""
        relations = []
        for a, b in zip(objects, objects[1:]):
            rel = relation(a, b)
            if rel is None:
                return None
            relations.append((a, rel, b))
        mentioned: set[int] = set()

        def mention(obj: ShapeObject) -> str:
            article = "the" if id(obj) in mentioned else "a"
            mentioned.add(id(obj))
            return f"{article} {obj.phrase}"

        clauses = []
        for index, (a, rel, b) in enumerate(relations):
            if rng.random() < 0.5:  # state the inverse relation with the objects swapped
                a, rel, b = b, RELATIONS[rel][1], a
            copula = " is" if (index > 0 or rng.random() < self.config.copula_probability) else ""
            clauses.append(f"{mention(a)}{copula} {RELATIONS[rel][0]} {mention(b)}")
        if len(clauses) == 1:
            caption = clauses[0]
        else:
            caption = ", ".join(clauses[:-1]) + ", and " + clauses[-1]
        return caption, [
            {"subject": objects.index(a), "relation": rel, "object": objects.index(b)} for a, rel, b in relations
        ]

    def _render(self, rng: np.random.Generator, objects: Sequence[ShapeObject]) -> Image.Image:
        size = self.config.image_size
        base = float(rng.uniform(105, 150))
        pixels = base + rng.normal(0.0, self.config.background_noise, size=(size, size, 1))
        pixels = np.repeat(pixels, 3, axis=2)
        for obj in objects:
            jitter = rng.integers(-12, 13, size=3)
            color = np.clip(np.asarray(COLORS[obj.color]) + jitter, 0, 255)
            pixels[obj.mask] = color
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")

    def sample(self, shard_index: int, sample_index: int, split: str = "train") -> dict:
        """One sample: {"image": PIL, "caption": str, "meta": dict}."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = self.rng(shard_index, sample_index, split)
        for _attempt in range(1000):
            objects = self._place(rng, self._pick_objects(rng, split))
            if objects is None:
                continue
            captioned = self._caption(rng, objects)
            if captioned is None:
                continue
            caption, relations = captioned
            image = self._render(rng, objects)
            meta = {
                "generator": GENERATOR_VERSION,
                "seed": self.seed,
                "split": split,
                "shard_index": shard_index,
                "sample_index": sample_index,
                "caption": caption,
                "width": self.config.image_size,
                "height": self.config.image_size,
                "objects": [
                    {
                        "color": o.color,
                        "shape": o.shape,
                        "size": o.size,
                        "phrase": o.phrase,
                        "bbox": o.bbox_xywh(),
                        "area": int(o.mask.sum()),
                        "mask": rle_encode(o.mask),
                    }
                    for o in objects
                ],
                "relations": relations,
                "web_caption": self.web_caption(objects, shard_index, sample_index, split),
            }
            return {"image": image, "caption": caption, "meta": meta}
        raise RuntimeError(f"could not place objects for shard {shard_index} sample {sample_index}; image too small?")

    def encode(self, sample: dict) -> dict[str, bytes]:
        buf = io.BytesIO()
        sample["image"].save(buf, format="JPEG", quality=self.config.jpeg_quality)
        return {
            "jpg": buf.getvalue(),
            "txt": sample["caption"].encode("utf-8"),
            "json": json.dumps(sample["meta"], separators=(",", ":")).encode("utf-8"),
        }

    def iter_shard(self, shard_index: int, count: int, split: str = "train") -> Iterator[tuple[int, dict]]:
        for i in range(count):
            yield i, self.sample(shard_index, i, split)


def write_shard(
    out_path,
    shard_name: str,
    shard_index: int,
    samples_per_shard: int,
    seed: int,
    config: ShapesConfig,
    split: str = "train",
    stats=None,
) -> int:
    """Write one shard of the shapes dataset; keys are ``<shard_name>_<index>``."""
    from powerclip.shards import ShardWriter

    gen = ShapesGenerator(config, seed)
    with ShardWriter(out_path) as sink:
        for i, sample in gen.iter_shard(shard_index, samples_per_shard, split):
            sink.write(f"{shard_name}_{i:06d}", gen.encode(sample))
            if stats is not None:
                stats.samples_in += 1
                stats.samples_out += 1
                stats.counters["objects"] += len(sample["meta"]["objects"])
    return samples_per_shard
