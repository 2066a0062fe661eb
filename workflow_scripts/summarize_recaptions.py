# Thin glue for rule summarize_recaptions: see powerclip.recaptions.summarize.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.logs import log_to_file
from powerclip.recaptions import summarize

log_to_file(snakemake.log[0], rule=snakemake.rule)
summarize(snakemake.input.stats, snakemake.output.summary, table_stats=snakemake.input.get("table_stats"))
