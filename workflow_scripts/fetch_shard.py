# Thin glue for rule fetch_shard: see powerclip.fetch.registry.fetch_shard.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.fetch.registry import fetch_shard
from powerclip.logs import log_to_file

log_to_file(snakemake.log[0], rule=snakemake.rule)
fetch_shard(
    snakemake.params.dataset,
    snakemake.wildcards.shard,
    out_tar=snakemake.output.shard,
    stats_path=snakemake.output.stats,
    index=snakemake.params.index,
    src=snakemake.input.get("src"),
    parts_dir=snakemake.input.get("parts"),
    filename=snakemake.params.filename,
    threads=snakemake.threads,
)
