# Thin glue for rule eval_benchmark: see powerclip.evaluation.runner.run_benchmark.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.evaluation.runner import run_benchmark
from powerclip.logs import log_to_file

log_to_file(snakemake.log[0], rule=snakemake.rule)
spec = snakemake.params.spec
run_benchmark(
    snakemake.input.checkpoint,
    dataset=spec["dataset"],
    dataset_root=snakemake.params.root,
    task=spec.get("task"),
    output_json=snakemake.output.result,
    batch_size=snakemake.params.batch_size,
    num_workers=snakemake.params.workers,
    recall_k=spec.get("recall_k", [1, 5, 10]),
    device="auto" if snakemake.resources.get("gpu", 0) else "cpu",
)
