# Downloads need the internet, which compute nodes often lack: on a cluster these rules run where
# Snakemake runs (the login node), not as SLURM jobs. No `retries:` here: the package retries transient
# network errors itself (powerclip.fetch.http.retry), and any other error (a corrupt tar, a 404, a
# missing file) would only fail the same way again.
from powerclip.datasets import huggingface_filename


localrules:
    split_url_list,
    fetch_shard,
    fetch_checkpoint,


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
    conda:
        "../envs/download.yaml"
    threads: 1
    params:
        dataset=get_dataset,
        index=lambda w: get_shards(w.dataset).index(w.shard),
        filename=lambda w: (
            huggingface_filename(get_dataset(w), w.shard)
            if get_dataset(w)["source"] == "huggingface"
            else None
        ),
    script:
        "../workflow_scripts/fetch_shard.py"


rule fetch_checkpoint:
    output:
        checkpoint="resources/checkpoints/{checkpoint}",
    log:
        "logs/fetch_checkpoint/{checkpoint}.log",
    conda:
        "../envs/download.yaml"
    params:
        spec=lambda w: config["checkpoints"][w.checkpoint],
    script:
        "../workflow_scripts/fetch_checkpoint.py"
