"""Region-level suites of the embedded "shapes" data: what the region-phrase loss trains, measured directly.

Written by :func:`powerclip.evaluation.suites.write_suites` like the other local suites (same layout, same
generator, seed and unseen shard indices), each in a train-combination and a held-out-combination version
(``*_heldout``: every image holds a colour-shape pair never drawn in training). A sample of a region suite
is ``<key>.jpg`` + ``<key>.json`` (docs/formats.md, "Local evaluation suites"), evaluated by our own tasks in
:mod:`powerclip.evaluation.regions`:

* ``shapes_grounding`` (task ``region_grounding``): training-like images of 2-4 objects with their generator
  caption; each object's region (its box on the patch grid) against the phrase of each object's first
  mention in the caption ("a small red circle"), in both directions;
* ``shapes_region_binding`` (``region_binding``): two-object images; each object's region against its own
  mention and the same mention in the caption with the two objects' colours swapped (the caption keeps its
  bag of words; the phrase takes the other object's colour);
* ``shapes_segmentation`` (``zeroshot_segmentation``): training-like images with their exact object masks;
  classes are every colour-shape pair plus background.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

from powerclip.synthetic import ShapesConfig, ShapesGenerator

# (powerclip.evaluation.suites imports this module for SUITES; its helpers are imported where they are used)
Item = tuple[dict[str, bytes], dict[str, Any]]

GROUNDING = "region_grounding"
BINDING = "region_binding"
SEGMENTATION = "zeroshot_segmentation"
BACKGROUND = "background"
# Prompt templates of the segmentation classes (those of shapes_cls: the words the captions use).
SEGMENTATION_TEMPLATES: tuple[str, ...] = ("a photo of a {c}.", "a {c}.", "a small {c}.", "a large {c}.")

# suite -> (task, split): appended to powerclip.evaluation.suites.SUITES, whose order fixes shard indices
REGION_SUITES: dict[str, tuple[str, str]] = {
    "shapes_grounding": (GROUNDING, "train"),
    "shapes_grounding_heldout": (GROUNDING, "heldout"),
    "shapes_region_binding": (BINDING, "train"),
    "shapes_region_binding_heldout": (BINDING, "heldout"),
    "shapes_segmentation": (SEGMENTATION, "train"),
    "shapes_segmentation_heldout": (SEGMENTATION, "heldout"),
}
DESCRIPTIONS = {
    "shapes_grounding": "each object's region vs the phrases of the image's objects in its caption, both ways",
    "shapes_region_binding": "each object's region vs its phrase and the same phrase with the other object's colour",
    "shapes_segmentation": "each patch vs every colour-shape class and background, scored against the exact masks",
}
DESCRIPTIONS.update({f"{s}_heldout": f"{d} (heldout split)" for s, d in list(DESCRIPTIONS.items())})


def mention_spans(caption: str, phrases: list[str]) -> list[list[int]]:
    """``[start, end)`` character span of each object's first mention ("a <size> <colour> <shape>")."""
    spans = []
    for phrase in phrases:
        found = re.search(rf"(?<![^ ])a {re.escape(phrase)}(?![^ ,.])", caption)
        if found is None:
            raise ValueError(f"caption {caption!r} does not mention 'a {phrase}'")
        spans.append(list(found.span()))
    return spans


def _objects(meta: Mapping[str, Any], held: set[str], masks: bool) -> list[dict[str, Any]]:
    keep = ("color", "shape", "size", "phrase", "bbox", "area") + (("mask",) if masks else ())
    return [{**{k: o[k] for k in keep}, "heldout": f"{o['color']} {o['shape']}" in held} for o in meta["objects"]]


def _summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """What meta.json keeps of a sample's ground truth (no masks: they are in the sample's json)."""
    objects = [{k: v for k, v in o.items() if k != "mask"} for o in record["objects"]]
    return {**{k: v for k, v in record.items() if k != "objects"}, "objects": objects}


def _sample_item(gen: ShapesGenerator, sample: dict, record: dict[str, Any]) -> Item:
    fields = {"jpg": gen.encode(sample)["jpg"], "json": json.dumps(record, separators=(",", ":")).encode()}
    return fields, _summary(record)


