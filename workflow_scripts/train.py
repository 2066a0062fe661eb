# Thin glue for rule train: see powerclip.train_params.build_argv and powerclip.train.launch.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.logs import log_to_file
from powerclip.train import launch
from powerclip.train_params import build_argv

log = log_to_file(snakemake.log[0], rule=snakemake.rule)
identity = snakemake.params.identity
# operational settings (logging, checkpoint intervals, threads) are read here, not tracked as params
train = {**snakemake.config["train"], **identity["train"], "threads": snakemake.threads}
argv = build_argv(
    identity["run"],
    train,
    shards=snakemake.input.shards,
    checkpoint=snakemake.output.checkpoint,
    metrics=snakemake.output.metrics,
    work_dir=snakemake.params.work_dir,
    phrases_dir=snakemake.params.phrases_dir,
    regions_dir=snakemake.params.regions_dir,
    recaptions_dir=snakemake.params.recaptions_dir,
)
launch(argv, gpus=train["gpus"], log=log)
