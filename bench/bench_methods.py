"""Training step time of every method of the run table relative to clip: same model config, batches, threads.

    .venv/bin/python bench/bench_methods.py --root DEMO                       # tiny model, 64 px, batch 64
    .venv/bin/python bench/bench_methods.py --root DEMO224 --model ViT-B-16 --batch-size 8 --steps 3 --repeats 1
    .venv/bin/python bench/bench_methods.py --root .gpu-data --device cuda --model ViT-B-16 --batch-size 256

One row per seed-0 run of the run table (``--runs``, default config/runs.tsv: each method with its table
settings, e.g. clip-pgs at 0.5 and 0.3), plus schema defaults for a method of the registry the table lacks;
``--rows`` keeps some. Each is built as the trainer builds it (the method's own model, seed 0) and timed over
the same batches (the demo's shards with felzenszwalb regions on the model's grid: bench_train.demo_batches):
median seconds per step (forward, loss, backward, AdamW; bf16 autocast on CUDA), its ratio to the clip row,
and the fraction of patch tokens the method dropped (``mask_ratio``). A method whose batches need data the demo
shards lack is listed as not timed, with the reason. Anchor (CLIP-PGS, on GPUs): relative training time FLIP
0.5x, PGS-0.5 0.5x, PGS-0.3 0.6x of CLIP.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import demo_batches, step_options, timed_steps  # noqa: E402

from powerclip.methods import METHODS, method_class  # noqa: E402
from powerclip.settings import read_run_table  # noqa: E402
from powerclip.train import param_groups  # noqa: E402
from powerclip.train_params import SETTINGS, parse_args  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def method_rows(runs_path: str, only: list[str] | None) -> dict[str, dict]:
    """Seed-0 rows of the run table (one per setting), and ``{"method": m}`` for registry methods it lacks."""
    rows = {name: row for name, row in read_run_table(runs_path).items() if row["seed"] == 0}
    for method in METHODS:
        if not any(row["method"] == method for row in rows.values()):
            rows[f"{method} (defaults)"] = {"method": method}
    if only:
        unknown = sorted(set(only) - set(rows))
        if unknown:
            raise SystemExit(f"--rows {unknown} are not seed-0 rows of {runs_path}; it has {sorted(rows)}")
        rows = {name: rows[name] for name in only}
    return rows


def trainer_args(row: dict, model: str, batch_size: int):
    """The trainer's arguments for a run-table row (its columns through SETTINGS, the schema's defaults for
    the rest) on ``model``."""
    argv = ["--train-data", "x.tar", "--checkpoint", "c", "--work-dir", "w", "--model", model, "--epochs", "1",
            "--batch-size", str(batch_size), "--samples-per-epoch", str(batch_size), "--lr", "1e-4"]  # fmt: skip
    for setting in SETTINGS:
        if setting.section == "runs" and setting.key in row:
            value = row[setting.key]
            argv += [setting.option, str(value).lower() if isinstance(value, bool) else str(value)]
    return parse_args(argv)


class Timed:
    """One row's method, built as the trainer builds it, with its step times and mask ratios so far."""

    def __init__(self, row: dict, options) -> None:
        args = trainer_args(row, options.model, options.batch_size)
        cls = method_class(args.method)
        self.model = cls.build_model(args).to(options.device)
        self.method = cls.from_args(self.model, args)
        self.method.train()
        self.method.set_progress(0, 1)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, 0.2), lr=1e-4)
        self.device, self.times, self.ratios = options.device, [], []

    def loss_of(self, batch):
        out = self.method(batch)
        self.ratios.append(float(out.get("mask_ratio", 0.0)))
        return out["loss"]

    def run(self, batches) -> list[float]:
        return timed_steps(self.loss_of, self.model, batches, 1, self.device, self.optimizer)


def main(argv=None) -> dict:
    parser = step_options(__doc__.splitlines()[0], steps=10, repeats=2)
    parser.add_argument("--runs", default=str(REPO / "config" / "runs.tsv"), help="the run table whose rows are timed")
    parser.add_argument("--rows", nargs="+", help="only these rows (run names)")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    rows = method_rows(options.runs, options.rows)
    reference = next((name for name, row in rows.items() if row["method"] == "clip"), None)
    if reference is None:
        raise SystemExit("no clip row to compare with: keep one in --rows")
    probe = method_class("clip").build_model(trainer_args({"method": "clip"}, options.model, options.batch_size))
    batches = demo_batches(probe, options.root, options.shards, options.batch_size, options.steps)
    del probe
    results: dict[str, dict] = {}
    timed: dict[str, Timed] = {}
    for name, row in rows.items():  # build and warm up each; a method the batches do not fit is reported
        try:
            timed[name] = Timed(row, options)
            timed[name].run(batches[:1])
        except (KeyError, RuntimeError, ValueError, NotImplementedError) as exc:
            timed.pop(name, None)
            results[name] = {"not_timed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    for one in timed.values():
        one.ratios.clear()
    for _ in range(options.repeats):  # interleaved, so that a change of machine load hits every method alike
        for name, one in timed.items():
            if options.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            one.times += one.run(batches)
            if options.device.startswith("cuda"):  # what a step needs above every model's resident state
                results.setdefault(name, {})["peak_gb"] = (torch.cuda.max_memory_allocated() - resident) / 1e9
    for name, one in timed.items():
        results.setdefault(name, {}).update(
            s_per_step=statistics.median(one.times), fastest_s=min(one.times), mask_ratio=statistics.mean(one.ratios)
        )
    results = {name: results[name] for name in rows}
    base, fastest = results[reference]["s_per_step"], results[reference]["fastest_s"]
    where = torch.cuda.get_device_name() if options.device.startswith("cuda") else f"CPU, {options.threads} threads"
    print(f"{options.model}, batch {options.batch_size}, {where}, median of {options.steps} x {options.repeats} steps")
    memory = options.device.startswith("cuda")
    print("| run | method | s / step (median) | relative to clip | fastest step, relative | patch tokens dropped |"
          + (" step memory above the weights, GPU GB |" if memory else ""))  # fmt: skip
    print("|---|---|---|---|---|---|" + ("---|" if memory else ""))
    for name, result in results.items():
        method = rows[name]["method"]
        if "not_timed" in result:
            print(f"| {name} | {method} | not timed: {result['not_timed']} | | | |" + (" |" if memory else ""))
            continue
        result["relative"], result["relative_fastest"] = result["s_per_step"] / base, result["fastest_s"] / fastest
        line = (f"| {name} | {method} | {result['s_per_step']:.3f} | {result['relative']:.2f}x | "
                f"{result['relative_fastest']:.2f}x | {result['mask_ratio']:.2f} |")  # fmt: skip
        print(line + (f" {result['peak_gb']:.1f} |" if memory else ""))
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
