# Thin glue for rules segment_shard, segment_shard_sam, segment_shard_sam2: see powerclip.regions.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.logs import log_to_file
from powerclip.regions import PatchGrid, segment_shard

log_to_file(snakemake.log[0], rule=snakemake.rule)
seg = snakemake.params.segment
segment_shard(
    snakemake.input.shard,
    snakemake.output.regions,
    snakemake.output.stats,
    shard=snakemake.wildcards.shard,
    source=seg["source"],
    grid=PatchGrid(**snakemake.params.grid),
    options=seg["options"],
    max_regions=seg["max_regions"],
    dedupe=seg["dedupe"],
)
