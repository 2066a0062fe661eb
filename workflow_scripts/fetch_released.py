# Thin glue for rule fetch_released: see powerclip.evaluation.released.fetch_released.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.evaluation.released import fetch_released
from powerclip.logs import log_to_file

log_to_file(snakemake.log[0], rule=snakemake.rule)
fetch_released(snakemake.wildcards.released, snakemake.params.spec, snakemake.output.folder)
