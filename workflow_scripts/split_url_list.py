# Thin glue for rule split_url_list: see powerclip.fetch.url_list.split_url_list.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.fetch.url_list import split_url_list
from powerclip.logs import log_to_file

log_to_file(snakemake.log[0], rule=snakemake.rule)
spec = snakemake.params.dataset["img2dataset"]
split_url_list(
    snakemake.input.url_list,
    snakemake.output.parts,
    shard_names=snakemake.params.shards,
    samples_per_shard=spec["samples_per_shard"],
    url_col=spec.get("url_col", "url"),
    caption_col=spec.get("caption_col", "caption"),
    header=spec.get("header", True),
)
