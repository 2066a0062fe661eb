"""Training cost of the region-phrase loss, and whether the data pipeline keeps up.

    .venv/bin/python bench/bench_train.py [--steps 30] [--batch-size 64] [--device cuda --model ViT-B-16]

Needs the demo's data (`make demo`, or `snakemake --cores 2 all`) under --root, its regions mapped onto the
model's patch grid. Times full training steps (forward, loss, backward, AdamW; bf16 autocast on CUDA, as
the trainer) of `clip` (lambda = 0) and `powerclip` (lambda = 0.1, top-5 regions, 16 phrases) on the same
model, batches and threads; then the data loader's samples/s for the same batches.
Goals: powerclip step <= 1.10x clip step; loader >= 2x the trainer's consumption.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from powerclip.data import DataConfig, make_loader, workflow_shards  # noqa: E402
from powerclip.loss import PowerClipLoss  # noqa: E402
from powerclip.model import create_model, forward_features, gather_mean  # noqa: E402
from powerclip.train import param_groups  # noqa: E402


def autocast_for(device: str):
    """bf16 autocast on CUDA, as the trainer; nothing on the CPU."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def demo_batches(model, root: str, shards: int, batch_size: int, steps: int) -> list[dict]:
    """``steps`` batches of the demo's shards 00000.. under ``root`` (workflow layout, felzenszwalb regions
    on ``model``'s patch grid: top-5 regions, 16 phrases), for every method to be timed on the same data."""
    names = [f"{i:05d}" for i in range(shards)]
    specs = workflow_shards("shapes", names, "felzenszwalb", root=root)
    missing = [p for s in specs for p in (s.raw, s.phrases, s.regions) if not Path(p).exists()]
    if missing:
        raise SystemExit(
            f"missing demo data {missing[:3]}: make it with `snakemake --cores 2 --directory {root} ... "
            "results/shapes/regions/felzenszwalb/00000.tar results/shapes/phrases/00000.tar` (on the model's grid; "
            "see bench/gpu_check.sh)"
        )
    visual = model.visual
    size, patch = (v[0] if isinstance(v, (tuple, list)) else v for v in (visual.image_size, visual.patch_size))
    cfg = DataConfig(image_size=size, patch_size=patch, topk=5, max_phrases=16)
    it = iter(make_loader(specs, cfg, batch_size, workers=0))
    return [next(it) for _ in range(steps)]


def timed_steps(loss_of, model, batches, repeats: int, device: str = "cpu", optimizer=None) -> list[float]:
    """Seconds per full training step (forward and loss ``loss_of(batch)``, backward, AdamW: ``optimizer``
    or a new one), each batch ``repeats`` times, under the trainer's autocast; the first call of a fresh
    model should be a warm-up."""
    autocast = autocast_for(device)
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    optimizer = optimizer or torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4)
    times = []
    for _ in range(repeats):
        for batch in batches:
            start = time.perf_counter()
            with autocast:
                loss = loss_of(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return times


def step_times(batches, sam_loss_ratio: float, model_name: str, repeats: int, device: str = "cpu") -> list[float]:
    model = create_model(model_name, seed=0).to(device)
    loss_fn = PowerClipLoss(sam_loss_ratio=sam_loss_ratio, topk=5)

    def loss_of(batch):
        out = forward_features(model, batch["image"], batch["text"])
        extra = {}
        if sam_loss_ratio > 0:
            r, rm = gather_mean(out["patch_tokens"], batch["region_index"], batch["region_cells"])
            p, pm = gather_mean(out["token_states"], batch["phrase_index"], batch["phrase_tokens"])
            extra = dict(region_features=F.normalize(r, dim=-1), region_mask=rm, phrase_features=F.normalize(p, dim=-1), phrase_mask=pm)
        return loss_fn(F.normalize(out["image_features"], dim=-1), F.normalize(out["text_features"], dim=-1),
                       out["logit_scale"], **extra)  # fmt: skip

    return timed_steps(loss_of, model, batches, repeats, device)


def step_options(description: str, steps: int, repeats: int) -> argparse.ArgumentParser:
    """The options of the step benchmarks (this one and bench_methods.py): data, model, device, repeats."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="batches timed")
    parser.add_argument("--repeats", type=int, default=repeats, help="passes over the batches")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="PowerCLIP-Tiny-64-8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default=".", help="the workflow's folder holding the demo data")
    parser.add_argument("--shards", type=int, default=4, help="demo shards 00000.. to read")
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv=None) -> dict:
    parser = step_options(__doc__.splitlines()[0], steps=20, repeats=3)
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = workflow_shards("shapes", [f"{i:05d}" for i in range(args.shards)], "felzenszwalb", root=args.root)
    model = create_model(args.model, seed=0)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    cfg = DataConfig(image_size=image_size, topk=5, max_phrases=16)
    batches = demo_batches(model, args.root, args.shards, args.batch_size, args.steps)
    results = {}
    for name, ratio in (("clip", 0.0), ("powerclip", 0.1)):
        step_times(batches[:3], ratio, args.model, 1, args.device)  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        results[name] = statistics.median(step_times(batches, ratio, args.model, args.repeats, args.device))
        if args.device.startswith("cuda"):
            results[f"peak GPU memory GB ({name})"] = torch.cuda.max_memory_allocated() / 1e9
    results["powerclip / clip"] = results["powerclip"] / results["clip"]
    consumption = args.batch_size / results["powerclip"]
    for workers in args.loader_workers:
        loader = iter(make_loader(specs, cfg, args.batch_size, workers=workers))
        next(loader)  # start-up (worker spawn, first shard) is not throughput
        start = time.perf_counter()
        n = 0
        for _ in range(args.steps):
            n += len(next(loader)["key"])
        results[f"loader samples/s, {workers} workers"] = n / (time.perf_counter() - start)
    results["trainer consumption samples/s (powerclip)"] = consumption
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"{args.model} ({image_size} px), batch {args.batch_size}, {where}, median of {args.steps} x {args.repeats} steps")
    print("| measure | value |")
    print("|---|---|")
    for key, value in results.items():
        unit = " s/step" if key in ("clip", "powerclip") else ""
        print(f"| {key} | {value:.3f}{unit} |" if value < 10 else f"| {key} | {value:.0f} |")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
