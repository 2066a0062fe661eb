# Thin glue for rule parse_shard: see powerclip.phrases.parse_shard.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.logs import log_to_file
from powerclip.phrases import parse_shard

log_to_file(snakemake.log[0], rule=snakemake.rule)
opts = snakemake.params.parse
parse_shard(
    snakemake.input.shard,
    snakemake.output.phrases,
    snakemake.output.stats,
    shard=snakemake.wildcards.shard,
    spacy_model=opts["spacy_model"],
    kinds=opts["kinds"],
    max_phrases=opts["max_phrases"],
    context_length=opts["context_length"],
    batch_size=opts["batch_size"],
    n_process=snakemake.threads,
)
