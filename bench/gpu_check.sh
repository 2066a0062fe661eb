#!/usr/bin/env bash
# GPU measurements for BENCHMARKS.md, run in one go on a lent GPU machine (see BENCHMARKS.md, "On a GPU").
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Expects, beside the checkout: the Python wheels this package needs that the machine lacks in .whl/
# (open_clip_torch, webdataset, segment-anything, sam2 built with SAM2_BUILD_CUDA=0, and their pure-Python
# dependencies), and two demo shards with their phrases and felzenszwalb regions on the 224/16 grid in
# .gpu-data/ (the workflow's layout: resources/shapes/shards, results/shapes/{phrases,regions/felzenszwalb}).
# To make them, run the data stages with the grid overlaid (a YAML file holding
# `grid: {image_size: 224, patch_size: 16, min_overlap: 0.5}`), e.g.
#   .venv/bin/snakemake --cores 2 --directory /tmp/gpudata --configfile config/config.yaml grid224.yaml -- \
#       results/shapes/phrases/0000{0,1}.tar results/shapes/regions/felzenszwalb/0000{0,1}.tar
# and copy resources/ and results/ from /tmp/gpudata into .gpu-data/; the wheels come from
#   pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl NAME==VERSION
#   SAM2_BUILD_CUDA=0 pip wheel --no-deps --no-build-isolation -w .whl sam2==1.1.0
# Each step has its own time limit and goes on after a failure; everything is written to OUT_DIR.
set -u
out=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, keep its output, report its exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s"
    tail -n 12 "$out/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, open_clip, sam2, segment_anything, webdataset; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available())"

# 1. One training step of ViT-B-16 at 224 px, batch 256, bf16: clip vs powerclip, and the loader's rate.
step train_step 120 python3 bench/bench_train.py --device cuda --model ViT-B-16 --batch-size 256 \
    --steps 10 --repeats 2 --shards 2 --root .gpu-data --threads 8 --loader-workers 0 4 8

# 2. The real trainer through torchrun (one rank), clip then powerclip, every step logged.
data=(--train-data '.gpu-data/resources/shapes/shards/{00000,00001}.tar'
    --phrases-dir .gpu-data/results/shapes/phrases --regions-dir .gpu-data/results/shapes/regions/felzenszwalb
    --samples-per-epoch 15360 --epochs 1 --batch-size 256 --workers 8 --model ViT-B-16 --lr 5e-4 --warmup 10
    --log-every 1 --save-every 1000000)
for run in clip:0 powerclip:0.1; do
    name=${run%%:*}
    step "trainer_$name" 90 torchrun --standalone --nnodes=1 --nproc-per-node=1 -m powerclip.train "${data[@]}" \
        --method "$name" --sam-loss-ratio "${run#*:}" --checkpoint "/tmp/$name/checkpoint.pt" \
        --metrics "$out/metrics_$name.csv" --work-dir "/tmp/$name/work"
done

# 3. Step time of every seed-0 method of the run table relative to clip (ViT-B-16, batch 256, bf16).
step methods 150 python3 bench/bench_methods.py --device cuda --model ViT-B-16 --batch-size 256 --root .gpu-data \
    --shards 2 --threads 8 --steps 10 --repeats 2

# 4. SAM ViT-H and SAM 2.1 Hiera-L: the stock generator against the boxes-only path (same images and weights).
step sam 330 bash bench/gpu_sam.sh "$out/sam"
