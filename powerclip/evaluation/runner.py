"""One clip-benchmark evaluation (a checkpoint on a dataset) through clip-benchmark's Python API.

:func:`run_benchmark` does for one model and one dataset what ``clip_benchmark eval`` does (its ``cli.run``),
calling the same functions with explicit arguments: ``build_dataset``, the same DataLoader, ``load_clip``
with the ``powerclip`` loader (:mod:`powerclip.evaluation.loader`), the task's metric functions, and the same
output JSON (``dataset, model, pretrained, task, metrics, language``). What differs: the device is ours
(``cpu`` is honoured on a CUDA machine), ``num_workers`` is capped at the number of shards (webdataset 1.0.2
raises "No samples found" otherwise), the JSON is written atomically, and ``image_caption_selection`` results
also carry the tie-aware metrics of :mod:`powerclip.evaluation.metrics`. Three tasks are ours, not
clip-benchmark's (:mod:`powerclip.evaluation.regions`: ``region_grounding``, ``region_binding``,
``zeroshot_segmentation``): they read their suite or dataset folder themselves and write the same JSON.

clip-benchmark is changed in memory in two places only, both unavoidable:

* ``register_loaders`` adds ``powerclip`` to its loader registry, because ``load_clip`` only knows registered types;
* during ``linear_probe`` only, its module-level ``accuracy`` is our numpy >= 2.4-safe one, because
  ``linear_probe.evaluate`` calls the ``accuracy`` it imported by name (zero-shot classification needs no
  patch: its metrics come from ``metrics.classification_metrics``).

CLI::

    python -m powerclip.evaluation.runner --checkpoint ckpt.pt --dataset wds/shapes_cls \\
        --dataset-root resources/eval/shapes_cls --task zeroshot_classification --output out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from powerclip.evaluation.loader import MODEL_TYPE, checkpoint_model_name, register_loaders
from powerclip.evaluation.metrics import (
    accuracy,
    caption_selection_scores,
    classification_metrics,
    selection_metrics,
)
from powerclip.evaluation.regions import REGION_TASKS
from powerclip.shards import atomic_output

log = logging.getLogger("powerclip.evaluation.runner")  # not __name__: the same name under `python -m`

# run_benchmark sets these clip-benchmark options itself; a second copy in extra_args would be ambiguous.
RESERVED_ARGS = frozenset(
    {
        "--model_type", "--model", "--pretrained", "--pretrained_model", "--dataset", "--dataset_root",
        "--output", "--task", "--split", "--test_split", "--batch_size", "--num_workers", "--recall_k",
        "--no_amp", "--quiet",
    }
)  # fmt: skip


def _options_parser() -> argparse.ArgumentParser:
    """The clip-benchmark ``eval`` options ``extra_args`` may set (its names and defaults, one dataset)."""
    p = argparse.ArgumentParser(prog="extra_args", add_help=False, allow_abbrev=False, exit_on_error=False)
    p.add_argument("--language", default="en")
    p.add_argument("--annotation_file", default="")
    p.add_argument("--custom_classname_file", default=None)
    p.add_argument("--custom_template_file", default=None)
    p.add_argument("--wds_cache_dir", default=None)
    p.add_argument("--model_cache_dir", default=None)
    p.add_argument("--dump_classnames", action="store_true")
    p.add_argument("--dump_templates", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    # linear_probe only
    p.add_argument("--train_split", default="train")
    p.add_argument("--val_split", default=None)
    p.add_argument("--val_proportion", type=float, default=None)
    p.add_argument("--fewshot_k", type=int, default=-1)
    p.add_argument("--fewshot_epochs", type=int, default=10)
    p.add_argument("--fewshot_lr", type=float, default=0.1)
    p.add_argument("--feature_root", default="features")
    return p


def parse_options(extra_args: Sequence[str]) -> argparse.Namespace:
    """clip-benchmark options from ``extra_args``; ValueError naming any option that is reserved or unknown."""
    given = {a.split("=", 1)[0] for a in extra_args if a.startswith("--")}
    clash = sorted(RESERVED_ARGS & given)
    if clash:
        raise ValueError(f"extra_args may not set {clash}: run_benchmark sets them from its own arguments")
    parser = _options_parser()
    try:
        options, unknown = parser.parse_known_args(list(extra_args))
    except argparse.ArgumentError as exc:
        raise ValueError(f"extra_args {list(extra_args)}: {exc}") from exc
    if unknown:
        known = sorted(a.option_strings[0] for a in parser._actions)
        raise ValueError(f"extra_args {unknown}: not supported by run_benchmark; supported: {known}")
    return options


# ------------------------------------------------------------------------------------------ datasets
def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but CUDA is not available")
    return device


def _dataset_name(dataset: str) -> str:
    return dataset.replace("wds/", "", 1) if dataset.startswith("wds/") else dataset


def _dataset_root(dataset: str, dataset_root: str) -> Path:
    """The root of one dataset, with clip-benchmark's ``{dataset}`` / ``{dataset_cleaned}`` templates."""
    name = _dataset_name(dataset)
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
    """The task recorded in a local suite's ``meta.json`` (written by powerclip.evaluation.suites), if any."""
    meta = _dataset_root(dataset, str(dataset_root)) / "meta.json"
    try:
        return json.loads(meta.read_text()).get("task")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _test_data(
    dataset: str, root: str, transform: Callable[[Any], torch.Tensor], split: str, task: str, batch_size: int,
    workers: int, options: argparse.Namespace,
) -> tuple[Any, torch.utils.data.DataLoader]:  # fmt: skip
    """The dataset and its DataLoader, exactly as ``cli.run`` builds them."""
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn

    data = build_dataset(
        dataset_name=dataset, root=root, transform=transform, split=split, annotation_file=options.annotation_file,
        download=True, language=options.language, task=task, custom_template_file=options.custom_template_file,
        custom_classname_file=options.custom_classname_file, wds_cache_dir=options.wds_cache_dir,
    )  # fmt: skip
    if dataset.startswith("wds/"):
        batches = data.batched(batch_size)
        return data, torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers)
    collate = get_dataset_collate_fn(dataset)
    return data, torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate
    )


