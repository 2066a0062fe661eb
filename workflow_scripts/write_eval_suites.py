# Thin glue for rule write_eval_suites: see powerclip.evaluation.suites.write_suites.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.evaluation.suites import write_suites
from powerclip.logs import log_to_file

log_to_file(snakemake.log[0], rule=snakemake.rule)
write_suites(
    snakemake.output.suites,
    snakemake.params.generator,
    seed=snakemake.params.seed,
    n=snakemake.params.n,
    suites=snakemake.params.suites,
)
