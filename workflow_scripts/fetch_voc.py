# Thin glue for rule fetch_voc: see powerclip.evaluation.fetch.fetch_voc.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.evaluation.fetch import fetch_voc
from powerclip.logs import log_to_file

log_to_file(snakemake.log[0], rule=snakemake.rule)
fetch_voc(snakemake.params.url, snakemake.output.root, sha256=snakemake.params.sha256)
