# Thin glue for rule recaption_shard: see powerclip.recaptions (synthetic_recaptions, join_table).
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.logs import log_to_file
from powerclip.recaptions import join_table, synthetic_recaptions

log_to_file(snakemake.log[0], rule=snakemake.rule)
spec, shard = snakemake.params.spec, snakemake.wildcards.shard
raw, out, stats = snakemake.input.shard, snakemake.output.recaptions, snakemake.output.stats
if spec["source"] == "synthetic":
    synthetic_recaptions(raw, out, stats, shard)
else:
    table = spec["table"]
    join_table(raw, snakemake.input.index, out, stats, shard, join=table["join"], table=table["url"])
