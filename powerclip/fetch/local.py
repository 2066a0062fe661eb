"""Source ``local``: existing WebDataset tars on disk, validated and copied with their keys."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from powerclip.fetch.repackage import repackage_shard
from powerclip.shards import StageStats

if TYPE_CHECKING:
    from powerclip.fetch.registry import ShardJob


def fetch_local_shard(src: str | Path, out_tar: str | os.PathLike, stats: StageStats) -> None:
    """Validate and repackage one existing local tar (keys unchanged, unsafe ones dropped)."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(
            f"local shard {src} does not exist (shard {stats.shard!r}); check the local source pattern in the config "
            "or re-create the file"
        )
    stats.info.setdefault("source", {"type": "local", "path": str(src)})
    repackage_shard(src, out_tar, stats)


def fetch(job: ShardJob, stats: StageStats) -> None:
    """The shard's tar, ``job.src`` (found by the workflow from ``datasets.<name>.local.pattern``)."""
    fetch_local_shard(job.need("src"), job.out_tar, stats)