def _build_scenes(suite: str, cfg: ShapesConfig, seed: int, n: int) -> tuple[Iterator[Item], dict[str, Any]]:
    """Grounding and segmentation: n training-like images (2-4 objects) with caption, mentions and masks."""
    from powerclip.evaluation.suites import shard_index

    task, split = REGION_SUITES[suite]
    gen = ShapesGenerator(cfg, seed)
    held = set(cfg.holdout_combos)
    shard = shard_index(suite)

    def items() -> Iterator[Item]:
        for i in range(n):
            sample = gen.sample(shard, i, split)
            objects = _objects(sample["meta"], held, masks=task == SEGMENTATION)
            record = {"caption": sample["caption"], "sample_index": i, "objects": objects}
            if task == GROUNDING:
                record["mentions"] = mention_spans(sample["caption"], [o["phrase"] for o in objects])
            yield _sample_item(gen, sample, record)

    info: dict[str, Any] = {"split": split, "shard_index": shard}
    if task == SEGMENTATION:
        info["classnames"] = [BACKGROUND] + [f"{c} {s}" for c in cfg.colors for s in cfg.shapes]
        info["templates"] = list(SEGMENTATION_TEMPLATES)
    return items(), info


def _swapped_caption(caption: str, spans: list[list[int]], objects: list[dict[str, Any]]) -> str:
    """The caption with the two objects' colours swapped in their mentions (the same words, rebound)."""
    (s0, e0), (s1, e1) = sorted(spans)
    first, second = (objects[0], objects[1]) if spans[0][0] < spans[1][0] else (objects[1], objects[0])

    def recoloured(obj: Mapping[str, Any], color: str) -> str:
        return f"a {obj['size']} {color} {obj['shape']}"

    return (
        caption[:s0] + recoloured(first, second["color"]) + caption[e0:s1] + recoloured(second, first["color"]) + caption[e1:]
    )


def _build_binding(suite: str, cfg: ShapesConfig, seed: int, n: int) -> tuple[Iterator[Item], dict[str, Any]]:
    """n two-object images; the negative caption swaps the two objects' colours. On the train split an image
    whose swapped pairs include a held-out one is skipped (unfamiliarity would be a cue, as in shapes_binding)."""
    from powerclip.evaluation.suites import _TwoObjectSource

    _task, split = REGION_SUITES[suite]
    source = _TwoObjectSource(cfg, seed, suite, split)
    held = set(cfg.holdout_combos)

    def items() -> Iterator[Item]:
        draws = iter(source)
        for _i in range(n):
            for _attempt in range(200):
                sample = next(draws)
                objects = _objects(sample["meta"], held, masks=False)
                a, b = objects
                swapped = {f"{b['color']} {a['shape']}", f"{a['color']} {b['shape']}"}
                if split == "heldout" or not swapped & held:
                    break
            else:
                raise RuntimeError(f"{suite}: no two-object image without held-out swapped pairs in 200 draws")
            caption = sample["caption"]
            spans = mention_spans(caption, [o["phrase"] for o in objects])
            negative = _swapped_caption(caption, spans, objects)
            swapped_phrases = [f"{a['size']} {b['color']} {a['shape']}", f"{b['size']} {a['color']} {b['shape']}"]
            record = {
                "caption": caption,
                "sample_index": sample["sample_index"],
                "objects": objects,
                "mentions": spans,
                "negative_caption": negative,
                "negative_mentions": mention_spans(negative, swapped_phrases),
            }
            yield _sample_item(source.gen, sample, record)

    return items(), {"split": split, "shard_index": source.shard}


def region_builders() -> dict[str, Any]:
    """suite -> builder(cfg, seed, n), as powerclip.evaluation.suites calls them."""
    return {
        suite: functools.partial(_build_binding if task == BINDING else _build_scenes, suite)
        for suite, (task, _split) in REGION_SUITES.items()
    }


__all__ = ["DESCRIPTIONS", "REGION_SUITES", "SEGMENTATION_TEMPLATES", "mention_spans", "region_builders"]
