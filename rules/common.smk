# Helpers, config validation and wildcard constraints. Rules live in the other files.
import sys
from pathlib import Path

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
REGION_SOURCES = ("sam", "sam2", "felzenszwalb", "random")
_SHARDS = (
    {}
)  # filled on first use: a local dataset's files may not exist until a rule makes them


wildcard_constraints:
    dataset="|".join(config["datasets"]),
    shard=SHARD_NAME.pattern.strip("^$"),
    source="|".join(REGION_SOURCES),


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
