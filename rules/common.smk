# Helpers, config validation and wildcard constraints. Rules live in the other files.
import shlex
import sys
from pathlib import Path

import pandas as pd
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

sys.path.insert(
    0, workflow.basedir
)  # powerclip.datasets: stdlib only, importable in any env

from powerclip.datasets import SHARD_NAME, SOURCES, shard_names

validate(config, schema="../schemas/config.schema.yaml")

DATASET = config["dataset"]
if DATASET not in config["datasets"]:
    raise ValueError(
        f"config: dataset {DATASET!r} is not one of datasets: {sorted(config['datasets'])}"
    )
if "pictures" in config and config["pictures"]["dataset"] not in config["datasets"]:
    raise ValueError(
        f"config: pictures.dataset {config['pictures']['dataset']!r} is not one of datasets: "
        f"{sorted(config['datasets'])}"
    )
REGION_SOURCES = ("sam", "sam2", "felzenszwalb", "random")


def resolve_path(path):
    """A config path relative to the working directory, or else to the workflow's own directory."""
    if Path(path).is_absolute() or Path(path).exists():
        return path
    return str(Path(workflow.basedir) / path)


runs = pd.read_csv(
    resolve_path(config["runs"]), sep="\t", comment="#", dtype={"run": str}
).set_index("run", drop=False)
validate(runs, schema="../schemas/runs.schema.yaml")
for _run in runs.itertuples():
    if _run.method == "clip" and (_run.sam_loss_ratio != 0 or _run.regions != "none"):
        raise ValueError(
            f"{config['runs']}: run {_run.run!r}: method clip needs sam_loss_ratio 0 and regions none"
        )
    if _run.method == "powerclip" and (
        _run.sam_loss_ratio <= 0 or _run.regions == "none"
    ):
        raise ValueError(
            f"{config['runs']}: run {_run.run!r}: method powerclip needs sam_loss_ratio > 0 and a region source"
        )
if runs.index.duplicated().any():
    raise ValueError(
        f"{config['runs']}: duplicate run names {sorted(runs.index[runs.index.duplicated()])}"
    )
_SHARDS = (
    {}
)  # filled on first use: a local dataset's files may not exist until a rule makes them


wildcard_constraints:
    dataset="|".join(config["datasets"]),
    shard=SHARD_NAME.pattern.strip("^$"),
    source="|".join(REGION_SOURCES),
    run="|".join(runs.index),
    benchmark="|".join(config["evaluation"]["benchmarks"]),
    checkpoint="|".join(config.get("checkpoints", {})) or "no-checkpoint-is-configured",


def get_dataset(wildcards):
    return config["datasets"][wildcards.dataset]


def get_shards(dataset=DATASET):
    if dataset not in _SHARDS:
        _SHARDS[dataset] = shard_names(config["datasets"][dataset])
    return _SHARDS[dataset]


def fetch_inputs(wildcards):
    """What a raw shard is made from: a local tar, or the URL-list part for img2dataset."""
    spec = get_dataset(wildcards)
    if spec["source"] == "local":
        from powerclip.datasets import local_shards

        return {"src": local_shards(spec["local"]["pattern"])[wildcards.shard]}
    if spec["source"] == "img2dataset":
        return {"parts": f"resources/{wildcards.dataset}/parts"}
    return {}


def all_phrase_sidecars(dataset=DATASET):
    return expand(f"results/{dataset}/phrases/{{shard}}.tar", shard=get_shards(dataset))


def all_region_sidecars(dataset=DATASET, sources=None):
    return expand(
        f"results/{dataset}/regions/{{source}}/{{shard}}.tar",
        source=sources or config["segment"]["sources"],
        shard=get_shards(dataset),
    )


def segment_options(wildcards):
    return config["segment"].get(wildcards.source, {})


def sam_gpus(wildcards=None):
    return config["segment"].get("gpus", 1)


def get_run(wildcards):
    """A row of the run table as plain Python values (numpy scalars would make params reruns flaky)."""
    return {
        k: (v.item() if hasattr(v, "item") else v)
        for k, v in runs.loc[wildcards.run].items()
    }


def uses_sidecars(run):
    """Regions/phrases from the workflow's sidecars; `embedded` = inside combined-format shards."""
    return run["sam_loss_ratio"] > 0 and run["regions"] != "embedded"


def train_inputs(wildcards):
    run = get_run(wildcards)
    shards = get_shards(DATASET)
    inputs = {
        "shards": expand(f"resources/{DATASET}/shards/{{shard}}.tar", shard=shards)
    }
    if uses_sidecars(run):
        inputs["phrases"] = expand(
            f"results/{DATASET}/phrases/{{shard}}.tar", shard=shards
        )
        inputs["regions"] = expand(
            f"results/{DATASET}/regions/{run['regions']}/{{shard}}.tar", shard=shards
        )
    return inputs


def python_command():
    """`python` inside a conda env; outside one, the interpreter running Snakemake (no `python` on PATH)."""
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
        return "python"
    return sys.executable


def train_launcher(wildcards):
    gpus = config["train"].get("gpus", 0)
    if gpus > 0:
        return f"torchrun --standalone --nnodes=1 --nproc-per-node={gpus}"
    return python_command()


