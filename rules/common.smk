# Helpers, config validation and wildcard constraints. Rules live in the other files.
import hashlib
import re
import sys
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(
    0, workflow.basedir
)  # powerclip.datasets, .settings, .train_params: importable in Snakemake's own env

from powerclip.datasets import SHARD_NAME, shard_names
from powerclip.settings import MODEL_CONFIG_DIR, check_config, read_run_table
from powerclip.train_params import run_identity

# The schema fills in every default; then the cross-key checks (grid against the model, ...) and the run
# table, row by row: a bad value is refused here, before any job, naming the file, row and value.
validate(config, schema="../schemas/config.schema.yaml")
check_config(config)

DATASET = config["dataset"]
REGION_SOURCES = ("sam", "sam2", "felzenszwalb", "random")


def resolve_path(path):
    """A config path relative to the working directory, or else to the workflow's own directory."""
    if Path(path).is_absolute() or Path(path).exists():
        return path
    return str(Path(workflow.basedir) / path)


RUNS = read_run_table(resolve_path(config["runs"]), config)
_SHARDS = (
    {}
)  # filled on first use: a local dataset's files may not exist until a rule makes them


wildcard_constraints:
    dataset="|".join(map(re.escape, config["datasets"])),
    shard=SHARD_NAME.pattern.strip("^$"),
    source="|".join(REGION_SOURCES),
    run="|".join(map(re.escape, RUNS)),
    benchmark="|".join(map(re.escape, config["evaluation"]["benchmarks"])),
    checkpoint="|".join(map(re.escape, config.get("checkpoints", {})))
    or "no-checkpoint-is-configured",


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


def segment_options(source):
    """What a region source's jobs read (tracked as their params): its own options and the shared ones."""

    def options(wildcards):
        seg = config["segment"]
        name = source or wildcards.source
        return {
            "source": name,
            "options": seg[name],
            "max_regions": seg["max_regions"],
            "dedupe": seg["dedupe"],
        }

    return options


def get_run(wildcards):
    """A row of the run table, validated and completed with the schema's defaults."""
    return RUNS[wildcards.run]


def uses_sidecars(run):
    """Regions/phrases from the workflow's sidecars; `embedded` = inside combined-format shards."""
    return run["regions"] not in ("none", "embedded")


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


def train_identity(wildcards):
    """Everything that defines a run's result, tracked by Snakemake as the train rule's params: its row,
    the train: settings that change what is trained, and the content of our own model config (open_clip's
    built-in configs change only with its version, which the conda env pins)."""
    identity = run_identity(get_run(wildcards), config["train"])
    own = MODEL_CONFIG_DIR / f"{config['train']['model']}.json"
    identity["model_config_sha256"] = (
        hashlib.sha256(own.read_bytes()).hexdigest() if own.is_file() else None
    )
    return identity


def sidecar_dir(kind):
    """The phrases or regions sidecar folder of a run (None when its method reads no sidecars)."""

    def folder(wildcards):
        run = get_run(wildcards)
        if not uses_sidecars(run):
            return None
        if kind == "phrases":
            return f"results/{DATASET}/phrases"
        return f"results/{DATASET}/regions/{run['regions']}"

    return folder


def all_checkpoints():
    return expand("results/runs/{run}/checkpoint.pt", run=RUNS)


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
    return expand("results/runs/{run}/region_phrases.png", run=RUNS)


def segmenter_checkpoint(source):
    """The SAM/SAM2 checkpoint as an input: fetched by fetch_checkpoint when `checkpoints:` lists it."""

    def inputs(wildcards):
        path = config["segment"][source].get("checkpoint")
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
