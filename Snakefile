# powerclip-workflow: PowerCLIP and its peers, from raw shards to the results table.
# Read top to bottom: configuration, then one file per stage, then the default target.
from snakemake.utils import min_version

min_version("9.0")


# The embedded default, unless a config is given with --configfile: that one then stands alone instead
# of being merged key by key into the default (benchmarks or datasets would otherwise add up).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/download.smk"
include: "rules/parse_tree.smk"
include: "rules/segment.smk"
include: "rules/recaption.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/released.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        phrases=all_phrase_sidecars(),
        regions=all_region_sidecars(),
        region_quality=f"results/{DATASET}/regions/quality.csv",
        checkpoints=all_checkpoints(),
        eval="results/eval.csv",
        plots="results/plots/eval_bars.png",
        pictures=all_pictures(),