def train_args(wildcards, output):
    """Command-line arguments of `python -m powerclip.train` for one run of the table."""
    run, train = get_run(wildcards), config["train"]
    shards = get_shards(DATASET)
    pattern = (
        f"resources/{DATASET}/shards/{{{','.join(shards)}}}.tar"
        if len(shards) > 1
        else f"resources/{DATASET}/shards/{shards[0]}.tar"
    )
    gpus = max(train.get("gpus", 0), 1)
    if train["batch_size"] % gpus:
        raise ValueError(
            f"train.batch_size {train['batch_size']} is not divisible by train.gpus {gpus}"
        )
    args = [
        "--train-data", pattern,
        "--samples-per-epoch", train["samples_per_epoch"],
        "--epochs", train["epochs"],
        "--batch-size", train["batch_size"] // gpus,
        "--workers", train.get("workers", 1),
        "--model", train["model"],
        "--vision-pool", run["vision_pool"],
        "--text-pool", run["text_pool"],
        "--lr", train["lr"],
        "--wd", train.get("weight_decay", 0.2),
        "--warmup", train.get("warmup_steps", 10),
        "--precision", train.get("precision", "auto"),
        "--seed", run["seed"],
        "--threads", train.get("threads", 1),
        "--max-phrases", train.get("max_phrases", 16),
        "--sam-loss-ratio", run["sam_loss_ratio"],
        "--sam-regions-topk", run["topk"],
        "--sam-regions-topk-random", run["topk_random"],
        "--use-parse-phrases", run["use_parse_phrases"],
        "--softplus-scoring", run["softplus_scoring"],
        "--softplus-tau", run["softplus_tau"],
        "--softplus-alpha", run["softplus_alpha"],
        "--save-every", train.get("save_every_steps", 100),
        "--log-every", train.get("log_every_steps", 10),
        "--checkpoint", output.checkpoint,
        "--metrics", output.metrics,
        "--work-dir", f"results/runs/{wildcards.run}/work",
    ]  # fmt: skip
    if uses_sidecars(run):
        args += [
            "--phrases-dir",
            f"results/{DATASET}/phrases",
            "--regions-dir",
            f"results/{DATASET}/regions/{run['regions']}",
        ]
    if train.get("grad_checkpointing"):
        args.append("--grad-checkpointing")
    if train.get("tensorboard"):
        args.append("--tensorboard")
    if train.get("gpus", 0) > 1:
        args.append("--gather-with-grad")
    return " ".join(shlex.quote(str(a)) for a in args)


def all_checkpoints():
    return expand("results/runs/{run}/checkpoint.pt", run=runs.index)


def picture_inputs(wildcards):
    """The first shard of `pictures.dataset` with its phrases and `pictures.regions` regions."""
    spec = config["pictures"]
    dataset = spec["dataset"]
    shard = get_shards(dataset)[0]
    return {
        "raw": f"resources/{dataset}/shards/{shard}.tar",
        "phrases": f"results/{dataset}/phrases/{shard}.tar",
        "regions": f"results/{dataset}/regions/{spec['regions']}/{shard}.tar",
    }


def all_pictures():
    """Region-phrase pictures of every run, when the config asks for them (`pictures:`)."""
    if "pictures" not in config:
        return []
    return expand("results/runs/{run}/region_phrases.png", run=runs.index)


def segmenter_checkpoint(source):
    """The SAM/SAM2 checkpoint as an input: fetched by fetch_checkpoint when `checkpoints:` lists it."""

    def inputs(wildcards):
        path = config["segment"].get(source, {}).get("checkpoint")
        return {"checkpoint": path} if path else {}

    return inputs


def local_suites(wildcards=None):
    """Benchmarks that are local suites written by write_eval_suites (`suite:` key)."""
    return [
        b["suite"] for b in config["evaluation"]["benchmarks"].values() if "suite" in b
    ]


SUGAR_CREPE = "sugar_crepe/"  # clip-benchmark's prefix: sugar_crepe/<task> reads val2017/ and <task>.json


def sugar_crepe_task(spec):
    """The SugarCrepe task of a benchmark (`dataset: sugar_crepe/<task>`), or None."""
    if spec["dataset"].startswith(SUGAR_CREPE):
        return spec["dataset"][len(SUGAR_CREPE) :]
    return None


def eval_root(wildcards):
    spec = config["evaluation"]["benchmarks"][wildcards.benchmark]
    if "suite" in spec:
        return f"resources/eval/{DATASET}/{spec['suite']}"
    if "root" in spec:
        return spec["root"]
    if sugar_crepe_task(spec):
        return "resources/eval/sugar_crepe"
    return f"resources/eval/wds/{wildcards.benchmark}"


def eval_inputs(wildcards):
    spec = config["evaluation"]["benchmarks"][wildcards.benchmark]
    if "suite" in spec:
        return {"suites": f"resources/eval/{DATASET}"}
    task = sugar_crepe_task(spec)
    if task and "root" not in spec:
        return {
            "images": "resources/eval/sugar_crepe/val2017",
            "annotations": f"resources/eval/sugar_crepe/{task}.json",
        }
    return {"root": eval_root(wildcards)}
