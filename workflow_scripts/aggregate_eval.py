# Thin glue for rules aggregate_run_eval and aggregate_eval: see powerclip.results.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

import pandas as pd

from powerclip.logs import log_to_file
from powerclip.results import combine, run_table, seed_summary, summary
from powerclip.shards import atomic_output

log_to_file(snakemake.log[0], rule=snakemake.rule)
if snakemake.rule == "aggregate_run_eval":
    table = run_table(dict(zip(snakemake.params.benchmarks, snakemake.input.results)), snakemake.wildcards.run)
    with atomic_output(snakemake.output.table) as tmp:
        table.to_csv(tmp, index=False)
else:
    table = combine(pd.read_csv(path) for path in snakemake.input.tables)
    with atomic_output(snakemake.output.table) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_output(snakemake.output.summary) as tmp:
        summary(table).to_csv(tmp, float_format="%.4f")
    # the run table as the workflow validated it (every column, defaults filled in), not re-read from the TSV
    seeds = seed_summary(table, snakemake.params.runs, baseline=snakemake.params.baseline)
    with atomic_output(snakemake.output.seeds) as tmp:
        seeds.to_csv(tmp, index=False, float_format="%.4f")
