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
    spacy_model=opts.get("spacy_model", "auto"),
    kinds=opts.get("kinds", ["NP", "PP", "VP", "S"]),
    max_phrases=opts.get("max_phrases"),
    context_length=opts.get("context_length", 77),
    batch_size=opts.get("batch_size", 256),
    n_process=snakemake.threads,
)
