"""Region-level evaluation tasks: grounding, region binding and zero-shot semantic segmentation.

clip-benchmark scores global image and text features only; these tasks score what the region-phrase loss
trains, the *region* feature (the mean of a region's projected patch tokens) against the *phrase* feature
(the mean of the phrase's projected token states in its caption), pooled by
:func:`powerclip.model.region_phrase_features`, the training path itself. ``run_benchmark`` runs them through
its task registry and writes the same output JSON as for clip-benchmark's tasks.

A region is an object's box mapped onto the model's patch grid by :class:`powerclip.regions.PatchGrid`
(the mapping of every region source). The region pooling is the same for every model, whatever its global
vision pool: a stock CLIP (``cls``) or a CLIPpy model (``max``) has patch tokens too, and its regions are
their means. Models are used through :class:`TokenModel` (patch tokens, token states, global text features),
which :class:`OpenClipTokens` implements for open_clip models; any ``nn.Module`` with that interface can be
evaluated (the tests build such models with known answers).

* :func:`grounding_task` (``shapes_grounding``): per image, every object's region against the phrases of
  every object's first mention; region -> phrase and phrase -> region accuracy, a tie among m maxima that
  includes the right answer earning 1/m (chance 1/n for n objects; ``chance`` is its mean over items).
* :func:`region_binding_task` (``shapes_region_binding``): each object's region against its mention and the
  same mention in the caption with the two objects' colours swapped; tie-aware accuracy as the caption suites.
* :func:`segmentation_task` (``shapes_segmentation``, PASCAL VOC): each patch against the prompt embedding of
  every class (background included), the logits upsampled bilinearly to the pixels of the centre crop the
  model sees and scored against the labels (pixels outside the crop are not scored): mIoU and the
  foreground/background Jaccard index (:mod:`powerclip.evaluation.metrics`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from powerclip.evaluation.metrics import (
    padded_choices,
    segmentation_confusion,
    segmentation_metrics,
    selection_metrics,
)
from powerclip.grid import PatchGrid

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- models
class TokenModel(Protocol):
    """What the region tasks read from a model: projected patch tokens (B, N, D) in row-major grid order,
    projected text token states (B, L, D), global text features (B, D), and the grid geometry."""

    image_size: int
    patch_size: int

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor: ...

    def text_tokens(self, text: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor) -> torch.Tensor: ...


class OpenClipTokens(nn.Module):
    """:class:`TokenModel` of an open_clip model (powerclip.model's token features, its own text pool)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        patch = model.visual.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        from powerclip.model import encode_image_tokens

        return encode_image_tokens(self.model, images)[1]

    def text_tokens(self, text: torch.Tensor) -> torch.Tensor:
        from powerclip.model import encode_text_tokens

        return encode_text_tokens(self.model, text)[1]

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text)


def token_model(model: nn.Module) -> TokenModel:
    """The model itself when it has the :class:`TokenModel` interface, else its open_clip adapter."""
    if all(hasattr(model, name) for name in ("image_tokens", "text_tokens", "encode_text", "image_size", "patch_size")):
        return model
    return OpenClipTokens(model)