# --------------------------------------------------------------------------------------------- tasks
@dataclasses.dataclass
class Job:
    """Everything a task needs: the loaded model and the test data loader, as ``cli.run`` builds them."""

    dataset: str
    root: str
    model_id: str
    model: Any
    transform: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    data: Any  # the test dataset (None for tasks that read their data themselves: REGION_TASKS)
    dataloader: torch.utils.data.DataLoader | None
    device: str
    amp: bool
    batch_size: int
    workers: int
    recall_k: list[int]
    options: argparse.Namespace
    selection_extras: bool
    verbose: bool


def _zeroshot_classification(job: Job) -> dict[str, float]:
    classnames, templates = getattr(job.data, "classes", None), getattr(job.data, "templates", None)
    if not classnames or not templates:
        raise ValueError(
            f"{job.dataset} at {job.root}: no class names or templates for zero-shot classification (a local wds "
            "dataset needs classnames.txt and zeroshot_classification_templates.txt)"
        )
    from clip_benchmark.metrics import zeroshot_classification as zsc

    classifier = zsc.zero_shot_classifier(job.model, job.tokenizer, classnames, templates, job.device, amp=job.amp)
    logits, target = zsc.run_classification(job.model, classifier, job.dataloader, job.device, amp=job.amp)
    return classification_metrics(logits, target, n_classes=len(classnames))


def _zeroshot_retrieval(job: Job) -> dict[str, float]:
    from clip_benchmark.metrics import zeroshot_retrieval

    return zeroshot_retrieval.evaluate(
        job.model, job.dataloader, job.tokenizer, recall_k_list=job.recall_k, device=job.device, amp=job.amp
    )


def _image_caption_selection(job: Job) -> dict[str, float]:
    from clip_benchmark.metrics import image_caption_selection

    metrics = image_caption_selection.evaluate(job.model, job.dataloader, job.tokenizer, device=job.device, amp=job.amp)
    if job.selection_extras:
        # a second pass over the same loader with the same arithmetic; clip-benchmark's numbers stay untouched
        scores = caption_selection_scores(job.model, job.dataloader, job.tokenizer, device=job.device, amp=job.amp)
        extra = selection_metrics(scores)
        if abs(extra.pop("text_acc_cb") - metrics["text_acc"]) > 1e-9:
            raise RuntimeError(f"{job.dataset}: tie-aware pass disagrees with clip-benchmark's text_acc (data order?)")
        metrics.update(extra)
    return metrics


def _linear_probe(job: Job) -> dict[str, float]:
    """clip-benchmark's linear probe (CUDA only, features cached under ``--feature_root``), as cli.run calls it."""
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
    from clip_benchmark.metrics import linear_probe

    opts = job.options

    def build(split: str) -> Any:
        return build_dataset(dataset_name=job.dataset, root=job.root, transform=job.transform, split=split,
                             annotation_file=opts.annotation_file, download=True)  # fmt: skip

    def loader(data: Any) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(data, batch_size=job.batch_size, shuffle=False, num_workers=job.workers,
                                           collate_fn=get_dataset_collate_fn(job.dataset), pin_memory=True)  # fmt: skip

    train, val = build(opts.train_split), None
    if opts.val_split is not None:
        val = build(opts.val_split)
    elif opts.val_proportion is not None:
        train, val = torch.utils.data.random_split(train, [1 - opts.val_proportion, opts.val_proportion])
    # linear_probe.evaluate calls the accuracy it imported by name, which raises under numpy >= 2.4
    with mock.patch.object(linear_probe, "accuracy", accuracy):
        return linear_probe.evaluate(
            job.model, loader(train), job.dataloader, opts.fewshot_k, job.batch_size, job.workers, opts.fewshot_lr,
            opts.fewshot_epochs, job.model_id, opts.seed, opts.feature_root, val_dataloader=loader(val) if val else None,
            device=job.device, normalize=True, amp=job.amp, verbose=job.verbose,
        )  # fmt: skip


