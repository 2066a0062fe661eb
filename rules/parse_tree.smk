rule parse_shard:
    input:
        shard="resources/{dataset}/shards/{shard}.tar",
    output:
        phrases="results/{dataset}/phrases/{shard}.tar",
        stats="results/{dataset}/phrases/{shard}.stats.json",
    log:
        "logs/parse_shard/{dataset}/{shard}.log",
    benchmark:
        "benchmarks/parse_shard/{dataset}/{shard}.tsv"
    conda:
        "../envs/parse.yaml"
    threads: config["parse"]["threads"]
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
    params:
        parse=config["parse"],
    script:
        "../workflow_scripts/parse_shard.py"
