"""Source ``synthetic``: generate the shard with the embedded "shapes" generator (deterministic from the seed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from powerclip.shards import StageStats

if TYPE_CHECKING:
    from powerclip.fetch.registry import ShardJob


def fetch(job: ShardJob, stats: StageStats) -> None:
    """Write shard number ``job.index`` of the generator configured in ``datasets.<name>.synthetic``."""
    from powerclip.synthetic import ShapesConfig, write_shard

    opts = dict(job.dataset["synthetic"])
    samples, seed, split = opts.pop("samples_per_shard"), opts.pop("seed"), opts.pop("split", "train")
    index = job.need("index")
    stats.info["source"] = {"type": "synthetic", "seed": seed, "split": split, "shard_index": index}
    write_shard(job.out_tar, job.shard, index, samples, seed, ShapesConfig.from_dict(opts), split=split, stats=stats)
