"""Time SAM / SAM 2 automatic mask generation per image, as `segment_shard_sam{,2}` runs it.

    .venv/bin/python bench/bench_sam.py [--device cuda] [--images 8] [--sam vit_h] \
        [--sam2 configs/sam2.1/sam2.1_hiera_l.yaml] [--points-per-side 32] [--keep-all]

Builds each segmenter through `powerclip.sam.build_sam_segmenter` with randomly initialised weights (no
checkpoint can be downloaded here), so the masks are meaningless: at SAM's default thresholds a random
model keeps no mask, which skips the post-processing of kept masks. `--keep-all` sets both thresholds to
0 so that every predicted mask is kept (the worst case for post-processing: 3 masks per point before
NMS). Images are shapes images upscaled to 256 px, the size img2dataset stores CC12M at; both models
resize to 1024 internally, so the content does not change the cost of the image encoder.
Prints a Markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from powerclip.sam import build_sam_segmenter  # noqa: E402
from powerclip.synthetic import ShapesConfig, ShapesGenerator  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_segmenter(source: str, options: dict, images: list, device: str) -> dict:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    segmenter = build_sam_segmenter(source, device=device, allow_random_weights=True, **options)
    build_s = time.perf_counter() - start
    segmenter(images[0])  # warm-up: cudnn autotuning, lazy CUDA init
    sync(device)
    times, regions = [], []
    for image in images[1:]:
        start = time.perf_counter()
        regions.append(len(segmenter(image)))
        sync(device)
        times.append(time.perf_counter() - start)
    row = {
        "build_s": build_s,
        "median_s_per_image": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "images_per_s": 1.0 / statistics.median(times),
        "mean_regions": statistics.mean(regions),
    }
    if device.startswith("cuda"):
        row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del segmenter
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=8, help="timed images (one more is a warm-up)")
    parser.add_argument("--sam", default="vit_h", help="SAM model_type ('' to skip)")
    parser.add_argument("--sam2", default="configs/sam2.1/sam2.1_hiera_l.yaml", help="SAM 2 config ('' to skip)")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--points-per-batch", type=int, nargs="+", default=[64])
    parser.add_argument("--keep-all", action="store_true", help="thresholds 0: every mask is kept")
    args = parser.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gen = ShapesGenerator(ShapesConfig(), seed=5)
    images = [gen.sample(0, i)["image"].resize((256, 256)) for i in range(args.images + 1)]
    thresholds = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0} if args.keep_all else {}
    cases = {}
    for ppb in args.points_per_batch:
        common = {"points_per_side": args.points_per_side, "points_per_batch": ppb, **thresholds}
        if args.sam:
            cases[f"SAM {args.sam}, points_per_batch {ppb}"] = ("sam", {"model_type": args.sam, **common})
        if args.sam2:
            name = Path(args.sam2).stem
            cases[f"SAM 2 {name}, points_per_batch {ppb}"] = ("sam2", {"config": args.sam2, **common})
    results = {}
    for name, (source, options) in cases.items():
        results[name] = time_segmenter(source, options, images, device)
        print(name, json.dumps(results[name]), flush=True)
    label = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"\n{label}, {args.points_per_side}x{args.points_per_side} points, {args.images} images (+1 warm-up), "
          f"thresholds {'0 (all masks kept)' if args.keep_all else 'default'}")  # fmt: skip
    print("| model | build (s) | s / image (median) | images/s | regions / image | peak GPU memory (GB) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['build_s']:.1f} | {r['median_s_per_image']:.3f} | {r['images_per_s']:.2f} | "
              f"{r['mean_regions']:.1f} | {r.get('peak_gpu_gb', float('nan')):.1f} |")  # fmt: skip
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
