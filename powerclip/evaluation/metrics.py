"""Evaluation metrics as plain functions of tensors (and, for caption selection, of a model and a loader).

* :func:`accuracy`: clip-benchmark 1.6.2's top-k accuracy, numerically identical, without its ``float()`` of a
  1-element 1-D array, which numpy >= 2.4 rejects.
* :func:`classification_metrics`: what ``clip_benchmark.metrics.zeroshot_classification.evaluate`` returns
  from the logits (acc1, acc5, mean per-class recall; mean average precision for multi-label targets), with
  that accuracy, so the runner needs no patched clip-benchmark function for zero-shot classification.
* :func:`caption_selection_scores` and :func:`selection_metrics`: tie-aware caption-selection accuracy.
  clip-benchmark's ``image_caption_selection`` takes ``argmax`` over the captions with the positive at index
  0, so an exact tie counts as correct, and its ``image @ texts.T`` matmul turns some exact ties into 1-ulp
  differences either way: an order-insensitive text encoder scores near 100 %, not 50 %, on word-swap
  negatives. ``text_acc_strict`` (positive strictly above every negative), ``text_acc_ties_split`` (a tie
  among m maxima earns 1/m; chance = 50 % for one negative) and ``tie_rate`` fix that.
* :func:`padded_choices`: items with a varying number of candidates (region grounding: 2-4 objects per image) as
  the (N, C) scores :func:`selection_metrics` reads, padded with candidates that never win.
* :func:`segmentation_confusion` and :func:`segmentation_metrics`: zero-shot semantic segmentation scored as
  CLIPpy scores PASCAL VOC (a class confusion matrix over every scored pixel, label 255 ignored): mean IoU
  over the classes present in the labels or the predictions, and the foreground/background Jaccard index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Top-k accuracies of ``output`` (N, C) logits against ``target`` (N,) class ids, one per k.

    clip-benchmark's version ends in ``float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy())
    / n``; the same float32 sum read with ``.item()`` gives the same Python float on every numpy.
    """
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum(0).item() / n for k in topk]


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, n_classes: int) -> dict[str, float]:
    """Zero-shot classification metrics from (N, C) logits, as clip-benchmark computes them.

    Single-label ``target`` (N,): ``acc1``, ``acc5`` (NaN with fewer than 5 classes) and
    ``mean_per_class_recall`` (sklearn's balanced accuracy). Multi-label ``target`` (N, C):
    ``mean_average_precision`` (clip-benchmark's per-class average precision, averaged).
    """
    from clip_benchmark.metrics.zeroshot_classification import average_precision_per_class
    from sklearn.metrics import balanced_accuracy_score

    if target.dim() == 2:
        return {"mean_average_precision": average_precision_per_class(logits, target).mean().item()}
    if n_classes >= 5:
        acc1, acc5 = accuracy(logits, target, topk=(1, 5))
    else:
        (acc1,), acc5 = accuracy(logits, target, topk=(1,)), float("nan")
    recall = balanced_accuracy_score(target, logits.argmax(dim=1))
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": recall}


class SelectionScores(NamedTuple):
    """Per-item image-caption similarities (N, C), positive caption in column 0, and ``identical`` (N, C):
    caption c's normalised embedding is bit-identical to the positive's (the model cannot tell them apart)."""

    scores: torch.Tensor
    identical: torch.Tensor


@torch.no_grad()
def caption_selection_scores(
    model: nn.Module,
    dataloader: Iterable[tuple[torch.Tensor, Sequence[Sequence[str]]]],
    tokenizer: Callable[..., torch.Tensor],
    device: str | torch.device = "cpu",
    amp: bool = False,
) -> SelectionScores:
    """Image-caption similarities for one-image items, computed exactly as clip-benchmark computes them.

    The arithmetic mirrors ``clip_benchmark.metrics.image_caption_selection.evaluate`` step by step (same
    autocast, normalisation, per-item ``image @ texts.T``), so ``argmax`` here is its ``argmax``. That
    matmul does not give bit-identical columns for identical text embeddings (BLAS accumulates columns
    differently; observed: 1-ulp differences for ~10 % of identical pairs at D=49408), so exact ties are
    recorded separately, from the embeddings, in ``identical``.
    """
    device_type = torch.device(device).type
    rows: list[torch.Tensor] = []
    same: list[torch.Tensor] = []
    for batch_images, batch_texts in dataloader:
        if batch_images.dim() != 4:
            raise ValueError("caption_selection_scores expects one image per item (B, C, H, W)")
        batch_size = batch_images.shape[0]
        nt = len(batch_texts[0])
        if any(len(texts) != nt for texts in batch_texts):
            raise ValueError("every item needs the same number of captions")
        tokens = tokenizer([text for texts in batch_texts for text in texts]).to(device)
        with torch.autocast(device_type, enabled=amp):
            images_emb = F.normalize(model.encode_image(batch_images.to(device)), dim=-1).view(batch_size, 1, -1)
            texts_emb = F.normalize(model.encode_text(tokens), dim=-1).view(batch_size, nt, -1)
        for i in range(batch_size):
            rows.append((images_emb[i] @ texts_emb[i].t())[0].float().cpu())
            same.append((texts_emb[i] == texts_emb[i, :1]).all(dim=-1).cpu())
    if not rows:
        raise ValueError("no items")
    return SelectionScores(torch.stack(rows), torch.stack(same))


