rule train:
    input:
        unpack(train_inputs),
    output:
        checkpoint="results/runs/{run}/checkpoint.pt",
        metrics="results/runs/{run}/metrics.csv",
    log:
        "logs/train/{run}.log",
    benchmark:
        "benchmarks/train/{run}.tsv"
    retries: 1
    conda:
        "../envs/train.yaml"
    threads: config["train"]["threads"]
    resources:
        gpu=config["train"]["gpus"],
        mem_mb=lambda wildcards, attempt: config["train"]["mem_mb"] * attempt,
        runtime=lambda wildcards, attempt: config["train"]["runtime"] * attempt,
    params:
        # Tracked by Snakemake's params trigger: a changed row or train: setting retrains this run only.
        identity=train_identity,
        phrases_dir=sidecar_dir("phrases"),
        regions_dir=sidecar_dir("regions"),
        recaptions_dir=sidecar_dir("recaptions"),
        work_dir="results/runs/{run}/work",
    script:
        "../workflow_scripts/train.py"
