"""powerclip.pictures: regions matched to phrases with the loss's pooling, counted skips, a real PNG."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from powerclip.csr import encode_njson, npy_bytes, region_arrays
from powerclip.data import ShardSpec
from powerclip.model import create_model, save_checkpoint
from powerclip.pictures import match_regions, region_phrase_figure, region_phrase_pictures
from powerclip.regions import PatchGrid
from powerclip.shards import ShardWriter

MODEL = "PowerCLIP-Tiny-64-8"
GRID = PatchGrid(64, 8)
CAPTION = "a small red circle to the left of a large blue square"


@pytest.fixture(scope="module")
def model():
    return create_model(MODEL, seed=0).eval()


def png(seed: int, size: int = 80) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 16, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def write_combined_shard(path, samples):
    """A shard in the combined format: image, caption, phrases and regions in one tar."""
    writer = ShardWriter(path)
    for i, (regions, phrases) in enumerate(samples):
        lens, cat = region_arrays(regions, GRID.num_cells)
        writer.write(
            f"s{i:03d}",
            {"png": png(i), "txt": CAPTION.encode(), "njson": encode_njson(phrases),
             "samlens.npy": npy_bytes(lens), "samcat.npy": npy_bytes(cat)},
        )  # fmt: skip
    writer.close()
    return path


def test_whole_grid_region_and_whole_caption_phrase_give_the_global_similarity(model):
    """The region / phrase features are the global avg pools when they cover everything (docs/method.md)."""
    image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))
    text = open_clip.get_tokenizer("ViT-B-16")([CAPTION])[0]
    n_tokens = int((text != 0).sum())
    sims = match_regions(model, image, text, [list(range(GRID.num_cells)), [0, 1, 8, 9]], [list(range(n_tokens)), [1, 2]])
    with torch.no_grad():
        glob = F.normalize(model.encode_image(image[None]), dim=-1) @ F.normalize(model.encode_text(text[None]), dim=-1).T
    assert sims.shape == (2, 2)
    torch.testing.assert_close(sims[0, 0], glob[0, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sims[1, 1], sims[0, 0])


def test_pictures_label_each_region_with_its_argmax_phrase_and_count_skips(model, tmp_path):
    tokens = open_clip.get_tokenizer("ViT-B-16")([CAPTION])[0].tolist()
    small_circle, blue_square, long_phrase = [2, 3, 4], [9, 10, 11], list(range(1, 12))
    samples = [
        ([[0, 1, 8, 9], [30, 31]], [small_circle, blue_square]),
        ([], [small_circle]),  # no region: skipped and counted
        ([[5, 6, 7]], [long_phrase]),  # only a phrase longer than max_phrase_tokens: skipped and counted
        ([list(range(64)), [10], [20, 21], [40], [50], [60]], [small_circle, long_phrase, blue_square]),
    ]
    spec = ShardSpec(str(write_combined_shard(tmp_path / "held.tar", samples)))
    pictures, stats = region_phrase_pictures(model, spec, GRID, samples=5, regions_per_image=4, max_phrase_tokens=8)
    assert [p.key for p in pictures] == ["s000", "s003"]
    assert stats.samples_in == 4 and stats.samples_out == 2
    assert dict(stats.skipped) == {"no region": 1, "no phrase of <= 8 tokens": 1}
    stats.check()
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    words = {tuple(p): tokenizer.decode([tokens[i] for i in p]).strip() for p in (small_circle, blue_square)}
    assert words[tuple(small_circle)] == "small red circle"
    for picture, (regions, phrases) in zip(pictures, [samples[0], samples[3]]):
        candidates = [p for p in phrases if len(p) <= 8]
        assert len(picture.matches) == min(len(regions), 4)  # the largest regions first, as stored
        assert picture.image.size == (64, 64)
        transform = open_clip.transform.image_transform(64, is_train=False)
        image = transform(Image.open(io.BytesIO(png(int(picture.key[1:])))).convert("RGB"))
        text = tokenizer([CAPTION])[0]
        sims = match_regions(model, image, text, regions[:4], candidates)
        for r, match in enumerate(picture.matches):
            assert match.cells == regions[r]
            j = int(sims[r].argmax())
            assert match.phrase == words[tuple(candidates[j])]
            assert match.similarity == pytest.approx(float(sims[r, j]))


def test_figure_from_a_checkpoint_is_a_png_and_grid_mismatch_is_refused(model, tmp_path):
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", model)
    spec = ShardSpec(str(write_combined_shard(tmp_path / "held.tar", [([[0, 1, 8, 9]], [[2, 3, 4]])] * 3)))
    out = tmp_path / "figs" / "region_phrases.png"
    stats = region_phrase_figure(checkpoint, spec, GRID, out, samples=2, title="tiny")
    assert stats.samples_out == 2
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 200
    assert not list(out.parent.glob(".*"))  # written atomically: no temporary left behind
    with pytest.raises(ValueError, match="does not match the region grid"):
        region_phrase_pictures(model, spec, PatchGrid(224, 16))
    empty = ShardSpec(str(write_combined_shard(tmp_path / "empty.tar", [([], [[2]])])))
    with pytest.raises(ValueError, match="no sample with both a region and a phrase"):
        region_phrase_pictures(model, empty, GRID)
    with pytest.raises(ValueError, match="samples and regions_per_image"):
        region_phrase_pictures(model, spec, GRID, samples=0)
