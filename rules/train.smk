rule train:
    input:
        unpack(train_inputs),
    output:
        checkpoint=protected("results/runs/{run}/checkpoint.pt"),
        metrics="results/runs/{run}/metrics.csv",
    log:
        "logs/train/{run}.log",
    benchmark:
        "benchmarks/train/{run}.tsv"
    retries: 1
    conda:
        "../envs/train.yaml"
    threads: config["train"].get("threads", 1)
    resources:
        gpu=config["train"].get("gpus", 0),
        mem_mb=lambda wildcards, attempt: config["train"].get("mem_mb", 8000) * attempt,
        runtime=lambda wildcards, attempt: config["train"].get("runtime", 60) * attempt,
    params:
        launcher=train_launcher,
        args=train_args,
        root=workflow.basedir,
    shell:
        # PYTHONPATH: conda rules clear it, and the package must be importable in any env.
        "PYTHONPATH={params.root} {params.launcher} -m powerclip.train {params.args} > {log} 2>&1"
