# Thin glue for rule region_quality: see powerclip.evaluation.region_quality.write_quality_table.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.evaluation.region_quality import write_quality_table
from powerclip.logs import log_to_file

log_to_file(snakemake.log[0], rule=snakemake.rule)
stats = {source: list(snakemake.input[source]) for source in snakemake.params.sources}
write_quality_table(stats, snakemake.params.topk, snakemake.output.table)
