"""clip-benchmark, run in-process, with PowerCLIP's average pooling and without editing installed files.

* :func:`register_loaders` adds a ``powerclip`` model type to ``clip_benchmark.models.TYPE2FUNC`` (and to
  ``MODEL_TYPES``, the list the CLI's ``--model_type`` choices and ``load_clip``'s check use). Its loader
  rebuilds our checkpoints (``powerclip_cfg`` inside) with their recorded pools, and loads released
  OpenCLIP-format weights (a local file, an open_clip pretrained tag, or an ``hf-hub:``/``local-dir:`` id such
  as ``hf-hub:KMasaki/PowerCLIP-ViT-B-16-CC12M``) with avg pooling forced in both towers, as the official
  README prescribes. It also replaces clip-benchmark 1.6.2's ``accuracy()``, which raises under numpy >= 2.4
  (``float()`` of a 1-element 1-D array), by one that computes the same numbers.
* :func:`run_benchmark` calls ``clip_benchmark.cli.main`` itself (its parser, defaults, dataset builders,
  metrics and output JSON) with ``--model_type powerclip``, ``--no_amp`` on CPU, ``num_workers`` clamped to
  the number of shards (webdataset 1.0.2 raises "No samples found" otherwise), writes the JSON atomically and
  returns it.
* For ``image_caption_selection`` it adds three metrics next to clip-benchmark's ``acc``/``text_acc``/
  ``image_acc`` (``image_acc`` is always 1 with one image per item). clip-benchmark takes ``argmax`` over
  the captions with the positive at index 0, so an exact tie counts as correct, and its ``image @ texts.T``
  matmul turns some exact ties into 1-ulp differences either way: an order-insensitive text encoder scores
  near 100 %, not 50 %, on word-swap negatives. ``text_acc_strict`` (positive strictly above every
  negative), ``text_acc_ties_split`` (a tie among m maxima earns 1/m, ties also detected as bit-identical
  text embeddings; chance = 50 % for one negative) and ``tie_rate`` come from a second pass over the same
  data loader with the same arithmetic; clip-benchmark's own numbers stay untouched.

CLI::

    python -m powerclip.evaluate --checkpoint ckpt.pt --dataset wds/shapes_cls \\
        --dataset-root resources/eval/shapes_cls --task zeroshot_classification --output out.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from powerclip.model import (
    install_text_avg_pool,
    load_model,
    load_openclip_checkpoint,
    register_model_configs,
    set_pools,
    unwrap_model,
)

log = logging.getLogger("powerclip.evaluate")  # not __name__: the same name under `python -m`

MODEL_TYPE = "powerclip"
TASKS = ("zeroshot_classification", "zeroshot_retrieval", "image_caption_selection", "linear_probe", "auto")
SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")
# run_benchmark owns these clip-benchmark options; a second copy in extra_args would silently win.
RESERVED_ARGS = frozenset(
    {
        "--model_type",
        "--model",
        "--pretrained",
        "--pretrained_model",
        "--dataset",
        "--dataset_root",
        "--output",
        "--task",
        "--split",
        "--test_split",
        "--batch_size",
        "--num_workers",
        "--recall_k",
        "--no_amp",
    }
)

_LOCK = threading.RLock()
# clip-benchmark's own accuracy(), kept for comparison (tests) before it is replaced
ORIGINAL_ACCURACY: Callable[..., list[float]] | None = None


# ------------------------------------------------------------------------------------ the accuracy fix
def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """clip-benchmark's top-k accuracy, numerically identical, without ``float()`` of a 1-D array.

    The original ends in ``float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()) / n``,
    which numpy >= 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"). The same
    float32 sum read with ``.item()`` gives the same Python float.
    """
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum(0).item() / n for k in topk]


accuracy._powerclip = True  # type: ignore[attr-defined]  # marks the replacement (idempotency)


def patch_accuracy() -> None:
    """Replace ``accuracy`` in every clip-benchmark metrics module that uses it (idempotent)."""
    global ORIGINAL_ACCURACY
    import clip_benchmark.metrics.zeroshot_classification as zsc

    modules: list[types.ModuleType] = [zsc]
    with contextlib.suppress(ImportError):  # linear_probe imports accuracy by name from zeroshot_classification
        import clip_benchmark.metrics.linear_probe as lp

        modules.append(lp)
    with _LOCK:
        for module in modules:
            current = getattr(module, "accuracy", None)
            if current is None or getattr(current, "_powerclip", False):
                continue
            if ORIGINAL_ACCURACY is None:
                ORIGINAL_ACCURACY = current
            module.accuracy = accuracy
            log.debug("replaced accuracy() in %s", module.__name__)


# ---------------------------------------------------------------------------------------- the loader
def eval_transform(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    """open_clip's evaluation transform for the model's own preprocessing config (size, mean, std, ...)."""
    visual = unwrap_model(model).visual
    cfg = getattr(visual, "preprocess_cfg", None) or {"size": visual.image_size}
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)


def _load_file(path: str) -> Any:
    """torch.load for a peek at a checkpoint; memory-mapped where possible (large released weights)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # legacy (non-zip) serialisation cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def is_powerclip_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "powerclip_cfg" in obj and "state_dict" in obj