# ------------------------------------------------------------------------------------------------ data
def read_region_suite(root: str | Path) -> list[dict[str, Any]]:
    """Samples of a region suite in key order: ``{"key", "image": PIL RGB, **its json record}``."""
    from powerclip.shards import decode_image, iter_samples

    root = Path(root)
    nshards_file = root / "test" / "nshards.txt"
    if not nshards_file.is_file():
        raise FileNotFoundError(f"{nshards_file}: not a local suite (write it with write_eval_suites)")
    samples = []
    for shard in range(int(nshards_file.read_text())):
        for sample in iter_samples(root / "test" / f"{shard}.tar", fields={"jpg", "json"}):
            if "json" not in sample or "jpg" not in sample:
                raise ValueError(f"{root}: sample {sample['__key__']!r} lacks jpg or json; write the suite again")
            record = json.loads(sample["json"])
            samples.append({"key": sample["__key__"], "image": decode_image(sample["jpg"]).convert("RGB"), **record})
    if not samples:
        raise ValueError(f"{root}: the suite has no samples")
    return samples


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Features:
    """Region and phrase features of items, on the training pooling path."""

    def __init__(self, model: TokenModel, transform, tokenizer, device: str, amp: bool):
        from powerclip.phrases import ClipTokenAligner

        self.model, self.transform, self.tokenizer, self.device, self.amp = model, transform, tokenizer, device, amp
        self.grid = PatchGrid(model.image_size, model.patch_size)
        self.aligner = ClipTokenAligner(tokenizer=getattr(tokenizer, "tokenizer", tokenizer))

    def autocast(self):
        return torch.autocast(torch.device(self.device).type, enabled=self.amp)

    def object_cells(self, sample: dict[str, Any]) -> list[list[int]]:
        width, height = sample["image"].size
        cells = [self.grid.box_to_cells(o["bbox"], width, height) for o in sample["objects"]]
        if any(c is None for c in cells):
            raise ValueError(f"sample {sample['key']!r}: an object lies outside the model's centre crop")
        return cells

    def phrase_positions(self, caption: str, text: torch.Tensor, spans: Sequence[Sequence[int]]) -> list[list[int]]:
        if self.aligner.clean(caption) != caption:  # the mentions' character spans refer to the caption as stored
            raise ValueError(f"caption {caption!r} changes under the tokenizer's cleaning; write the suite again")
        pieces = self.aligner.pieces(caption)
        length = len(pieces.ids)
        if text[1 : length + 1].tolist() != pieces.ids:
            raise ValueError(f"caption {caption!r}: the tokenizer's ids differ from the aligned pieces")
        positions = [self.aligner.positions(pieces, start, end) for start, end in spans]
        if any(not p or p[-1] > self.aligner.last_content_position for p in positions):
            raise ValueError(f"caption {caption!r}: a mention has no token inside the context")
        return positions

    @torch.no_grad()
    def __call__(self, images: list, captions: list[str], regions: list[list[list[int]]], phrases_spans: list) -> dict:
        """Normalised region features (B, K, D) and phrase features (B, P, D) with their masks."""
        from powerclip.data import pad_groups
        from powerclip.model import region_phrase_features

        pixels = torch.stack([self.transform(image) for image in images]).to(self.device)
        text = self.tokenizer(captions)
        phrases = [self.phrase_positions(c, t, s) for c, t, s in zip(captions, text, phrases_spans)]
        batch = {}
        batch["region_index"], batch["region_cells"], _ = pad_groups(regions, max(map(len, regions)))
        batch["phrase_index"], batch["phrase_tokens"], _ = pad_groups(phrases, max(map(len, phrases)))
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.autocast():
            out = {"patch_tokens": self.model.image_tokens(pixels), "token_states": self.model.text_tokens(text.to(self.device))}
        out = {k: v.float() for k, v in out.items()}
        return {k: v.cpu() for k, v in region_phrase_features(out, batch).items()}


def _identical(features: torch.Tensor, index: int) -> torch.Tensor:
    """Which rows of ``features`` are bit-identical to row ``index`` (an exact tie whatever the matmul)."""
    return (features == features[index]).all(dim=-1)


# ------------------------------------------------------------------------------------------------ tasks
def grounding_scores(model: TokenModel, transform, tokenizer, samples: Sequence[dict], device="cpu", amp=False,
                     batch_size: int = 64) -> dict[str, list]:  # fmt: skip
    """Per-item choices of the grounding suite: ``{"r2p": [...], "p2r": [...]}`` for :func:`padded_choices`."""
    features = _Features(model, transform, tokenizer, device, amp)
    r2p, p2r = [], []
    for chunk in batches(samples, batch_size):
        out = features(
            [s["image"] for s in chunk], [s["caption"] for s in chunk], [features.object_cells(s) for s in chunk],
            [s["mentions"] for s in chunk],
        )  # fmt: skip
        for b, sample in enumerate(chunk):
            n = len(sample["objects"])
            regions, phrases = out["region_features"][b, :n], out["phrase_features"][b, :n]
            sims = regions @ phrases.T  # (regions, phrases)
            r2p += [(sims[i], i, _identical(phrases, i)) for i in range(n)]
            p2r += [(sims[:, j], j, _identical(regions, j)) for j in range(n)]
    return {"r2p": r2p, "p2r": p2r}


