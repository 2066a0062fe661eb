"""fetch_shard: produce one raw WebDataset shard from the dataset's configured source.

Sources (``datasets.<name>.source``):

* ``synthetic``: the embedded "shapes" generator (powerclip.synthetic), deterministic from the seed;
* ``local``: existing WebDataset tars (a directory, glob or brace pattern), validated and copied;
* ``img2dataset``: one part of a URL/caption TSV downloaded by img2dataset into one shard;
* ``huggingface``: one tar file of a dataset repository on the Hugging Face Hub (e.g. the
  pre-processed CC12M release), size- and checksum-verified.

Every source writes the shard atomically and a stats file (samples in / out / skipped by reason).
"""

from __future__ import annotations

import logging
from pathlib import Path

from powerclip.datasets import huggingface_filename, local_shards, shard_names
from powerclip.shards import StageStats

log = logging.getLogger(__name__)


def fetch_shard(dataset: dict, shard: str, out_tar, stats_path, parts_dir=None, threads: int = 1) -> dict:
    source = dataset["source"]
    stats = StageStats("fetch_shard", shard)
    # stats.info["source"] describes where the shard came from ({"type": <source>, ...}).
    if source == "synthetic":
        from powerclip.synthetic import ShapesConfig, write_shard

        opts = dict(dataset["synthetic"])
        samples, seed, split = opts.pop("samples_per_shard"), opts.pop("seed"), opts.pop("split", "train")
        index = shard_names(dataset).index(shard)
        stats.info["source"] = {"type": "synthetic", "seed": seed, "split": split, "shard_index": index}
        write_shard(out_tar, shard, index, samples, seed, ShapesConfig.from_dict(opts), split=split, stats=stats)
    elif source == "local":
        from powerclip.download import fetch_local_shard

        fetch_local_shard(local_shards(dataset["local"]["pattern"])[shard], out_tar, stats)
    elif source == "img2dataset":
        from powerclip.download import fetch_img2dataset_shard

        opts = {k: v for k, v in dataset["img2dataset"].items() if k in IMG2DATASET_SHARD_KEYS}
        opts.setdefault("processes", max(1, threads))
        fetch_img2dataset_shard(Path(parts_dir) / f"{shard}.tsv", out_tar, stats, shard_name=shard, **opts)
    elif source == "huggingface":
        from powerclip.download import fetch_huggingface_shard

        hf = dataset["huggingface"]
        fetch_huggingface_shard(
            hf["repo_id"],
            huggingface_filename(dataset, shard),
            out_tar,
            stats,
            revision=hf.get("revision", "main"),
            repo_type=hf.get("repo_type", "dataset"),
            endpoint=hf.get("endpoint"),
            cache_dir=hf.get("cache_dir"),
            retries=hf.get("retries", 3),
        )
    else:
        raise ValueError(f"unknown dataset source {source!r}")
    return stats.write(stats_path)


# Keys of `datasets.<name>.img2dataset` that configure one shard's download (the others split the TSV).
IMG2DATASET_SHARD_KEYS = (
    "image_size",
    "executable",
    "processes",
    "threads",
    "retries",
    "timeout",
    "resize_mode",
    "extra_args",
)
