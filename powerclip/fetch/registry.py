"""The sources of raw shards by name, and :func:`fetch_shard`, which runs one of them for one shard.

Each source module exposes ``fetch(job, stats)``: :class:`ShardJob` carries what the workflow already
knows about the shard (its index, its local file, its URL-list part, its file in a Hub repo), so no job
recomputes the dataset's shard list. A new source is one module and one entry in :data:`SOURCES`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from powerclip.fetch import huggingface, img2dataset, local, synthetic
from powerclip.shards import StageStats


@dataclass(frozen=True)
class ShardJob:
    """One shard to fetch: the ``datasets.<name>`` entry of the config and what the DAG knows of the shard."""

    dataset: dict
    shard: str
    out_tar: Path
    index: int | None = None  # position in the dataset's shard list (synthetic: which shard to generate)
    src: Path | None = None  # the existing tar (local)
    part: Path | None = None  # this shard's URL-list part (img2dataset)
    filename: str | None = None  # the file in the Hub repository (huggingface)
    threads: int = 1

    def need(self, field: str) -> object:
        """The value of ``field``, or a ValueError naming the shard and the source that needs it."""
        value = getattr(self, field)
        if value is None:
            raise ValueError(
                f"shard {self.shard!r}: source {self.dataset.get('source')!r} needs {field!r}, which was not given "
                "(the rule fetch_shard passes it as a param or input)"
            )
        return value


SOURCES: dict[str, Callable[[ShardJob, StageStats], None]] = {
    "synthetic": synthetic.fetch,
    "local": local.fetch,
    "img2dataset": img2dataset.fetch,
    "huggingface": huggingface.fetch,
}


def fetch_shard(
    dataset: dict,
    shard: str,
    out_tar: str | os.PathLike,
    stats_path: str | os.PathLike,
    *,
    index: int | None = None,
    src: str | os.PathLike | None = None,
    parts_dir: str | os.PathLike | None = None,
    filename: str | None = None,
    threads: int = 1,
) -> dict:
    """Fetch one shard with its dataset's source and write ``stats_path``; returns the stats as a dict.

    ``stats["info"]["source"]`` describes where the shard came from (``{"type": <source>, ...}``).
    """
    source = dataset["source"]
    if source not in SOURCES:
        raise ValueError(f"unknown dataset source {source!r}; choose from {sorted(SOURCES)}")
    job = ShardJob(
        dataset=dataset,
        shard=shard,
        out_tar=Path(out_tar),
        index=index,
        src=Path(src) if src is not None else None,
        part=Path(parts_dir) / f"{shard}.tsv" if parts_dir is not None else None,
        filename=filename,
        threads=threads,
    )
    stats = StageStats("fetch_shard", shard)
    SOURCES[source](job, stats)
    return stats.write(stats_path)
