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
from powerclip.evaluation.released import check_entry
from powerclip.evaluation.voc import VOC_DATASET
from powerclip.methods import METHODS
from powerclip.settings import (
    MODEL_CONFIG_DIR,
    RUN_NAME,
    ConfigError,
    check_config,
    load_schema,
    read_run_table,
)
from powerclip.train_params import run_identity

# The schema fills in every default; then the cross-key checks (grid against the model, ...) and the run
# table, row by row: a bad value is refused here, before any job, naming the file, row and value.
validate(config, schema="../schemas/config.schema.yaml")
check_config(config)

DATASET = config["dataset"]
# the region sources the schema allows (powerclip.regions.SEGMENTERS builds each)
REGION_SOURCES = load_schema("config")["properties"]["segment"]["properties"][
    "sources"
]["items"]["enum"]


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
    inputs.update(method_sidecar_inputs(run))
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
        # a sidecar a method names in the registry (MethodInfo.sidecars)
        if kind in SIDECAR_FOLDERS:
            return method_sidecar_dir(run, kind)
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
    if spec["dataset"] == VOC_DATASET:  # PASCAL VOC 2012, fetched by fetch_voc
        return f"resources/eval/{VOC_DATASET}"
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


# ------------------------------------------------- sidecars a method names (MethodInfo.sidecars), recaptions

# The folder of each kind of sidecar a method of the registry may read, per dataset.
SIDECAR_FOLDERS = {"recaptions": "results/{dataset}/recaptions"}


def method_sidecar_dir(run, kind):
    """The folder of a `kind` sidecar for a run, or None when its method does not read it."""
    if kind not in METHODS[run["method"]].sidecars:
        return None
    return SIDECAR_FOLDERS[kind].format(dataset=DATASET)


def method_sidecar_inputs(run):
    """The train job's inputs for the sidecars its method names: every shard's, and the recaptions' summary."""
    inputs = {}
    for kind in METHODS[run["method"]].sidecars:
        folder = method_sidecar_dir(run, kind)
        inputs[kind] = expand(f"{folder}/{{shard}}.tar", shard=get_shards(DATASET))
    if "recaptions" in inputs:
        inputs["recaptions_summary"] = f"results/{DATASET}/recaptions.summary.json"
    return inputs


def recaption_spec(dataset):
    """`datasets.<dataset>.recaptions` (its defaults filled in by the schema)."""
    spec = config["datasets"][dataset].get("recaptions")
    if spec is None:
        raise ConfigError(
            f"config: datasets.{dataset} has no recaptions: key; add one (source: synthetic or table)"
        )
    return spec


def recaption_table(dataset):
    spec = recaption_spec(dataset)
    if spec["source"] != "table":
        raise ConfigError(
            f"config: datasets.{dataset}.recaptions.source is {spec['source']!r}: it has no table to fetch"
        )
    return spec["table"]


def recaption_inputs(wildcards):
    """The raw shard, and for a table source the table's index."""
    inputs = {"shard": f"resources/{wildcards.dataset}/shards/{wildcards.shard}.tar"}
    if recaption_spec(wildcards.dataset)["source"] == "table":
        inputs["index"] = f"resources/{wildcards.dataset}/recaptions/table.sqlite"
    return inputs


def recaption_summary_inputs(wildcards):
    inputs = {
        "stats": expand(
            f"results/{wildcards.dataset}/recaptions/{{shard}}.stats.json",
            shard=get_shards(wildcards.dataset),
        )
    }
    if recaption_spec(wildcards.dataset)["source"] == "table":
        inputs["table_stats"] = (
            f"resources/{wildcards.dataset}/recaptions/table.stats.json"
        )
    return inputs


def check_method_sidecars():
    """Refuse, at parse time, a run whose method reads recaptions when the dataset has none configured."""
    for name, run in RUNS.items():
        if "recaptions" in METHODS[run["method"]].sidecars:
            if "recaptions" not in config["datasets"][DATASET]:
                raise ConfigError(
                    f"run {name!r} (method {run['method']}) trains on synthetic captions, but "
                    f"datasets.{DATASET} has no recaptions: key; add one (source: synthetic or table)"
                )


check_method_sidecars()


# ------------------------------------------- released checkpoints, evaluated like runs (rules/released.smk)

RELEASED = config["released"]
# results/<kind>/<name>/...: a run of the table or a released checkpoint
EVAL_KINDS = ("runs", "released")


def check_released():
    """Refuse, at parse time, a released entry the schema cannot judge (naming it and what to set)."""
    for name, spec in RELEASED.items():
        if not RUN_NAME.match(name):
            raise ConfigError(
                f"config: released.{name}: not a plain name (letters, digits, '_', '-', '.'); it names "
                "resources/released/<name> and results/released/<name>"
            )
        try:
            check_entry(name, spec)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


check_released()


def eval_names():
    """Wildcard constraint of `run` in the evaluation rules: the runs and the released entries."""
    return "|".join(map(re.escape, sorted(set(RUNS) | set(RELEASED))))


def eval_checkpoint(wildcards):
    """What eval_benchmark evaluates: a run's checkpoint, or a released checkpoint's folder."""
    table = RUNS if wildcards.kind == "runs" else RELEASED
    if wildcards.run not in table:
        raise ConfigError(
            f"{wildcards.run!r} is not in the {'run table' if wildcards.kind == 'runs' else 'released: section'}"
        )
    if wildcards.kind == "runs":
        return f"results/runs/{wildcards.run}/checkpoint.pt"
    return f"resources/released/{wildcards.run}"
