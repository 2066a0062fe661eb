# Thin glue for rule draw_region_phrases: see powerclip.pictures.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the repo's package, in any environment

from powerclip.data import ShardSpec
from powerclip.logs import log_to_file
from powerclip.pictures import region_phrase_figure
from powerclip.regions import PatchGrid

log_to_file(snakemake.log[0], rule=snakemake.rule)
grid, pictures = snakemake.params.grid, snakemake.params.pictures
region_phrase_figure(
    snakemake.input.checkpoint,
    ShardSpec(snakemake.input.raw, snakemake.input.phrases, snakemake.input.regions),
    PatchGrid(grid["image_size"], grid["patch_size"], grid["min_overlap"]),
    snakemake.output.png,
    samples=pictures["samples"],
    regions_per_image=pictures["regions_per_image"],
    max_phrase_tokens=pictures["max_phrase_tokens"],
    title=f"{snakemake.wildcards.run}: regions ({pictures['regions']}) and their best phrases",
)
