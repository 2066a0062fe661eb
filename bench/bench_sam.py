"""Images/s of SAM / SAM 2 region extraction: the stock generator against the boxes-only one, same images.

    .venv/bin/python bench/bench_sam.py [--device cuda] [--images 16] [--sam vit_h] \
        [--sam2 configs/sam2.1/sam2.1_hiera_l.yaml] [--points-per-side 32] [--stock-points-per-batch 256] \
        [--points-per-batch 256 1024] [--image-batch-size 1 4] [--precision auto] [--compile] [--keep-all] \
        [--warmup 1] [--agreement-images 2] [--agreement-mask-threshold 0.1] [--json OUT]

Per model, one segmenter with random weights (no checkpoint can be downloaded here), switched between cases
with `reconfigure` so that every case runs the same weights on the same images (shapes images upscaled to
256 px, the size img2dataset stores CC12M at; both models resize to 1024 internally):

* agreement first: on `--agreement-images` images, `--agreement-points`^2 points, quality thresholds 0, mask
  threshold `--agreement-mask-threshold` (0.1 as in tests/test_sam.py: random weights then keep masks, and
  some are small), the stock generator in fp32 against the boxes-only one in fp32 and in `--precision`:
  `region_agreement`, the fraction of the top-32 regions (by area) whose boxes have IoU >= 0.9, rank by
  rank (the bar: >= 0.95), the same for areas within 2 %, and how many of the compared stock boxes are
  smaller than half the image (with random weights many masks cover the whole image);
* then the timing, at `--points-per-side` and the default thresholds (`--keep-all`: both at 0): the stock
  generator as the workflow ran it (`--stock-points-per-batch`; SAM fp32, SAM 2 bf16 autocast on CUDA), then
  the boxes-only one for every `--points-per-batch` x `--image-batch-size`, then (`--compile`) the best of
  those again with the image encoder compiled (last: compiling is one-way). Each case has one warm-up batch
  (`--warmup`: cudnn autotuning, compilation), then all images in batches through `segment_batch`, synchronised.
  Peak GPU memory is per case and includes the weights.

A random model keeps no mask at the default thresholds, so those timings are a lower bound for the stock
generator (no RLE work) and close to the real cost for the boxes-only one. Prints a Markdown table and a
JSON line (also written to `--json`).
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
from powerclip.sam_boxes import region_agreement  # noqa: E402
from powerclip.synthetic import ShapesConfig, ShapesGenerator  # noqa: E402

# What the agreement check runs (see the docstring); the bar is TOP_K / MIN_IOU / 95 %.
AGREEMENT = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
TOP_K, MIN_IOU = 32, 0.9


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_case(segmenter, images: list, device: str, warmup: int) -> dict:
    """``warmup`` batches first, then every image through segment_batch in batches of image_batch_size."""
    batch = segmenter.options["image_batch_size"]
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for chunk in chunks[:warmup]:
        segmenter.segment_batch(chunk)
    sync(device)
    warmup_s = time.perf_counter() - start
    regions = []
    start = time.perf_counter()
    for chunk in chunks:
        regions += segmenter.segment_batch(chunk)
    sync(device)
    total = time.perf_counter() - start
    row = {
        "warmup_s": warmup_s,
        "s_per_image": total / len(images),
        "images_per_s": len(images) / total,
        "mean_regions": statistics.mean(len(r) for r in regions),
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else float("nan"),
    }
    return row


def agreement(segmenter, images: list, args) -> dict:
    """Stock fp32 regions against the boxes-only ones (fp32, and `--precision` where that is bf16). With
    random weights the comparison says little where every box is the whole image: `small_boxes` is the
    fraction of the compared stock regions whose box covers less than half of the image."""
    segmenter.reconfigure(generator="stock", precision="fp32", image_batch_size=1,
                          points_per_batch=args.stock_points_per_batch, points_per_side=args.agreement_points,
                          mask_threshold=args.agreement_mask_threshold, **AGREEMENT)  # fmt: skip
    reference = segmenter.segment_batch(images)
    ranked = [sorted(r, key=lambda x: -x.area)[:TOP_K] for r in reference]
    out = {
        "regions_per_image": statistics.mean(len(r) for r in reference),
        "small_boxes": statistics.mean(
            sum(x.bbox[2] * x.bbox[3] < 0.5 * image.width * image.height for x in r) / max(len(r), 1)
            for r, image in zip(ranked, images, strict=True)
        ),
    }
    precision = args.precision
    for name in dict.fromkeys(["fp32", precision]):
        segmenter.reconfigure(generator="boxes", precision=name)
        if name != "fp32" and not segmenter.bf16:
            continue  # "auto" on the CPU is fp32: nothing new to compare
        found = segmenter.segment_batch(images)
        pairs = list(zip(reference, found, strict=True))
        out[f"boxes_{name}"] = statistics.mean(region_agreement(r, f, TOP_K, MIN_IOU) for r, f in pairs)
        out[f"areas_{name}"] = statistics.mean(area_agreement(r, f) for r, f in pairs)
    return out


def area_agreement(reference: list, found: list, rel: float = 0.02) -> float:
    """Fraction of the top-k ranks (by area) whose areas agree within ``rel``; a missing rank is a miss."""
    ref, got = ([r.area for r in sorted(x, key=lambda r: -r.area)[:TOP_K]] for x in (reference, found))
    ranks = max(len(ref), len(got))
    return sum(abs(a - b) <= rel * a for a, b in zip(ref, got, strict=False)) / ranks if ranks else 1.0


def bench_model(source: str, model: dict, images: list, agree_images: list, args, device: str) -> dict:
    start = time.perf_counter()
    segmenter = build_sam_segmenter(source, **model, device=device, allow_random_weights=True)
    result = {"build_s": time.perf_counter() - start}
    defaults = dict(segmenter.options)  # the model's default thresholds (the paper's)
    result["agreement"] = agreement(segmenter, agree_images, args)
    print(source, "agreement", json.dumps(result["agreement"]), flush=True)
    timing = {**defaults, "points_per_side": args.points_per_side}
    if args.keep_all:
        timing.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
    cases = [{"generator": "stock", "precision": "auto", "points_per_batch": args.stock_points_per_batch, "image_batch_size": 1}]
    cases += [
        {"generator": "boxes", "precision": args.precision, "points_per_batch": ppb, "image_batch_size": ibs}
        for ppb in args.points_per_batch
        for ibs in args.image_batch_size
    ]

    def run(case: dict) -> dict:
        segmenter.reconfigure(**{**timing, **case})
        row = {**case, "bf16": segmenter.bf16, **time_case(segmenter, images, device, args.warmup)}
        print(source, json.dumps(row), flush=True)
        return row

    rows = [run(case) for case in cases]
    if args.compile:  # last, as compiling is one-way: the fastest boxes-only case again
        fastest = max(rows[1:], key=lambda r: r["images_per_s"])
        rows.append(run({k: fastest[k] for k in cases[1]} | {"compile": True}))
    result["rows"] = rows
    return result


def table(name: str, result: dict) -> list[str]:
    stock = result["rows"][0]["images_per_s"]
    lines = []
    for r in result["rows"]:
        what = r["generator"] + (" + compile" if r.get("compile") else "")
        lines.append(
            f"| {name} | {what} | {'bf16' if r['bf16'] else 'fp32'} | {r['points_per_batch']} | {r['image_batch_size']} | "
            f"{r['s_per_image']:.3f} | {r['images_per_s']:.2f} | {r['images_per_s'] / stock:.1f}x | "
            f"{r['mean_regions']:.1f} | {r['peak_gpu_gb']:.1f} |"
        )
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=16, help="timed images per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first (cudnn autotuning, compilation)")
    parser.add_argument("--sam", default="vit_h", help="SAM model_type ('' to skip)")
    parser.add_argument("--sam2", default="configs/sam2.1/sam2.1_hiera_l.yaml", help="SAM 2 config ('' to skip)")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--stock-points-per-batch", type=int, default=256, help="the stock generator's (cc12m.yaml's)")
    parser.add_argument("--points-per-batch", type=int, nargs="+", default=[256, 1024], help="boxes-only cases")
    parser.add_argument("--image-batch-size", type=int, nargs="+", default=[1, 4], help="boxes-only cases")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="boxes-only cases")
    parser.add_argument("--compile", action="store_true", help="one more case: the fastest, image encoder compiled")
    parser.add_argument("--keep-all", action="store_true", help="timing with both thresholds 0: every mask is kept")
    parser.add_argument("--agreement-images", type=int, default=2)
    parser.add_argument("--agreement-points", type=int, default=8, help="points per side of the agreement check")
    parser.add_argument("--agreement-mask-threshold", type=float, default=0.1,
                        help="random weights give small logits: at 0 every box is the whole image")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gen = ShapesGenerator(ShapesConfig(), seed=5)
    images = [gen.sample(0, i)["image"].resize((256, 256)) for i in range(args.images)]
    agree_images = [gen.sample(1, i)["image"].resize((256, 256)) for i in range(args.agreement_images)]
    models = {}
    if args.sam:
        models[f"SAM {args.sam}"] = ("sam", {"model_type": args.sam})
    if args.sam2:
        models[f"SAM 2 {Path(args.sam2).stem}"] = ("sam2", {"config": args.sam2})
    results = {name: bench_model(source, model, images, agree_images, args, device) for name, (source, model) in models.items()}
    label = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    thresholds = "0 (all masks kept)" if args.keep_all else "default"
    print(f"\n{label}, torch {torch.__version__}, {args.points_per_side}x{args.points_per_side} points, "
          f"{args.images} images of 256 px (+{args.warmup} warm-up batch), thresholds {thresholds}, random weights")  # fmt: skip
    print("| model | generator | precision | points_per_batch | images / encoder pass | s / image | images/s | "
          "vs stock | regions / image | peak GPU memory (GB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        print("\n".join(table(name, result)))
    print(f"\nAgreement with the stock generator in fp32 ({args.agreement_points}x{args.agreement_points} points, "
          f"thresholds 0, mask threshold {args.agreement_mask_threshold}, {args.agreement_images} images): fraction "
          f"of the top-{TOP_K} regions, rank by rank in area order, with box IoU >= {MIN_IOU} (boxes; bar: 0.95) "
          "and with areas within 2 % (areas)")  # fmt: skip
    for name, result in results.items():
        a = result["agreement"]
        cells = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in a.items() if k.startswith(("boxes", "areas")))
        print(f"- {name}: {cells} ({a['regions_per_image']:.1f} stock regions / image, "
              f"{a['small_boxes']:.0%} of them under half the image)")  # fmt: skip
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