def checkpoint_model_name(pretrained: str | os.PathLike[str]) -> str | None:
    """The architecture to pass as ``--model``: recorded in our checkpoints, the id itself for hf-hub/local-dir
    ids, None for released weight files (their architecture must be given)."""
    pretrained = str(pretrained)
    if pretrained.startswith(SCHEMA_PREFIXES):
        return pretrained
    if not os.path.isfile(pretrained) or pretrained.endswith(".safetensors"):
        return None
    obj = _load_file(pretrained)
    return obj["powerclip_cfg"]["model_name"] if is_powerclip_checkpoint(obj) else None


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """Hide open_clip's "Model initialized randomly" while rebuilding a checkpoint whose weights follow."""
    root = logging.getLogger()
    flt = _DropMessage("initialized randomly")
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def load_powerclip(
    model_name: str | None = None,
    pretrained: str | None = None,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Callable[[Any], torch.Tensor], Callable[..., torch.Tensor]]:
    """clip-benchmark loader: ``(model.eval(), eval transform, tokenizer)``.

    * ``pretrained`` is one of our checkpoints (has ``powerclip_cfg``): rebuilt by ``load_model`` with the
      recorded config and pools; ``model_name`` is only checked against the recorded one.
    * ``pretrained`` (or ``model_name`` when ``pretrained`` is empty) is an ``hf-hub:`` / ``local-dir:`` id:
      open_clip builds config and weights from it; pools forced to avg.
    * otherwise released OpenCLIP weights (a file: plain state_dict or ``{"state_dict": ...}``; or an open_clip
      pretrained tag) for the architecture ``model_name``; pools forced to avg.
    """
    register_model_configs()
    install_text_avg_pool()
    pretrained = str(pretrained) if pretrained else None
    hub_id = next((s for s in (pretrained, model_name) if s and s.startswith(SCHEMA_PREFIXES)), None)
    checkpoint = None
    if hub_id is None and pretrained and os.path.isfile(pretrained) and not pretrained.endswith(".safetensors"):
        checkpoint = _load_file(pretrained)
    if is_powerclip_checkpoint(checkpoint):
        cfg = checkpoint["powerclip_cfg"]
        name = cfg["model_name"]
        if model_name and model_name != name:
            log.warning("%s was trained as %r; ignoring model name %r", pretrained, name, model_name)
        # rebuilt with the pools it was trained with (the run table may ablate them)
        with _quiet_random_init_warning():
            model = load_model(checkpoint)
        log.info(
            "rebuilt %s from %s (vision_pool=%s, text_pool=%s)", name, pretrained, cfg["vision_pool"], cfg["text_pool"]
        )
    else:
        del checkpoint  # open_clip reads the file itself (and handles 'state_dict' / 'module.' keys)
        if hub_id is not None:
            # open_clip ignores `pretrained` for schema names: config and weights both come from the id
            name, weights = hub_id, None
        elif model_name:
            name, weights = model_name, pretrained
        else:
            raise ValueError(f"{pretrained}: released OpenCLIP weights need the architecture (model_name)")
        kwargs = {"cache_dir": cache_dir} if cache_dir else {}
        model = load_openclip_checkpoint(name, pretrained=weights, **kwargs)
        # create_model set avg already; repeated so the README's rule (avg in both towers) is explicit here
        set_pools(model, "avg", "avg")
        log.info("loaded %s (weights %s) with avg pooling forced in both towers", name, weights or name)
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir) if hub_id else open_clip.get_tokenizer(name)
    return model, eval_transform(model), tokenizer


def register_loaders() -> None:
    """Add the ``powerclip`` model type to clip-benchmark and patch ``accuracy`` (idempotent)."""
    import clip_benchmark.models as cbm

    with _LOCK:
        cbm.TYPE2FUNC[MODEL_TYPE] = load_powerclip
        # MODEL_TYPES is a list built at import; cli imported the same object, so append in place
        if MODEL_TYPE not in cbm.MODEL_TYPES:
            cbm.MODEL_TYPES.append(MODEL_TYPE)
    patch_accuracy()


# ------------------------------------------------------------------- caption-selection extra metrics
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


