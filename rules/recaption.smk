# Synthetic captions for methods that train on them (CLIPS), as a sidecar per raw shard:
# results/<dataset>/recaptions/<shard>.tar ({key}.syn.txt, {key}.web.txt), from the source configured in
# datasets.<name>.recaptions (powerclip.recaptions). A recaption table is downloaded once (a local rule: the
# login node has the internet) and indexed once; each shard is then joined by its own job.


localrules:
    fetch_recaption_table,


rule fetch_recaption_table:
    output:
        table="resources/{dataset}/recaptions/table.csv",
    log:
        "logs/fetch_recaption_table/{dataset}.log",
    conda:
        "../envs/download.yaml"
    params:
        table=lambda w: recaption_table(w.dataset),
    script:
        "../workflow_scripts/fetch_recaption_table.py"


rule index_recaption_table:
    input:
        table="resources/{dataset}/recaptions/table.csv",
    output:
        index="resources/{dataset}/recaptions/table.sqlite",
        stats="resources/{dataset}/recaptions/table.stats.json",
    log:
        "logs/index_recaption_table/{dataset}.log",
    benchmark:
        "benchmarks/index_recaption_table/{dataset}.tsv"
    conda:
        "../envs/download.yaml"
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
    params:
        table=lambda w: recaption_table(w.dataset),
    script:
        "../workflow_scripts/index_recaption_table.py"


rule recaption_shard:
    input:
        unpack(recaption_inputs),
    output:
        recaptions="results/{dataset}/recaptions/{shard}.tar",
        stats="results/{dataset}/recaptions/{shard}.stats.json",
    log:
        "logs/recaption_shard/{dataset}/{shard}.log",
    benchmark:
        "benchmarks/recaption_shard/{dataset}/{shard}.tsv"
    conda:
        "../envs/download.yaml"
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 1000 * attempt,
    params:
        spec=lambda w: recaption_spec(w.dataset),
    script:
        "../workflow_scripts/recaption_shard.py"


rule summarize_recaptions:
    input:
        unpack(recaption_summary_inputs),
    output:
        summary="results/{dataset}/recaptions.summary.json",
    log:
        "logs/summarize_recaptions/{dataset}.log",
    conda:
        "../envs/download.yaml"
    script:
        "../workflow_scripts/summarize_recaptions.py"
