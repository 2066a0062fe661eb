"""Segmentation throughput of the classical region sources (images/s on one core).

    .venv/bin/python bench/bench_segment.py [--images 300] [--repeats 3]

Times the segmenter plus the box -> patch-cell mapping, on shapes images at 64 px (the demo) and the
same images upscaled to 256 px (the size img2dataset stores CC12M at).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from powerclip.regions import FelzenszwalbSegmenter, PatchGrid, RandomBoxSegmenter, regions_to_cells  # noqa: E402
from powerclip.synthetic import ShapesConfig, ShapesGenerator  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    gen = ShapesGenerator(ShapesConfig(), seed=5)
    small = [gen.sample(0, i)["image"] for i in range(args.images)]
    large = [im.resize((256, 256)) for im in small]
    cases = {
        "felzenszwalb 64 px (demo settings)": (FelzenszwalbSegmenter(500, 0.5, 30), small, PatchGrid(64, 8)),
        "felzenszwalb 256 px (scale 500, min_size 480)": (FelzenszwalbSegmenter(500, 0.5, 480), large, PatchGrid(224, 16)),
        "random boxes 64 px": (RandomBoxSegmenter(), small, PatchGrid(64, 8)),
    }
    results = {}
    for name, (seg, images, grid) in cases.items():
        takes_key = isinstance(seg, RandomBoxSegmenter)

        def run():
            for i, image in enumerate(images):
                regions = seg(image, str(i)) if takes_key else seg(image)
                regions_to_cells(regions, grid, *image.size)

        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        results[name] = len(images) / statistics.median(times)
    print(f"{args.images} images, median of {args.repeats}")
    print("| source | images/s |")
    print("|---|---|")
    for name, rate in results.items():
        print(f"| {name} | {rate:.0f} |")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