def grounding_metrics(choices: dict[str, list]) -> dict[str, float]:
    """Tie-aware accuracies of both directions, their mean, the mean chance level and the tie rates."""
    r2p, p2r = (selection_metrics(padded_choices(choices[d])) for d in ("r2p", "p2r"))
    return {
        "region_to_phrase_acc": r2p["text_acc_ties_split"],
        "phrase_to_region_acc": p2r["text_acc_ties_split"],
        "grounding_acc": (r2p["text_acc_ties_split"] + p2r["text_acc_ties_split"]) / 2,
        "chance": float(np.mean([1.0 / len(scores) for scores, _, _ in choices["r2p"]])),
        "region_to_phrase_tie_rate": r2p["tie_rate"],
        "phrase_to_region_tie_rate": p2r["tie_rate"],
    }


def region_binding_scores(model: TokenModel, transform, tokenizer, samples: Sequence[dict], device="cpu", amp=False,
                          batch_size: int = 64) -> list:  # fmt: skip
    """Per object: (scores of its own mention and of the colour-swapped one, 0, identical)."""
    features = _Features(model, transform, tokenizer, device, amp)
    items = []
    for chunk in batches(samples, batch_size):
        images = [s["image"] for s in chunk]
        regions = [features.object_cells(s) for s in chunk]
        own = features(images, [s["caption"] for s in chunk], regions, [s["mentions"] for s in chunk])
        swapped = features(images, [s["negative_caption"] for s in chunk], regions, [s["negative_mentions"] for s in chunk])
        for b, sample in enumerate(chunk):
            for i in range(len(sample["objects"])):
                region = own["region_features"][b, i]
                pair = torch.stack([own["phrase_features"][b, i], swapped["phrase_features"][b, i]])
                items.append((pair @ region, 0, _identical(pair, 0)))
    return items


def region_binding_metrics(items: list) -> dict[str, float]:
    metrics = selection_metrics(padded_choices(items))
    metrics.pop("text_acc_cb")  # argmax with the positive first: a tie counted as a win, not a metric here
    return metrics


# ------------------------------------------------------------------------------------------ segmentation
class SegmentationData(torch.utils.data.Dataset):
    """(transformed image, label map (H, W) uint8, (width, height)) of each image; ``load(i)`` gives the
    PIL image and the label (a callable, so a large dataset is read lazily in DataLoader workers)."""

    def __init__(self, n: int, load: Callable[[int], tuple[Any, np.ndarray]], transform):
        self.n, self.load, self.transform = n, load, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        image, label = self.load(i)
        if label.shape != (image.size[1], image.size[0]):
            raise ValueError(f"image {i}: label {label.shape} does not match image {image.size[::-1]}")
        return self.transform(image), label, image.size


def shapes_segmentation(root: str | Path, transform) -> tuple[SegmentationData, list[str], list[str]]:
    """A shapes segmentation suite: the label map of each image from its exact masks; classes from meta.json."""
    from powerclip.synthetic import rle_decode

    meta = json.loads((Path(root) / "meta.json").read_text())
    classnames = meta["classnames"]
    samples = read_region_suite(root)

    def load(i: int):
        sample = samples[i]
        label = np.zeros((sample["image"].size[1], sample["image"].size[0]), dtype=np.uint8)
        for obj in sample["objects"]:
            label[rle_decode(obj["mask"])] = classnames.index(f"{obj['color']} {obj['shape']}")
        return sample["image"], label

    return SegmentationData(len(samples), load, transform), classnames, meta["templates"]


def voc_segmentation(root: str | Path, transform) -> tuple[SegmentationData, list[str], dict[str, list[str]]]:
    """PASCAL VOC 2012 val in its own folder layout (:mod:`powerclip.evaluation.voc`)."""
    from PIL import Image

    from powerclip.evaluation.voc import VOC_CLASSES, read_label, voc_files, voc_prompts

    files = voc_files(root)

    def load(i: int):
        _, image, label = files[i]
        with Image.open(image) as handle:
            return handle.convert("RGB"), read_label(label)

    return SegmentationData(len(files), load, transform), list(VOC_CLASSES), voc_prompts()


