#!/usr/bin/env bash
# GPU check of SAM / SAM 2 region extraction, boxes-only against stock (BENCHMARKS.md, "SAM / SAM 2:
# boxes-only against stock"), in about 4-5 minutes on one GPU:
#
#   bash bench/gpu_sam.sh OUT_DIR
#
# Needs python3 with a CUDA torch. Where segment-anything, sam2 and their pure-Python dependencies (hydra-core,
# omegaconf, antlr4-python3-runtime, iopath, portalocker) are missing, put their wheels in .whl/ beside the
# checkout, as for bench/gpu_check.sh (sam2 built with SAM2_BUILD_CUDA=0). Each step has its own time limit
# and the next one runs after a failure; the outputs go to OUT_DIR.
#
# Goals (random weights, 32 x 32 points, 256 px images): SAM ViT-H boxes-only >= 5x the stock generator and
# >= 10 images/s on an H200; SAM 2.1 Hiera-L boxes-only >= 20 images/s; agreement with the stock regions
# >= 0.95 (box IoU >= 0.9, rank by rank in area order).
set -u
out=${1:?usage: bench/gpu_sam.sh OUT_DIR}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-sam .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site-sam
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 1. Both models: stock (points_per_batch 256, as config/cc12m.yaml) against boxes-only in bf16 with 256 / 1024
#    points per decoder batch and 1 / 4 images per encoder pass; agreement at 16 x 16 points first.
timeout 170 python3 bench/bench_sam.py --device cuda --images 16 --agreement-points 16 --json "$out/sam.json" >"$out/sam.txt" 2>&1
echo "== boxes vs stock: exit $?"
grep -v "^{" "$out/sam.txt" | tail -n 20

# 2. SAM ViT-H, the image encoder compiled (torch.compile; compilation happens in the warm-up batch).
timeout 150 python3 bench/bench_sam.py --device cuda --images 16 --sam2 '' --points-per-batch 1024 \
    --image-batch-size 4 --agreement-images 1 --compile --json "$out/sam_compile.json" >"$out/sam_compile.txt" 2>&1
echo "== compile: exit $?"
grep -v "^{" "$out/sam_compile.txt" | tail -n 12
