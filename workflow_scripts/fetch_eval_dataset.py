# Thin glue for rule fetch_eval_dataset: see powerclip.evaluation.fetch.fetch_clip_benchmark_wds.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.evaluation.fetch import fetch_clip_benchmark_wds
from powerclip.logs import log_to_file

log_to_file(snakemake.log[0], rule=snakemake.rule)
spec = snakemake.params.spec
fetch_clip_benchmark_wds(spec["dataset"], snakemake.output.root, revision=spec.get("revision", "main"))
