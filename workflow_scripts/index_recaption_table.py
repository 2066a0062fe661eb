# Thin glue for rule index_recaption_table: see powerclip.recaptions.index_table.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.logs import log_to_file
from powerclip.recaptions import index_table

log_to_file(snakemake.log[0], rule=snakemake.rule)
table = snakemake.params.table
index_table(
    snakemake.input.table,
    snakemake.output.index,
    snakemake.output.stats,
    key_column=table["key_column"],
    caption_column=table["caption_column"],
    header=table["header"],
    delimiter=table["delimiter"],
)
