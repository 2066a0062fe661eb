# Thin glue for rule fetch_recaption_table: see powerclip.fetch.http.fetch_url.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.fetch.http import fetch_url
from powerclip.logs import log_to_file

log_to_file(snakemake.log[0], rule=snakemake.rule)
table = snakemake.params.table
fetch_url(table["url"], snakemake.output.table, sha256=table["sha256"], retries=table["retries"], what="recaption table")
