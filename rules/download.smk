rule split_url_list:
    input:
        url_list=lambda w: get_dataset(w)["img2dataset"]["url_list"],
    output:
        parts=directory("resources/{dataset}/parts"),
    log:
        "logs/split_url_list/{dataset}.log",
    conda:
        "../envs/download.yaml"
    params:
        dataset=get_dataset,
        shards=lambda w: get_shards(w.dataset),
    script:
        "../workflow_scripts/split_url_list.py"


rule fetch_shard:
    input:
        unpack(fetch_inputs),
    output:
        shard="resources/{dataset}/shards/{shard}.tar",
        stats="resources/{dataset}/shards/{shard}.stats.json",
    log:
        "logs/fetch_shard/{dataset}/{shard}.log",
    retries: 2
    conda:
        "../envs/download.yaml"
    threads: 1
    params:
        dataset=get_dataset,
    script:
        "../workflow_scripts/fetch_shard.py"
