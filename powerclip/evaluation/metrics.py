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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

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


__all__ = [
    "SelectionScores",
    "accuracy",
    "caption_selection_scores",
    "classification_metrics",
    "selection_metrics",
]
