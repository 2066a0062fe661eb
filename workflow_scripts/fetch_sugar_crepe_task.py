# Thin glue for rule fetch_sugar_crepe_task: see powerclip.evaluation.fetch.fetch_sugar_crepe_task.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.evaluation.fetch import fetch_sugar_crepe_task
from powerclip.logs import log_to_file

log_to_file(snakemake.log[0], rule=snakemake.rule)
fetch_sugar_crepe_task(snakemake.params.url, snakemake.output.annotations)
