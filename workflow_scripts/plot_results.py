# Thin glue for rule plot_results: see powerclip.plots.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

import pandas as pd

from powerclip.logs import log_to_file
from powerclip.plots import eval_bars, training_curves

log_to_file(snakemake.log[0], rule=snakemake.rule)
eval_bars(pd.read_csv(snakemake.input.seeds), snakemake.output.bars)
training_curves(dict(zip(snakemake.params.runs, snakemake.input.metrics)), snakemake.output.curves)