def selection_metrics(
    scores: torch.Tensor | SelectionScores, identical: torch.Tensor | None = None
) -> dict[str, float]:
    """Accuracies from (N, C) scores with the positive caption in column 0.

    ``text_acc_cb`` reproduces clip-benchmark's ``text_acc`` (argmax; the first index, the positive, wins
    exact ties). The tie-aware ones treat a caption as tied with the positive when its score is equal or
    its embedding is identical (``identical``): ``text_acc_strict`` positive strictly above every negative;
    ``text_acc_ties_split`` a tie among m maxima that includes the positive earns 1/m (chance is 1/C);
    ``tie_rate`` the positive tied with some negative at the maximum.
    """
    if isinstance(scores, SelectionScores):
        scores, identical = scores
    cb = (scores.argmax(dim=1) == 0).float().mean().item()
    if identical is not None:
        scores = torch.where(identical, scores[:, :1], scores)
    best = scores.max(dim=1, keepdim=True).values
    at_max = scores == best
    positive_at_max = at_max[:, 0]
    n_max = at_max.sum(dim=1).float()
    return {
        "text_acc_cb": cb,
        "text_acc_strict": (positive_at_max & (n_max == 1)).float().mean().item(),
        "text_acc_ties_split": torch.where(positive_at_max, 1.0 / n_max, torch.zeros_like(n_max)).mean().item(),
        "tie_rate": (positive_at_max & (n_max > 1)).float().mean().item(),
    }


def padded_choices(
    items: Sequence[tuple[torch.Tensor, int, torch.Tensor | None]],
) -> SelectionScores:
    """Choices among a varying number of candidates as :class:`SelectionScores` (the correct one in column 0).

    Each item is ``(scores (C_i,), correct index, identical (C_i,) bool or None)``; ``identical[c]`` says
    candidate c's embedding is bit-identical to the correct one's (an exact tie, whatever the arithmetic).
    Columns are reordered so that the correct candidate comes first and padded to the widest item with
    ``-inf`` candidates, which never reach the maximum, so :func:`selection_metrics` scores every item
    against its own candidates only (chance = 1/C_i per item).
    """
    if not items:
        raise ValueError("no items")
    width = max(len(scores) for scores, _, _ in items)
    rows = torch.full((len(items), width), float("-inf"))
    same = torch.zeros((len(items), width), dtype=torch.bool)
    for n, (scores, correct, identical) in enumerate(items):
        scores = torch.as_tensor(scores, dtype=torch.float32)
        if not 0 <= correct < len(scores):
            raise IndexError(f"item {n}: correct index {correct} outside its {len(scores)} candidates")
        order = [correct] + [c for c in range(len(scores)) if c != correct]
        rows[n, : len(scores)] = scores[order]
        if identical is not None:
            same[n, : len(scores)] = torch.as_tensor(identical, dtype=torch.bool)[order]
        same[n, 0] = True
    return SelectionScores(rows, same)


# ---------------------------------------------------------------------------------------- segmentation
IGNORE_LABEL = 255  # PASCAL VOC's "void" (object borders, difficult regions): never scored


def segmentation_confusion(
    prediction: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray, n_classes: int, ignore: int = IGNORE_LABEL
) -> np.ndarray:
    """(n_classes, n_classes) pixel counts, rows = label, columns = prediction, over the pixels whose label
    is not ``ignore``; the confusion matrix of CLIPpy's ``PascalMIoU.update`` (a prediction outside the
    classes is an error: it would silently become background there)."""
    prediction = np.asarray(prediction, dtype=np.int64).ravel()
    label = np.asarray(label, dtype=np.int64).ravel()
    if prediction.shape != label.shape:
        raise ValueError(f"prediction has {prediction.size} pixels, label {label.size}")
    keep = label != ignore
    prediction, label = prediction[keep], label[keep]
    for name, values in (("label", label), ("prediction", prediction)):
        if values.size and (values.min() < 0 or values.max() >= n_classes):
            raise ValueError(f"{name} values outside 0..{n_classes - 1} (ignore = {ignore}): {np.unique(values)[:10]}")
    return np.bincount(n_classes * label + prediction, minlength=n_classes**2).reshape(n_classes, n_classes)


def segmentation_metrics(confusion: np.ndarray, background: int = 0) -> dict[str, float]:
    """``miou``: the mean over classes of TP / (TP + FP + FN), over the classes that occur in the labels or
    the predictions (a class absent from both has no IoU and is left out; VOC's val split has all 21);
    ``jaccard``: the IoU of foreground (every class but ``background``) in prediction and label, over all
    scored pixels; ``pixel_acc``: the share of scored pixels labelled correctly."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    present = union > 0
    if not present.any():
        raise ValueError("no scored pixel")
    fg = np.ones(len(confusion), dtype=bool)
    fg[background] = False
    fg_tp = confusion[np.ix_(fg, fg)].sum()  # foreground predicted as any foreground class
    fg_union = confusion[fg].sum() + confusion[:, fg].sum() - fg_tp
    return {
        "miou": float((tp[present] / union[present]).mean()),
        "jaccard": float(fg_tp / fg_union) if fg_union else float("nan"),
        "pixel_acc": float(tp.sum() / confusion.sum()),
    }


__all__ = [
    "IGNORE_LABEL",
    "SelectionScores",
    "accuracy",
    "caption_selection_scores",
    "classification_metrics",
    "padded_choices",
    "segmentation_confusion",
    "segmentation_metrics",
    "selection_metrics",
]
