# Evaluation data needs the internet: fetched where Snakemake runs, not as a SLURM job.
localrules:
    fetch_eval_dataset,
    fetch_sugar_crepe_images,
    fetch_sugar_crepe_task,


rule write_eval_suites:
    output:
        suites=directory("resources/eval/{dataset}"),
    log:
        "logs/write_eval_suites/{dataset}.log",
    conda:
        "../envs/eval.yaml"
    params:
        generator=lambda w: config["datasets"][w.dataset]["synthetic"],
        seed=lambda w: config["datasets"][w.dataset]["synthetic"]["seed"],
        n=config["evaluation"]["items_per_suite"],
        suites=local_suites,
    script:
        "../workflow_scripts/write_eval_suites.py"


rule fetch_eval_dataset:
    output:
        root=directory("resources/eval/wds/{benchmark}"),
    log:
        "logs/fetch_eval_dataset/{benchmark}.log",
    conda:
        "../envs/download.yaml"
    params:
        spec=lambda w: config["evaluation"]["benchmarks"][w.benchmark],
    script:
        "../workflow_scripts/fetch_eval_dataset.py"


# SugarCrepe: COCO val2017 images, shared by the 7 tasks, and one JSON of caption pairs per task, laid out
# as clip-benchmark's sugar_crepe/<task> reads them (it would otherwise wget them on the compute node).
rule fetch_sugar_crepe_images:
    output:
        images=directory("resources/eval/sugar_crepe/val2017"),
    log:
        "logs/fetch_sugar_crepe_images/val2017.log",
    conda:
        "../envs/download.yaml"
    params:
        url=config["evaluation"]["sugar_crepe"]["images_url"],
        sha256=config["evaluation"]["sugar_crepe"].get("images_sha256"),
    script:
        "../workflow_scripts/fetch_sugar_crepe_images.py"


rule fetch_sugar_crepe_task:
    output:
        annotations="resources/eval/sugar_crepe/{task}.json",
    log:
        "logs/fetch_sugar_crepe_task/{task}.log",
    wildcard_constraints:
        task="[a-z_]+",
    conda:
        "../envs/download.yaml"
    params:
        url=lambda w: config["evaluation"]["sugar_crepe"]["annotations_url"].format(
            task=w.task
        ),
    script:
        "../workflow_scripts/fetch_sugar_crepe_task.py"


# One rule for both kinds of target: results/runs/<run>/ (a run's checkpoint) and results/released/<name>/
# (a released checkpoint's folder, fetched by fetch_released).
rule eval_benchmark:
    input:
        unpack(eval_inputs),
        checkpoint=eval_checkpoint,
    output:
        result="results/{kind}/{run}/eval/{benchmark}.json",
    log:
        "logs/eval_benchmark/{kind}/{run}/{benchmark}.log",
    benchmark:
        "benchmarks/eval_benchmark/{kind}/{run}/{benchmark}.tsv"
    wildcard_constraints:
        kind="|".join(EVAL_KINDS),
        run=eval_names(),
    conda:
        "../envs/eval.yaml"
    threads: 1
    resources:
        gpu=config["evaluation"]["gpus"],
        runtime=lambda wildcards, attempt: 60 * attempt,
    params:
        spec=lambda w: config["evaluation"]["benchmarks"][w.benchmark],
        root=eval_root,
        batch_size=config["evaluation"]["batch_size"],
        workers=config["evaluation"]["workers"],
    script:
        "../workflow_scripts/eval_benchmark.py"


rule aggregate_run_eval:
    input:
        results=lambda w: expand(
            "results/{kind}/{run}/eval/{benchmark}.json",
            kind=w.kind,
            run=w.run,
            benchmark=config["evaluation"]["benchmarks"],
        ),
    output:
        table="results/{kind}/{run}/eval.csv",
    log:
        "logs/aggregate_run_eval/{kind}/{run}.log",
    wildcard_constraints:
        kind="|".join(EVAL_KINDS),
        run=eval_names(),
    conda:
        "../envs/eval.yaml"
    params:
        benchmarks=list(config["evaluation"]["benchmarks"]),
    script:
        "../workflow_scripts/aggregate_eval.py"


rule aggregate_eval:
    input:
        tables=expand("results/runs/{run}/eval.csv", run=RUNS),
    output:
        table=report(
            "results/eval.csv", caption="../report/eval.rst", category="Results"
        ),
        summary=report(
            "results/eval_summary.csv",
            caption="../report/eval_summary.rst",
            category="Results",
        ),
        seeds=report(
            "results/eval_seeds.csv",
            caption="../report/eval_seeds.rst",
            category="Results",
        ),
    log:
        "logs/aggregate_eval/aggregate_eval.log",
    conda:
        "../envs/eval.yaml"
    params:
        # the validated run table (defaults filled in) groups the seeds of a setting
        runs=RUNS,
        baseline=config["evaluation"]["baseline"],
    script:
        "../workflow_scripts/aggregate_eval.py"


# PASCAL VOC 2012 (benchmarks with dataset voc2012): its val split, fetched where Snakemake runs.
localrules:
    fetch_voc,


rule fetch_voc:
    output:
        root=directory(f"resources/eval/{VOC_DATASET}"),
    log:
        "logs/fetch_voc/voc2012.log",
    conda:
        "../envs/download.yaml"
    params:
        url=config["evaluation"]["voc"]["url"],
        sha256=config["evaluation"]["voc"]["sha256"],
    script:
        "../workflow_scripts/fetch_voc.py"