def _segmentation_source(dataset: str):
    from powerclip.evaluation.voc import VOC_DATASET

    return {VOC_DATASET: voc_segmentation}.get(dataset, shapes_segmentation)


def _as_list(batch: list) -> list:
    """Images of several sizes: a batch stays a list (the DataLoader's workers still decode in parallel)."""
    return batch


def crop_box(grid: PatchGrid, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in original pixels of the centre crop the model sees (Resize + CenterCrop)."""
    sx, sy, left, top = grid.crop_geometry(width, height)
    x0, y0 = round(left / sx), round(top / sy)
    x1, y1 = min(width, round((left + grid.image_size) / sx)), min(height, round((top + grid.image_size) / sy))
    return x0, y0, x1, y1


@torch.no_grad()
def segmentation_confusion_of(model: TokenModel, classifier: torch.Tensor, data: SegmentationData, device="cpu",
                              amp=False, batch_size: int = 64, workers: int = 0) -> np.ndarray:  # fmt: skip
    """The class confusion matrix of zero-shot segmentation over ``data`` (``classifier``: (D, C) prompts)."""
    grid = PatchGrid(model.image_size, model.patch_size)
    g, n_classes = grid.cells_per_side, classifier.shape[1]
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=_as_list)
    for chunk in loader:
        pixels = torch.stack([x for x, _, _ in chunk]).to(device)
        with torch.autocast(torch.device(device).type, enabled=amp):
            tokens = model.image_tokens(pixels)
        logits = F.normalize(tokens.float(), dim=-1) @ classifier.float().to(device)  # (B, N, C)
        logits = logits.transpose(1, 2).reshape(len(chunk), n_classes, g, g).cpu()
        for (_, label, (width, height)), cell_logits in zip(chunk, logits):
            x0, y0, x1, y1 = crop_box(grid, width, height)
            up = F.interpolate(cell_logits[None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
            confusion += segmentation_confusion(up[0].argmax(0).numpy(), label[y0:y1, x0:x1], n_classes)
    return confusion


# ------------------------------------------------------------------------------------------ runner tasks
def grounding_task(job) -> dict[str, float]:
    model = token_model(job.model)
    choices = grounding_scores(model, job.transform, job.tokenizer, read_region_suite(job.root), job.device, job.amp,
                               job.batch_size)  # fmt: skip
    return grounding_metrics(choices)


def region_binding_task(job) -> dict[str, float]:
    model = token_model(job.model)
    items = region_binding_scores(model, job.transform, job.tokenizer, read_region_suite(job.root), job.device,
                                  job.amp, job.batch_size)  # fmt: skip
    return region_binding_metrics(items)


def segmentation_task(job) -> dict[str, float]:
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

    model = token_model(job.model)
    data, classnames, templates = _segmentation_source(job.dataset)(job.root, job.transform)
    classifier = zero_shot_classifier(model, job.tokenizer, classnames, templates, job.device, amp=job.amp)
    confusion = segmentation_confusion_of(model, classifier, data, job.device, job.amp, job.batch_size, job.workers)
    log.info("%s: %d images, %d classes, %d scored pixels", job.dataset, len(data), len(classnames), confusion.sum())
    return segmentation_metrics(confusion, background=0)


REGION_TASKS: dict[str, Callable[[Any], dict[str, float]]] = {
    "region_grounding": grounding_task,
    "region_binding": region_binding_task,
    "zeroshot_segmentation": segmentation_task,
}

__all__ = [
    "REGION_TASKS", "OpenClipTokens", "SegmentationData", "TokenModel", "crop_box", "grounding_metrics",
    "grounding_scores", "read_region_suite", "region_binding_metrics", "region_binding_scores",
    "segmentation_confusion_of", "shapes_segmentation", "token_model", "voc_segmentation",
]  # fmt: skip