def _selection_with_extras(original: types.ModuleType) -> types.SimpleNamespace:
    """A stand-in for clip_benchmark.cli's ``image_caption_selection`` module that adds tie-aware metrics."""

    def evaluate(model, dataloader, tokenizer, device, amp=True):  # noqa: ANN001 - clip-benchmark's signature
        metrics = original.evaluate(model, dataloader, tokenizer, device=device, amp=amp)
        extra = selection_metrics(caption_selection_scores(model, dataloader, tokenizer, device=device, amp=amp))
        if abs(extra.pop("text_acc_cb") - metrics["text_acc"]) > 1e-9:
            # the second pass must see what clip-benchmark saw; a mismatch means the data order changed
            raise RuntimeError("tie-aware pass disagrees with clip-benchmark's text_acc")
        metrics.update(extra)
        return metrics

    return types.SimpleNamespace(evaluate=evaluate)


# ------------------------------------------------------------------------------------ run_benchmark
class _CPUOnlyTorch:
    """``torch`` as clip_benchmark.cli sees it, with CUDA reported unavailable (cli.run picks the device)."""

    def __init__(self, real: types.ModuleType) -> None:
        self._real = real
        self.cuda = types.SimpleNamespace(is_available=lambda: False)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _LogStream(io.TextIOBase):
    """File-like sink that turns clip-benchmark's prints into log records (one per line)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            if line.strip():
                self._logger.info("clip_benchmark: %s", line)
        return len(text)

    def flush(self) -> None:
        if self._buffer.strip():
            self._logger.info("clip_benchmark: %s", self._buffer)
        self._buffer = ""


@contextlib.contextmanager
def _patched_cli(argv: list[str], force_cpu: bool, selection_extras: bool) -> Iterator[types.ModuleType]:
    import clip_benchmark.cli as cli

    saved = (sys.argv, cli.torch, cli.image_caption_selection)
    sys.argv = ["clip_benchmark", *argv]  # cli.main() parses sys.argv itself
    if force_cpu:
        cli.torch = _CPUOnlyTorch(saved[1])
    if selection_extras:
        cli.image_caption_selection = _selection_with_extras(saved[2])
    try:
        yield cli
    finally:
        sys.argv, cli.torch, cli.image_caption_selection = saved


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but CUDA is not available")
    return device


def _dataset_root(dataset: str, dataset_root: str) -> Path:
    """The root of one dataset, with clip-benchmark's ``{dataset}`` / ``{dataset_cleaned}`` templates."""
    name = dataset.replace("wds/", "", 1) if dataset.startswith("wds/") else dataset
    return Path(dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-")))


def count_shards(dataset: str, dataset_root: str | os.PathLike[str], split: str = "test") -> int | None:
    """Shards of a local wds dataset (``<root>/<split>/nshards.txt``); None if not a local wds dataset."""
    if not dataset.startswith("wds/") or "://" in str(dataset_root):
        return None
    path = _dataset_root(dataset, str(dataset_root)) / split / "nshards.txt"
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def suite_task(dataset: str, dataset_root: str | os.PathLike[str]) -> str | None:
    """The task recorded in a local suite's ``meta.json`` (written by powerclip.suites), if any."""
    meta = _dataset_root(dataset, str(dataset_root)) / "meta.json"
    try:
        return json.loads(meta.read_text()).get("task")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_benchmark(
    checkpoint: str | os.PathLike[str],
    dataset: str,
    dataset_root: str | os.PathLike[str],
    task: str | None,
    output_json: str | os.PathLike[str],
    batch_size: int = 64,
    num_workers: int = 0,
    recall_k: Sequence[int] = (1, 5, 10),
    model_name: str | None = None,
    device: str = "auto",
    extra_args: Sequence[str] = (),
    *,
    split: str = "test",
    amp: bool | None = None,
    selection_extras: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``dataset`` with clip-benchmark's CLI in-process; return its output JSON.

    ``checkpoint``: one of our checkpoints, released OpenCLIP weights (then ``model_name`` is required), or
    an ``hf-hub:`` id. ``task``: a clip-benchmark task, or None/"auto" (a powerclip suite's ``meta.json``
    names its task; otherwise clip-benchmark's own inference). ``device``: auto/cpu/cuda ("cpu" hides CUDA
    from clip-benchmark's device choice). ``amp``: None = on for CUDA, off on CPU (CPU autocast would be
    bf16). ``extra_args`` go to clip-benchmark verbatim (e.g. ``["--dump_classnames"]``). With
    ``selection_extras``, image_caption_selection results also carry the tie-aware metrics (module docstring).

    Not thread-safe: while it runs, ``sys.argv`` and two globals of ``clip_benchmark.cli`` are swapped.
    """
    register_loaders()
    checkpoint = str(checkpoint)
    dataset_root = str(dataset_root)
    device = resolve_device(device)
    amp = (device == "cuda") if amp is None else amp
    clash = sorted(RESERVED_ARGS & {a.split("=", 1)[0] for a in extra_args})
    if clash:
        raise ValueError(f"extra_args may not set {clash}: run_benchmark sets them")
    if task in (None, "auto"):
        task = suite_task(dataset, dataset_root) or "auto"
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if model_name is None:
        model_name = checkpoint_model_name(checkpoint)
        if model_name is None:
            raise ValueError(f"{checkpoint}: not a powerclip checkpoint; pass model_name (the architecture)")

    nshards = count_shards(dataset, dataset_root, split)
    workers = num_workers
    if nshards is not None and workers > nshards:
        # webdataset 1.0.2 raises "No samples found in dataset; perhaps you have fewer shards than workers"
        log.info("num_workers %d > %d shard(s) of %s: using %d", workers, nshards, dataset, nshards)
        workers = nshards

    from powerclip.shards import atomic_output

    output_json = Path(output_json)
    with atomic_output(output_json) as tmp:
        result = _run_cli(checkpoint, model_name, dataset, dataset_root, split, task, batch_size, workers, recall_k,
                          tmp, amp, verbose, extra_args, device, selection_extras)  # fmt: skip
    log.info("%s on %s (%s): %s -> %s", checkpoint, dataset, result["task"], result["metrics"], output_json)
    return result


def _run_cli(checkpoint, model_name, dataset, dataset_root, split, task, batch_size, workers, recall_k, tmp, amp,
             verbose, extra_args, device, selection_extras) -> dict[str, Any]:  # fmt: skip
    """clip_benchmark's CLI in-process, writing its JSON to ``tmp``; returns the parsed result."""
    argv = [
        "eval",
        "--model_type",
        MODEL_TYPE,
        "--model",
        model_name,
        "--pretrained",
        checkpoint,
        "--dataset",
        dataset,
        "--dataset_root",
        dataset_root,
        "--split",
        split,
        "--task",
        task,
        "--batch_size",
        str(batch_size),
        "--num_workers",
        str(workers),
        "--recall_k",
        *[str(k) for k in recall_k],
        # clip-benchmark formats --output as a template: escape braces so the path is taken literally
        "--output",
        str(tmp).replace("{", "{{").replace("}", "}}"),
    ]
    if not amp:
        argv.append("--no_amp")
    if not verbose:
        argv.append("--quiet")
    argv.extend(extra_args)
    log.info("clip_benchmark %s", " ".join(argv))
    with _patched_cli(argv, force_cpu=device == "cpu", selection_extras=selection_extras) as cli:
        stream = _LogStream(log)
        try:
            with contextlib.redirect_stdout(stream):
                cli.main()
        except SystemExit as exc:  # argparse errors
            if exc.code not in (0, None):
                raise RuntimeError(f"clip_benchmark rejected its arguments {argv}: exit {exc.code}") from exc
        finally:
            stream.flush()
    text = Path(tmp).read_text()
    if not text.strip():
        raise RuntimeError(f"clip_benchmark wrote no result for {dataset} ({task})")
    return json.loads(text)  # Python's json reads clip-benchmark's NaN (acc5 with < 5 classes)


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m powerclip.evaluate",
        description=__doc__.splitlines()[0],
        epilog="Unrecognised options are passed to clip_benchmark eval (e.g. --dump_classnames).",
    )
    p.add_argument("--checkpoint", required=True, help="our checkpoint, released OpenCLIP weights, or hf-hub:<repo>")
    p.add_argument("--dataset", required=True, help="clip-benchmark dataset, e.g. wds/shapes_cls")
    p.add_argument(
        "--dataset-root", required=True, help="dataset root (clip-benchmark template with {dataset} allowed)"
    )
    p.add_argument("--task", default="auto", choices=TASKS)
    p.add_argument("--output", required=True, help="output JSON path")
    p.add_argument("--model", default=None, help="architecture (needed for released weights only)")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default=None, action=argparse.BooleanOptionalAction, help="default: on for CUDA only")
    p.add_argument(
        "--no-selection-extras",
        dest="selection_extras",
        action="store_false",
        help="skip the tie-aware image_caption_selection metrics (saves a second pass)",
    )
    p.add_argument("--verbose", action="store_true")
    return p.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, extra = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result = run_benchmark(
        args.checkpoint,
        args.dataset,
        args.dataset_root,
        args.task,
        args.output,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        recall_k=args.recall_k,
        model_name=args.model,
        device=args.device,
        extra_args=extra,
        split=args.split,
        amp=args.amp,
        selection_extras=args.selection_extras,
        verbose=args.verbose,
    )
    print(args.output)  # the one line of stdout: where the result is
    return result


__all__ = [
    "MODEL_TYPE",
    "accuracy",
    "caption_selection_scores",
    "checkpoint_model_name",
    "count_shards",
    "eval_transform",
    "load_powerclip",
    "patch_accuracy",
    "register_loaders",
    "run_benchmark",
    "SelectionScores",
    "selection_metrics",
    "suite_task",
]

if __name__ == "__main__":
    main()