TASKS: dict[str, Callable[[Job], dict[str, float]]] = {
    "zeroshot_classification": _zeroshot_classification,
    "zeroshot_retrieval": _zeroshot_retrieval,
    "image_caption_selection": _image_caption_selection,
    "linear_probe": _linear_probe,
    # ours: region-level suites and zero-shot segmentation (powerclip.evaluation.regions), reading job.root
    **REGION_TASKS,
}


# -------------------------------------------------------------------------------------- run_benchmark
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
    """Evaluate ``checkpoint`` on ``dataset`` as ``clip_benchmark eval`` would; write and return its output JSON.

    ``checkpoint``: one of our checkpoints, released OpenCLIP weights (then ``model_name`` is required), or
    an ``hf-hub:`` id. ``task``: a clip-benchmark task, or None/"auto" (a powerclip suite's ``meta.json``
    names its task; otherwise clip-benchmark's own inference). ``device``: auto/cpu/cuda. ``amp``: None = on
    for CUDA, off on CPU (CPU autocast would be bf16). ``extra_args``: further clip-benchmark ``eval`` options
    (:func:`parse_options`, e.g. ``["--dump_classnames"]``). With ``selection_extras``, image_caption_selection
    results also carry the tie-aware metrics.
    """
    from clip_benchmark.datasets.builder import get_dataset_default_task
    from clip_benchmark.models import load_clip

    checkpoint, dataset_root = str(checkpoint), str(dataset_root)
    options = parse_options(extra_args)
    device = resolve_device(device)
    amp = (device == "cuda") if amp is None else amp
    if task in (None, "auto"):
        task = suite_task(dataset, dataset_root) or get_dataset_default_task(_dataset_name(dataset))
    if task not in TASKS:
        raise ValueError(f"task must be one of {[*TASKS, 'auto']}, got {task!r}")
    if model_name is None:
        model_name = checkpoint_model_name(checkpoint)
        if model_name is None:
            raise ValueError(f"{checkpoint}: not a powerclip checkpoint; pass model_name (the architecture)")
    nshards = count_shards(dataset, dataset_root, split)
    workers = num_workers
    if nshards is not None and workers > nshards:
        log.info("num_workers %d > %d shard(s) of %s: using %d", workers, nshards, dataset, nshards)
        workers = nshards

    torch.manual_seed(options.seed)  # as cli.run does (linear_probe draws from it)
    register_loaders()
    model, transform, tokenizer = load_clip(model_type=MODEL_TYPE, model_name=model_name, pretrained=checkpoint,
                                            cache_dir=options.model_cache_dir, device=device)  # fmt: skip
    model.eval()
    root = str(_dataset_root(dataset, dataset_root))
    data, loader = (None, None) if task in REGION_TASKS else _test_data(dataset, root, transform, split, task,
                                                                           batch_size, workers, options)  # fmt: skip
    log.info("%s on %s (%s, %s, batch %d, %d workers, amp=%s)", checkpoint, dataset, task, device, batch_size,
             workers, amp)  # fmt: skip
    job = Job(dataset=dataset, root=root, model_id=f"{model_name}-{checkpoint}-{dataset}".replace("/", "_"),
              model=model, transform=transform, tokenizer=tokenizer, data=data, dataloader=loader, device=device,
              amp=amp, batch_size=batch_size, workers=workers, recall_k=[int(k) for k in recall_k], options=options,
              selection_extras=selection_extras, verbose=verbose)  # fmt: skip
    metrics = TASKS[task](job)

    dump = {"dataset": dataset, "model": model_name, "pretrained": checkpoint, "task": task, "metrics": metrics,
            "language": options.language}  # fmt: skip
    if options.dump_classnames and getattr(data, "classes", None):
        dump["classnames"] = data.classes
    if options.dump_templates and getattr(data, "templates", None):
        dump["templates"] = data.templates
    text = json.dumps(dump)  # as clip-benchmark writes it (NaN for acc5 with < 5 classes)
    with atomic_output(output_json) as tmp:
        tmp.write_text(text)
    result = json.loads(text)
    log.info("%s on %s (%s): %s -> %s", checkpoint, dataset, task, result["metrics"], output_json)
    return result


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m powerclip.evaluation.runner",
        description=__doc__.splitlines()[0],
        epilog="Further clip-benchmark eval options (e.g. --dump_classnames, --language) are passed on.",
    )
    p.add_argument("--checkpoint", required=True, help="our checkpoint, released OpenCLIP weights, or hf-hub:<repo>")
    p.add_argument("--dataset", required=True, help="clip-benchmark dataset, e.g. wds/shapes_cls")
    p.add_argument(
        "--dataset-root", required=True, help="dataset root (clip-benchmark template with {dataset} allowed)"
    )
    p.add_argument("--task", default="auto", choices=[*TASKS, "auto"])
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


__all__ = ["TASKS", "count_shards", "parse_options", "resolve_device", "run_benchmark", "suite_task"]

if __name__ == "__main__":
    main()
