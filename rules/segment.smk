# One rule per kind of segmenter, so that the SLURM profile can give SAM/SAM2 a GPU and the classical
# sources none (segment_shard: felzenszwalb, random, and oracle, the exact objects of synthetic data). All
# three write the same sidecar format: results/<dataset>/regions/<source>/<shard>.tar.


rule segment_shard:
    input:
        shard="resources/{dataset}/shards/{shard}.tar",
    output:
        regions="results/{dataset}/regions/{source}/{shard}.tar",
        stats="results/{dataset}/regions/{source}/{shard}.stats.json",
    log:
        "logs/segment_shard/{dataset}/{source}/{shard}.log",
    benchmark:
        "benchmarks/segment_shard/{dataset}/{source}/{shard}.tsv"
    wildcard_constraints:
        source="felzenszwalb|random|oracle",
    conda:
        "../envs/segment.yaml"
    threads: 1
    params:
        grid=config["grid"],
        segment=segment_options(None),
    script:
        "../workflow_scripts/segment_shard.py"


rule segment_shard_sam:
    input:
        unpack(segmenter_checkpoint("sam")),
        shard="resources/{dataset}/shards/{shard}.tar",
    output:
        regions="results/{dataset}/regions/sam/{shard}.tar",
        stats="results/{dataset}/regions/sam/{shard}.stats.json",
    log:
        "logs/segment_shard/{dataset}/sam/{shard}.log",
    benchmark:
        "benchmarks/segment_shard/{dataset}/sam/{shard}.tsv"
    conda:
        "../envs/sam.yaml"
    threads: 4
    resources:
        gpu=config["segment"]["gpus"],
        mem_mb=lambda wildcards, attempt: 16000 * attempt,
        runtime=lambda wildcards, attempt: 360 * attempt,
    params:
        grid=config["grid"],
        segment=segment_options("sam"),
    script:
        "../workflow_scripts/segment_shard.py"


rule segment_shard_sam2:
    input:
        unpack(segmenter_checkpoint("sam2")),
        shard="resources/{dataset}/shards/{shard}.tar",
    output:
        regions="results/{dataset}/regions/sam2/{shard}.tar",
        stats="results/{dataset}/regions/sam2/{shard}.stats.json",
    log:
        "logs/segment_shard/{dataset}/sam2/{shard}.log",
    benchmark:
        "benchmarks/segment_shard/{dataset}/sam2/{shard}.tsv"
    conda:
        "../envs/sam2.yaml"
    threads: 4
    resources:
        gpu=config["segment"]["gpus"],
        mem_mb=lambda wildcards, attempt: 16000 * attempt,
        runtime=lambda wildcards, attempt: 360 * attempt,
    params:
        grid=config["grid"],
        segment=segment_options("sam2"),
    script:
        "../workflow_scripts/segment_shard.py"


# How good each configured source's regions are (stage statistics, info.quality), at the run table's top-k.
rule region_quality:
    input:
        unpack(
            lambda w: {
                source: expand(
                    f"results/{w.dataset}/regions/{source}/{{shard}}.stats.json",
                    shard=get_shards(w.dataset),
                )
                for source in config["segment"]["sources"]
            }
        ),
    output:
        table=report(
            "results/{dataset}/regions/quality.csv",
            caption="../report/region_quality.rst",
            category="Regions",
        ),
    log:
        "logs/region_quality/{dataset}.log",
    conda:
        "../envs/segment.yaml"
    params:
        sources=config["segment"]["sources"],
        topk=sorted({run["topk"] for run in RUNS.values()}),
    script:
        "../workflow_scripts/region_quality.py"
