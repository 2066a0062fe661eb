"""Regions with their best-matching phrases, drawn on held-out images (a figure for the report).

For each image the stored regions (cells of the training crop's patch grid, largest first) are pooled from
the model's projected patch tokens and each caption phrase from its projected token states, exactly as the
region-phrase loss does (``gather_mean``); every region is labelled with the phrase of highest cosine
similarity. The image is shown as the model sees it (Resize + CenterCrop to the grid's image size), each
region as the outline of its cells.
"""

from __future__ import annotations

import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from powerclip.csr import decode_njson, decode_regions
from powerclip.data import ShardSpec, joined_samples
from powerclip.model import encode_image_tokens, encode_text_tokens, gather_mean, load_model
from powerclip.grid import PatchGrid
from powerclip.shards import StageStats, atomic_output, decode_image, image_field

log = logging.getLogger(__name__)

COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf", "#999999")


@dataclass
class RegionMatch:
    cells: list[int]
    phrase: str  # the best-matching phrase's text
    similarity: float  # cosine similarity of region and phrase features


@dataclass
class Picture:
    key: str
    caption: str
    image: object  # PIL image, cropped to the grid
    matches: list[RegionMatch]


@torch.no_grad()
def match_regions(model, image: torch.Tensor, text: torch.Tensor, regions: list[list[int]], phrases: list[list[int]]):
    """Cosine similarities (R, P) of region and phrase features of one image-caption pair."""
    from powerclip.data import pad_groups

    _, patch_tokens = encode_image_tokens(model, image[None])
    _, token_states = encode_text_tokens(model, text[None])
    r_index, r_member, _ = pad_groups([regions], len(regions))
    p_index, p_member, _ = pad_groups([phrases], len(phrases))
    region_features, _ = gather_mean(patch_tokens, r_index, r_member)
    phrase_features, _ = gather_mean(token_states, p_index, p_member)
    return F.normalize(region_features[0], dim=-1) @ F.normalize(phrase_features[0], dim=-1).T


def region_phrase_pictures(
    model,
    spec: ShardSpec,
    grid: PatchGrid,
    samples: int = 6,
    regions_per_image: int = 4,
    max_phrase_tokens: int = 8,
) -> tuple[list[Picture], StageStats]:
    """The first ``samples`` images of a shard that have a region and a candidate phrase, matched.

    Candidate phrases are the parsed phrases of at most ``max_phrase_tokens`` tokens: the long S-level
    phrases (the whole caption among them) would otherwise win most regions and say nothing about which
    object a region is; the global CLIP term already aligns the whole image with the whole caption.
    """
    import open_clip
    from open_clip.transform import image_transform
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    if samples < 1 or regions_per_image < 1:
        raise ValueError(f"samples and regions_per_image must be >= 1, got {samples} and {regions_per_image}")
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    if image_size != grid.image_size or model.visual.grid_size[0] != grid.cells_per_side:
        raise ValueError(
            f"model {image_size}px / {model.visual.grid_size[0]} cells per side does not match the region grid "
            f"{grid.image_size}px / {grid.cells_per_side} cells: the regions were cut for another model"
        )
    model.eval()
    transform = image_transform(image_size, is_train=False)
    view = lambda img: CenterCrop(image_size)(Resize(image_size, interpolation=InterpolationMode.BICUBIC)(img))  # noqa: E731
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    stats = StageStats(stage="pictures", shard=spec.raw)
    pictures = []
    for sample in joined_samples(spec):
        if len(pictures) == samples:
            break
        stats.samples_in += 1
        key = sample["__key__"]
        regions = decode_regions(sample["samlens.npy"], sample["samcat.npy"])[:regions_per_image]
        phrases = [p for p in decode_njson(sample["njson"]) if len(p) <= max_phrase_tokens]
        if not regions or not phrases:
            stats.skip("no region" if not regions else f"no phrase of <= {max_phrase_tokens} tokens", key)
            continue
        image = decode_image(sample[image_field(sample)]).convert("RGB")
        caption = sample["txt"].decode("utf-8")
        text = tokenizer([caption])[0]
        sims = match_regions(model, transform(image), text, regions, phrases)
        best = sims.argmax(dim=1)
        tokens = text.tolist()
        words = [tokenizer.decode([tokens[i] for i in p]).strip() for p in phrases]
        matches = [RegionMatch(cells, words[int(j)], float(sims[r, j])) for r, (cells, j) in enumerate(zip(regions, best))]
        pictures.append(Picture(key, caption, view(image), matches))
        stats.samples_out += 1
    if not pictures:
        raise ValueError(f"{spec.raw}: no sample with both a region and a phrase to draw ({dict(stats.skipped)})")
    return pictures, stats


def draw_pictures(pictures: list[Picture], grid: PatchGrid, out_png, title: str = "") -> None:
    """One panel per image: region outlines (cells of the patch grid) and their best phrases below."""
    from matplotlib.patches import Rectangle

    from powerclip.plots import _pyplot

    plt = _pyplot()
    cols = min(len(pictures), 3)
    rows = -(-len(pictures) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 5.6 * rows), squeeze=False)
    p, g = grid.patch_size, grid.cells_per_side
    for ax, picture in zip(axes.flat, pictures):
        ax.imshow(picture.image, extent=(0, grid.image_size, grid.image_size, 0))
        lines = []
        for i, match in enumerate(picture.matches):
            colour = COLOURS[i % len(COLOURS)]
            rs = [c // g for c in match.cells]
            cs = [c % g for c in match.cells]
            x0, y0 = min(cs) * p, min(rs) * p
            w, h = (max(cs) + 1) * p - x0, (max(rs) + 1) * p - y0
            inset = 0.6 + 0.9 * i  # nested regions stay visible
            ax.add_patch(
                Rectangle((x0 + inset, y0 + inset), w - 2 * inset, h - 2 * inset, fill=False, lw=2, ec=colour)
            )
            ax.text(x0 + inset + 1, y0 + inset + 1, str(i + 1), color="white", fontsize=8, va="top",
                    bbox={"fc": colour, "ec": "none", "pad": 1})
            label = textwrap.shorten(match.phrase, 44, placeholder="...")
            lines.append(f"{i + 1}: {label} ({match.similarity:.2f})")
        ax.set_xlim(0, grid.image_size)
        ax.set_ylim(grid.image_size, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("\n".join(textwrap.wrap(picture.caption, 40)), fontsize=8)
        ax.set_xlabel("\n".join(lines), fontsize=8, loc="left")
    for ax in list(axes.flat)[len(pictures) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_output(Path(out_png)) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def region_phrase_figure(
    checkpoint,
    spec: ShardSpec,
    grid: PatchGrid,
    out_png,
    samples: int = 6,
    regions_per_image: int = 4,
    max_phrase_tokens: int = 8,
    title: str = "",
) -> StageStats:
    """Load a checkpoint, match regions and phrases of the first images of ``spec``, draw them to ``out_png``."""
    model = load_model(checkpoint)
    pictures, stats = region_phrase_pictures(model, spec, grid, samples, regions_per_image, max_phrase_tokens)
    draw_pictures(pictures, grid, out_png, title=title)
    stats.check()
    log.info("%s: %d pictures of %s; %s", out_png, len(pictures), spec.raw, stats.to_dict())
    return stats
