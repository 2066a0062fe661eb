"""Training cost of the region-phrase loss, and whether the data pipeline keeps up.

    .venv/bin/python bench/bench_train.py [--steps 30] [--batch-size 64]

Needs the demo's data (`make demo`, or `snakemake --cores 2 all`). Times full training steps (forward,
loss, backward, AdamW) of `clip` (lambda = 0) and `powerclip` (lambda = 0.1, top-5 regions, 16 phrases)
on the same tiny model, batches and threads; then the data loader's samples/s for the same batches.
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


def step_times(batches, sam_loss_ratio: float, model_name: str, repeats: int) -> list[float]:
    model = create_model(model_name, seed=0)
    optimizer = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4)
    loss_fn = PowerClipLoss(sam_loss_ratio=sam_loss_ratio, topk=5)
    times = []
    for _ in range(repeats):
        for batch in batches:
            start = time.perf_counter()
            out = forward_features(model, batch["image"], batch["text"])
            extra = {}
            if sam_loss_ratio > 0:
                r, rm = gather_mean(out["patch_tokens"], batch["region_index"], batch["region_cells"])
                p, pm = gather_mean(out["token_states"], batch["phrase_index"], batch["phrase_tokens"])
                extra = dict(region_features=F.normalize(r, dim=-1), region_mask=rm, phrase_features=F.normalize(p, dim=-1), phrase_mask=pm)
            losses = loss_fn(F.normalize(out["image_features"], dim=-1), F.normalize(out["text_features"], dim=-1),
                             out["logit_scale"], **extra, output_dict=True)  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="PowerCLIP-Tiny-64-8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs = workflow_shards("shapes", [f"{i:05d}" for i in range(4)], "felzenszwalb", root=args.root)
    cfg = DataConfig(image_size=64, topk=5, max_phrases=16)
    it = iter(make_loader(specs, cfg, args.batch_size, workers=0))
    batches = [next(it) for _ in range(args.steps)]
    results = {}
    for name, ratio in (("clip", 0.0), ("powerclip", 0.1)):
        step_times(batches[:3], ratio, args.model, 1)  # warm-up
        results[name] = statistics.median(step_times(batches, ratio, args.model, args.repeats))
    results["powerclip / clip"] = results["powerclip"] / results["clip"]
    consumption = args.batch_size / results["powerclip"]
    for workers in (0, 1, 2):
        loader = iter(make_loader(specs, cfg, args.batch_size, workers=workers))
        next(loader)  # start-up (worker spawn, first shard) is not throughput
        start = time.perf_counter()
        n = 0
        for _ in range(args.steps):
            n += len(next(loader)["key"])
        results[f"loader samples/s, {workers} workers"] = n / (time.perf_counter() - start)
    results["trainer consumption samples/s (powerclip)"] = consumption
    print(f"{args.model}, batch {args.batch_size}, {args.threads} threads, median of {args.steps} x {args.repeats} steps")
    print("| measure | value |")
    print("|---|---|")
    for key, value in results.items():
        unit = " s/step" if key in ("clip", "powerclip") else ""
        print(f"| {key} | {value:.3f}{unit} |" if value < 10 else f"| {key} | {value:.0f} |")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
