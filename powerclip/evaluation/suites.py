"""Local evaluation suites for the embedded "shapes" data, in clip-benchmark's WebDataset format.

Every suite is drawn with :class:`~powerclip.synthetic.ShapesGenerator` from the *training* seed and
generator config, but from shard indices far above any training shard (``EVAL_SHARD_BASE`` onwards), so no
evaluation image was seen in training while colours, sizes, image size, JPEG quality and held-out
combinations are exactly the training ones.

:func:`write_suites` writes one folder per suite in the layout of clip-benchmark's WebDataset reader
(``--dataset wds/<suite> --dataset_root <root>/<suite>``): ``test/<i>.tar`` with ``.jpg`` + ``.cls`` or
``.txt``, ``test/nshards.txt``, ``dataset_type.txt``, for ``shapes_cls`` ``classnames.txt`` and
``zeroshot_classification_templates.txt``, and the ground truth in ``meta.json`` (docs/formats.md, "Local
evaluation suites").

Suites (task in ``SUITES``, one line each in ``DESCRIPTIONS``): ``shapes_cls`` classifies single objects
into the "<colour> <shape>" pairs seen in training (balanced); ``shapes_retrieval`` has 2-4 object images
with unique generator captions; the minimal pairs (``--task image_caption_selection``, one 2-object image,
``txt`` = "positive\\nnegative") are read through clip-benchmark's "retrieval" reader, which yields exactly
``(image, [captions...])``, so ``dataset_type.txt`` says "retrieval" and the task is passed explicitly. The
region-level suites (grounding, region binding, segmentation) are built in
:mod:`powerclip.evaluation.region_suites` and scored by our own tasks (:mod:`powerclip.evaluation.regions`).

Bag-of-words design: the ``binding`` (colours swapped) and ``order`` (noun phrases swapped) negatives have
exactly the positive's words, so an order-insensitive text encoder embeds both identically. ``relation``
flips the relation word and cycles the positive's word through left, right, above, below, so any fixed
preference between two words is right on exactly half the items. ``control`` replaces one attribute (colour
on even items, shape on odd ones) with one absent from the image, solvable by knowing which attributes are
present. ``binding_heldout`` is ``binding`` on the ``heldout`` split (every image has a held-out pair).
clip-benchmark counts an exact tie as correct (``argmax``, positive first), so a bag-of-words model scores
near 100 % on binding/order by its ``acc`` and exactly 50 % only on the tie-splitting
``text_acc_ties_split`` (:mod:`powerclip.evaluation.metrics`) that the runner adds.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from powerclip.evaluation import region_suites
from powerclip.shards import ShardWriter, atomic_output_dir
from powerclip.synthetic import GENERATOR_VERSION, RELATIONS, SIZES, ShapesConfig, ShapesGenerator

log = logging.getLogger(__name__)

CLS = "zeroshot_classification"
RET = "zeroshot_retrieval"
SEL = "image_caption_selection"

# suite name -> clip-benchmark task (the order fixes each suite's shard index: append, never reorder)
SUITES: dict[str, str] = {
    "shapes_cls": CLS,
    "shapes_retrieval": RET,
    "shapes_binding": SEL,
    "shapes_relation": SEL,
    "shapes_order": SEL,
    "shapes_control": SEL,
    "shapes_binding_heldout": SEL,
    # region level (powerclip.evaluation.region_suites): our own tasks, not clip-benchmark's
    **{suite: task for suite, (task, _split) in region_suites.REGION_SUITES.items()},
}
# clip-benchmark's reader: what dataset_type.txt tells it (region suites are read by our own tasks only)
DATASET_TYPES = {CLS: "classification", RET: "retrieval", SEL: "retrieval"}
# Training shards are 0 .. num_shards-1; evaluation shards start far above so images are never shared.
EVAL_SHARD_BASE = 1_000_000_000
# Tag of the numpy streams that choose phrasings / replacements (independent of the image streams).
PHRASING_STREAM = 7_000_001

TEMPLATES: tuple[str, ...] = ("a photo of a {c}.", "a {c}.", "a small {c}.", "a large {c}.")
# Keys of the workflow's `synthetic` config block that are not ShapesConfig fields.
WRAPPER_KEYS = frozenset({"samples_per_shard", "seed", "split"})
# Relation words a flip swaps; the generator's inverse relation is exactly this flip.
FLIP: dict[str, str] = {rel: inverse for rel, (_phrase, inverse) in RELATIONS.items()}
HORIZONTAL = frozenset({"left_of", "right_of"})
RELATION_CYCLE: tuple[str, ...] = ("left_of", "right_of", "above", "below")
MAX_DRAWS_PER_ITEM = 200


# ------------------------------------------------------------------------------------------ helpers
def shapes_config(generator_config: Mapping[str, Any] | ShapesConfig | None) -> ShapesConfig:
    """A ShapesConfig from the workflow's ``synthetic`` block (its non-generator keys are dropped)."""
    if isinstance(generator_config, ShapesConfig):
        return generator_config
    cfg = {k: v for k, v in dict(generator_config or {}).items() if k not in WRAPPER_KEYS}
    return ShapesConfig.from_dict(cfg)


