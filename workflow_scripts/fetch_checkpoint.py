# Thin glue for rule fetch_checkpoint: see powerclip.fetch.http.fetch_checkpoint.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.fetch.http import fetch_checkpoint
from powerclip.logs import log_to_file

log_to_file(snakemake.log[0], rule=snakemake.rule)
spec = snakemake.params.spec
fetch_checkpoint(spec["url"], snakemake.output.checkpoint, sha256=spec.get("sha256"), retries=spec.get("retries", 3))