def shard_index(suite: str) -> int:
    """The generator shard index a suite's images are drawn from."""
    return EVAL_SHARD_BASE + list(SUITES).index(suite)


def noun_phrase(obj: Mapping[str, Any]) -> str:
    return f"{obj['size']} {obj['color']} {obj['shape']}"


def clause(subject: Mapping[str, Any], rel: str, obj: Mapping[str, Any]) -> str:
    """One clause in the training grammar's words: 'a <np> is <relation> a <np>'."""
    return f"a {noun_phrase(subject)} is {RELATIONS[rel][0]} a {noun_phrase(obj)}"


def bag_of_words(caption: str) -> Counter:
    return Counter(caption.split())


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _public_objects(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    keep = ("color", "shape", "size", "phrase", "bbox")
    return [{k: o[k] for k in keep} for o in meta["objects"]]


def _phrasing_rng(seed: int, suite: str, item: int) -> np.random.Generator:
    return np.random.default_rng([seed, PHRASING_STREAM, list(SUITES).index(suite), item])


class _TwoObjectSource:
    """Consecutive 2-object samples of one shard (same config as training except the object count)."""

    def __init__(self, cfg: ShapesConfig, seed: int, suite: str, split: str) -> None:
        # min=max=2 keeps colours, sizes, holdouts, rendering; one clause then covers the whole image.
        self.gen = ShapesGenerator(dataclasses.replace(cfg, min_objects=2, max_objects=2), seed)
        self.shard = shard_index(suite)
        self.split = split
        self.next_index = 0

    def __iter__(self) -> Iterator[dict]:
        while True:
            index = self.next_index
            self.next_index += 1
            sample = self.gen.sample(self.shard, index, self.split)
            sample["sample_index"] = index
            yield sample


def _oriented(sample: dict, flip_direction: bool) -> tuple[dict, str, dict]:
    """(subject, relation, object) of the sample's one relation, stated as is or as its inverse."""
    rel = sample["meta"]["relations"][0]
    objects = sample["meta"]["objects"]
    a, r, b = objects[rel["subject"]], rel["relation"], objects[rel["object"]]
    return (b, FLIP[r], a) if flip_direction else (a, r, b)


# ------------------------------------------------------------------------------------ suite builders
# Each builder yields (fields, item) with fields = {"jpg": bytes, "cls"|"txt"|"json": bytes} and item = ground truth.
Item = region_suites.Item


def _build_cls(cfg: ShapesConfig, seed: int, n: int) -> tuple[Iterator[Item], dict[str, Any]]:
    gen = ShapesGenerator(cfg, seed)
    held = set(cfg.holdout_combos)
    classes = [f"{c} {s}" for c in cfg.colors for s in cfg.shapes if f"{c} {s}" not in held]
    shard = shard_index("shapes_cls")
    sizes = list(SIZES)

    def items() -> Iterator[Item]:
        for i in range(n):
            label = i % len(classes)
            color, shape = classes[label].split()
            rng = gen.rng(shard, i, "train")
            size = sizes[int(rng.integers(len(sizes)))]
            # The generator's own placement and renderer with a one-object spec: identical drawing code,
            # background noise and colour jitter as the training images (only the object count differs).
            objects = gen._place(rng, [(color, shape, size)])
            if objects is None:  # one object always fits; guard against future generator changes
                raise RuntimeError(f"shapes_cls: could not place one object (image_size={cfg.image_size})")
            image = gen._render(rng, objects)
            item = {
                "label": label,
                "classname": classes[label],
                "color": color,
                "shape": shape,
                "size": size,
                "bbox": objects[0].bbox_xywh(),
                "sample_index": i,
            }
            yield {"jpg": _jpeg(image, cfg.jpeg_quality), "cls": str(label).encode()}, item

    return items(), {"classnames": classes, "templates": list(TEMPLATES), "split": "train", "shard_index": shard}


def _build_retrieval(cfg: ShapesConfig, seed: int, n: int) -> tuple[Iterator[Item], dict[str, Any]]:
    gen = ShapesGenerator(cfg, seed)
    shard = shard_index("shapes_retrieval")

    def items() -> Iterator[Item]:
        seen: set[str] = set()
        index = 0
        while len(seen) < n:
            if index >= n * MAX_DRAWS_PER_ITEM:
                raise RuntimeError(f"shapes_retrieval: only {len(seen)} unique captions in {index} samples")
            sample = gen.sample(shard, index, "train")
            index += 1
            caption = sample["caption"]
            # Duplicate captions would make retrieval ambiguous (two correct texts for one image).
            if caption in seen:
                continue
            seen.add(caption)
            item = {
                "caption": caption,
                "sample_index": index - 1,
                "objects": _public_objects(sample["meta"]),
                "relations": sample["meta"]["relations"],
            }
            yield {"jpg": gen.encode(sample)["jpg"], "txt": caption.encode()}, item

    return items(), {"split": "train", "shard_index": shard}


def _pair_suite(
    suite: str,
    cfg: ShapesConfig,
    seed: int,
    n: int,
    split: str,
    make: Callable[[dict, np.random.Generator, int], tuple[str, str, dict[str, Any]] | None],
) -> tuple[Iterator[Item], dict[str, Any]]:
    """Minimal pairs from consecutive 2-object samples; ``make`` returns None to skip a sample."""
    source = _TwoObjectSource(cfg, seed, suite, split)

    def items() -> Iterator[Item]:
        draws = iter(source)
        for i in range(n):
            rng = _phrasing_rng(seed, suite, i)
            for _attempt in range(MAX_DRAWS_PER_ITEM):
                sample = next(draws)
                made = make(sample, rng, i)
                if made is not None:
                    break
            else:
                raise RuntimeError(f"{suite}: no usable sample for item {i} in {MAX_DRAWS_PER_ITEM} draws")
            positive, negative, extra = made
            fields = {
                "jpg": source.gen.encode(sample)["jpg"],
                "txt": f"{positive}\n{negative}".encode(),
            }
            item = {
                "positive": positive,
                "negative": negative,
                "sample_index": sample["sample_index"],
                "objects": _public_objects(sample["meta"]),
                "relation": sample["meta"]["relations"][0],
                **extra,
            }
            if positive == negative:
                raise AssertionError(f"{suite}: minimal pair with identical captions {positive!r}")
            yield fields, item

    return items(), {"split": split, "shard_index": source.shard}


def _swap_colors(a: dict, b: dict) -> tuple[dict, dict]:
    return {**a, "color": b["color"]}, {**b, "color": a["color"]}


def _binding_maker(held: set[str], require_seen_negative: bool):
    def make(sample: dict, rng: np.random.Generator, _i: int):
        a, rel, b = _oriented(sample, bool(rng.random() < 0.5))
        a2, b2 = _swap_colors(a, b)
        negative_combos = [f"{o['color']} {o['shape']}" for o in (a2, b2)]
        # On the train split, a negative naming a held-out pair would be rejectable for being unfamiliar
        # rather than for its binding; keep only images whose swapped pairs were seen in training.
        if require_seen_negative and any(c in held for c in negative_combos):
            return None
        positive_combos = [f"{o['color']} {o['shape']}" for o in (a, b)]
        extra = {
            "swapped_colors": [a["color"], b["color"]],
            "positive_combos": positive_combos,
            "negative_combos": negative_combos,
            "heldout_in_positive": [c for c in positive_combos if c in held],
            "heldout_in_negative": [c for c in negative_combos if c in held],
        }
        return clause(a, rel, b), clause(a2, rel, b2), extra

    return make


def _relation_make(sample: dict, _rng: np.random.Generator, i: int):
    target = RELATION_CYCLE[i % len(RELATION_CYCLE)]
    rel = sample["meta"]["relations"][0]["relation"]
    # The cycle fixes which word the positive carries; an image of the other orientation is skipped.
    if (rel in HORIZONTAL) != (target in HORIZONTAL):
        return None
    a, r, b = _oriented(sample, flip_direction=rel != target)
    assert r == target
    extra = {"positive_relation": r, "negative_relation": FLIP[r]}
    return clause(a, r, b), clause(a, FLIP[r], b), extra


def _order_make(sample: dict, rng: np.random.Generator, _i: int):
    a, rel, b = _oriented(sample, bool(rng.random() < 0.5))
    return clause(a, rel, b), clause(b, rel, a), {"stated_relation": rel}


def _control_maker(cfg: ShapesConfig):
    held = set(cfg.holdout_combos)

    def make(sample: dict, rng: np.random.Generator, i: int):
        a, rel, b = _oriented(sample, bool(rng.random() < 0.5))
        attribute = "color" if i % 2 == 0 else "shape"
        which = int(rng.integers(2))
        target = (a, b)[which]
        present = {a[attribute], b[attribute]}
        choices = cfg.colors if attribute == "color" else cfg.shapes
        candidates = []
        for value in choices:
            if value in present:
                continue
            new = {**target, attribute: value}
            # a held-out pair in the negative would add an unfamiliarity cue; skip those replacements
            if f"{new['color']} {new['shape']}" not in held:
                candidates.append(value)
        if not candidates:
            return None
        replacement = candidates[int(rng.integers(len(candidates)))]
        changed = {**target, attribute: replacement}
        a2, b2 = (changed, b) if which == 0 else (a, changed)
        extra = {
            "attribute": attribute,
            "replaced_mention": which,  # 0: the sentence's subject, 1: its object
            "original": target[attribute],
            "replacement": replacement,
        }
        return clause(a, rel, b), clause(a2, rel, b2), extra

    return make


def _builders(cfg: ShapesConfig) -> dict[str, Callable[[ShapesConfig, int, int], tuple[Iterator[Item], dict]]]:
    held = set(cfg.holdout_combos)
    return {
        "shapes_cls": _build_cls,
        "shapes_retrieval": _build_retrieval,
        "shapes_binding": lambda c, s, n: _pair_suite(
            "shapes_binding", c, s, n, "train", _binding_maker(held, require_seen_negative=True)
        ),
        "shapes_relation": lambda c, s, n: _pair_suite("shapes_relation", c, s, n, "train", _relation_make),
        "shapes_order": lambda c, s, n: _pair_suite("shapes_order", c, s, n, "train", _order_make),
        "shapes_control": lambda c, s, n: _pair_suite("shapes_control", c, s, n, "train", _control_maker(c)),
        "shapes_binding_heldout": lambda c, s, n: _pair_suite(
            "shapes_binding_heldout", c, s, n, "heldout", _binding_maker(held, require_seen_negative=False)
        ),
        **region_suites.region_builders(),
    }


DESCRIPTIONS = {
    "shapes_cls": "zero-shot classification of single objects into the '<colour> <shape>' pairs seen in training",
    "shapes_retrieval": "image-text retrieval, 2-4 objects, unique generator captions (one per image)",
    "shapes_binding": "positive vs the same clause with the two objects' colours swapped (same words)",
    "shapes_relation": "positive vs the relation word flipped (left<->right, above<->below; balanced)",
    "shapes_order": "positive vs the two noun phrases swapped around the relation (same words)",
    "shapes_control": "positive vs one colour (even items) or shape (odd items) replaced by one absent from the image",
    "shapes_binding_heldout": "shapes_binding on the heldout split (every image has a held-out colour-shape pair)",
    **region_suites.DESCRIPTIONS,
}


# ------------------------------------------------------------------------------------------- writing
def _check_pair(suite: str, item: Mapping[str, Any]) -> None:
    """Fail loudly if a minimal pair breaks the suite's bag-of-words contract."""
    pos, neg = bag_of_words(item["positive"]), bag_of_words(item["negative"])
    if suite in ("shapes_binding", "shapes_order", "shapes_binding_heldout") and pos != neg:
        raise AssertionError(f"{suite}: bags of words differ: {item['positive']!r} / {item['negative']!r}")
    if suite in ("shapes_relation", "shapes_control") and sum((pos - neg).values()) != 1:
        raise AssertionError(f"{suite}: captions must differ by one word: {item['positive']!r} / {item['negative']!r}")


def _write_suite(suite_dir: Path, suite: str, cfg: ShapesConfig, seed: int, n: int, shard_size: int | None) -> int:
    task = SUITES[suite]
    items, info = _builders(cfg)[suite](cfg, seed, n)
    test_dir = suite_dir / "test"
    test_dir.mkdir(parents=True)
    per_shard = shard_size or n
    records: list[dict[str, Any]] = []
    writer: ShardWriter | None = None
    nshards = 0
    try:
        for i, (fields, item) in enumerate(items):
            if i % per_shard == 0:
                if writer is not None:
                    writer.close()
                writer = ShardWriter(test_dir / f"{nshards}.tar")
                nshards += 1
            key = f"{i:06d}"
            writer.write(key, fields)
            if task == SEL:
                _check_pair(suite, item)
            records.append({"key": key, "shard": nshards - 1, **item})
        if writer is not None:
            writer.close()
    except BaseException as exc:
        if writer is not None:
            writer.abort(exc)
        raise
    if len(records) != n:
        raise RuntimeError(f"{suite}: wrote {len(records)} items, expected {n}")
    (test_dir / "nshards.txt").write_text(f"{nshards}\n")
    dataset_type = DATASET_TYPES.get(task)
    if dataset_type is not None:
        (suite_dir / "dataset_type.txt").write_text(dataset_type + "\n")
    if task == CLS:
        (suite_dir / "classnames.txt").write_text("\n".join(info["classnames"]) + "\n")
        (suite_dir / "zeroshot_classification_templates.txt").write_text("\n".join(info["templates"]) + "\n")
    meta = {
        "suite": suite,
        "task": task,
        "dataset_type": dataset_type,
        "description": DESCRIPTIONS[suite],
        "n": n,
        "nshards": nshards,
        "split": info["split"],
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "shard_index": info["shard_index"],
        "generator_config": json.loads(json.dumps(dataclasses.asdict(cfg))),
        **{k: info[k] for k in ("classnames", "templates") if k in info},
        "items": records,
    }
    (suite_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return n


def write_suite(
    root: str | os.PathLike[str],
    suite: str,
    generator_config: Mapping[str, Any] | ShapesConfig | None,
    seed: int,
    n: int = 500,
    shard_size: int | None = None,
) -> Path:
    """Write one suite to ``<root>/<suite>`` atomically (temp dir beside it, then rename)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; known: {list(SUITES)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    cfg = shapes_config(generator_config)
    final = Path(root) / suite
    with atomic_output_dir(final) as tmp:
        _write_suite(tmp, suite, cfg, int(seed), int(n), shard_size)
    log.info("wrote suite %s (%s, %d items) to %s", suite, SUITES[suite], n, final)
    return final


def write_suites(
    root: str | os.PathLike[str],
    generator_config: Mapping[str, Any] | ShapesConfig | None,
    seed: int,
    n: int = 500,
    *,
    suites: list[str] | tuple[str, ...] | None = None,
    shard_size: int | None = None,
) -> dict[str, tuple[str, int]]:
    """Write every suite (or ``suites``) under ``root``; return ``{suite: (task, n)}``.

    ``generator_config`` is the training generator's settings (a ShapesConfig, or the workflow's
    ``synthetic`` block: ``samples_per_shard``/``seed``/``split`` are ignored) and ``seed`` its seed.
    ``shard_size`` splits a suite into several tars (only useful to evaluate with several workers).
    """
    out: dict[str, tuple[str, int]] = {}
    for suite in suites or SUITES:
        write_suite(root, suite, generator_config, seed, n, shard_size)
        out[suite] = (SUITES[suite], n)
    return out


def read_meta(suite_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ground truth (``meta.json``) of a written suite."""
    return json.loads((Path(suite_dir) / "meta.json").read_text())


def main(argv: list[str] | None = None) -> dict[str, tuple[str, int]]:
    p = argparse.ArgumentParser(prog="python -m powerclip.evaluation.suites", description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="output directory (one folder per suite)")
    p.add_argument("--seed", type=int, default=0, help="the training generator's seed")
    p.add_argument("--n", type=int, default=500, help="items per suite")
    p.add_argument(
        "--generator-config",
        default="{}",
        help="JSON object of ShapesConfig fields (the training config's `synthetic` block), or @file.json",
    )
    p.add_argument("--suites", nargs="+", choices=list(SUITES), default=None)
    p.add_argument("--shard-size", type=int, default=None)
    args = p.parse_args(argv)
    text = args.generator_config
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return write_suites(args.root, json.loads(text), args.seed, args.n, suites=args.suites, shard_size=args.shard_size)


__all__ = [
    "EVAL_SHARD_BASE", "SUITES", "TEMPLATES", "bag_of_words", "clause", "read_meta", "shapes_config",
    "shard_index", "write_suite", "write_suites",
]  # fmt: skip

if __name__ == "__main__":
    main()
