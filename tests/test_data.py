import io
import numpy as np
import pytest
import torch
from PIL import Image

from powerclip.csr import encode_njson, npy_bytes, region_arrays
from powerclip.data import (
    DataConfig,
    MissingSidecarError,
    SampleProcessor,
    ShardSpec,
    collate,
    joined_samples,
    make_loader,
    select_regions,
    token_phrases,
)
from powerclip.regions import PatchGrid
from powerclip.shards import ShardWriter
from powerclip.synthetic import ShapesConfig, write_shard


def jpeg(size=(64, 64), color=(200, 30, 30)):
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def write_sidecars(tmp_path, keys, drop=None):
    with ShardWriter(tmp_path / "phrases.tar") as ph, ShardWriter(tmp_path / "regions.tar") as rg:
        for i, key in enumerate(keys):
            if key == drop:
                continue
            ph.write(key, {"njson": encode_njson([[1, 2], [3]])})
            lengths, cat = region_arrays([[0, 1], [i % 64]], 64)
            rg.write(key, {"samlens.npy": npy_bytes(lengths), "samcat.npy": npy_bytes(cat)})


@pytest.fixture
def raw(tmp_path):
    path = tmp_path / "raw.tar"
    write_shard(path, "s", 0, 6, seed=0, config=ShapesConfig())
    return path


def test_join_by_key(raw, tmp_path):
    from powerclip.shards import read_keys

    keys = read_keys(raw)
    write_sidecars(tmp_path, keys)
    samples = list(joined_samples(ShardSpec(str(raw), str(tmp_path / "phrases.tar"), str(tmp_path / "regions.tar"))))
    assert [s["__key__"] for s in samples] == keys
    assert all({"jpg", "txt", "njson", "samlens.npy", "samcat.npy"} <= set(s) for s in samples)


def test_missing_key_names_shard_and_key(raw, tmp_path):
    from powerclip.shards import read_keys

    keys = read_keys(raw)
    write_sidecars(tmp_path, keys, drop=keys[2])
    spec = ShardSpec(str(raw), str(tmp_path / "phrases.tar"), str(tmp_path / "regions.tar"))
    with pytest.raises(MissingSidecarError, match=rf"sample '{keys[2]}' missing") as err:
        list(joined_samples(spec))
    assert "raw.tar" in str(err.value) and "phrases.tar" in str(err.value)


def test_combined_shards_need_no_sidecars(tmp_path):
    lengths, cat = region_arrays([[5, 6]], 64)
    with ShardWriter(tmp_path / "combined.tar") as sink:
        sink.write("k", {"jpg": jpeg(), "txt": b"a red square", "njson": encode_njson([[1, 2, 3]]),
                         "samlens.npy": npy_bytes(lengths), "samcat.npy": npy_bytes(cat)})  # fmt: skip
    (sample,) = joined_samples(ShardSpec(str(tmp_path / "combined.tar")))
    processed = SampleProcessor(DataConfig())(sample)
    assert processed["regions"] == [[5, 6]] and processed["phrases"] == [[1, 2, 3]]
    with ShardWriter(tmp_path / "bare.tar") as sink:
        sink.write("k", {"jpg": jpeg(), "txt": b"x"})
    with pytest.raises(MissingSidecarError, match="no 'njson'"):
        list(joined_samples(ShardSpec(str(tmp_path / "bare.tar"))))


def test_transform_matches_the_region_grid():
    """A box drawn on a non-square image lands on exactly the cells PatchGrid maps its bbox to."""
    image = Image.new("RGB", (120, 90), (0, 0, 0))
    box = (50, 20, 30, 40)  # x, y, w, h in original pixels
    image.paste((255, 255, 255), (box[0], box[1], box[0] + box[2], box[1] + box[3]))
    grid = PatchGrid(64, 8)
    cells = set(grid.box_to_cells(box, *image.size))
    tensor = SampleProcessor(DataConfig(image_size=64)).transform(image)
    brightness = tensor.mean(0).unfold(0, 8, 8).unfold(1, 8, 8).mean((-1, -2)).flatten()
    bright = {i for i, v in enumerate(brightness.tolist()) if v > brightness.min().item() + 1.0}
    full = {i for i, v in enumerate(brightness.tolist()) if v > brightness.max().item() - 0.5}
    assert full <= cells <= bright


def test_select_regions():
    regions = [[i] for i in range(8)]
    assert select_regions(regions, 3, False, None) == [[0], [1], [2]]
    assert select_regions(regions[:2], 3, True, np.random.default_rng(0)) == [[0], [1]]
    picked = select_regions(regions, 3, True, np.random.default_rng(0))
    assert len(picked) == 3 and picked == sorted(picked) and picked == select_regions(regions, 3, True, np.random.default_rng(0))


def test_token_phrases_skip_start_and_end_tokens():
    assert token_phrases(3, 77) == [[1], [2], [3]]
    assert len(token_phrases(100, 77)) == 75


def test_collate_pads_with_masks():
    cfg = DataConfig(topk=3, max_phrases=2)
    samples = [
        {"key": "a", "image": torch.zeros(3, 8, 8), "text": torch.zeros(77, dtype=torch.long), "regions": [[1, 2, 3], [4]], "phrases": [[1]]},
        {"key": "b", "image": torch.zeros(3, 8, 8), "text": torch.zeros(77, dtype=torch.long), "regions": [], "phrases": [[1, 2], [3], [4]]},
    ]  # fmt: skip
    batch = collate(samples, cfg)
    assert batch["region_index"].shape == (2, 3, 3) and batch["phrase_index"].shape == (2, 2, 2)
    assert batch["region_mask"].tolist() == [[True, True, False], [False, False, False]]
    assert batch["region_cells"][0, 0].tolist() == [True, True, True] and batch["region_cells"][0, 1].tolist() == [True, False, False]
    assert batch["phrase_mask"].tolist() == [[True, False], [True, True]]


def test_stream_is_deterministic_per_epoch(raw, tmp_path):
    from powerclip.shards import read_keys

    write_sidecars(tmp_path, read_keys(raw))
    specs = [ShardSpec(str(raw), str(tmp_path / "phrases.tar"), str(tmp_path / "regions.tar"))]
    cfg = DataConfig(shuffle_buffer=8, shuffle_initial=4, topk=2)

    def keys(epoch, n=3):
        it = iter(make_loader(specs, cfg, batch_size=4, epoch=epoch))
        return [next(it)["key"] for _ in range(n)]

    assert keys(0) == keys(0)
    assert keys(0) != keys(1)
    batch = next(iter(make_loader(specs, cfg, batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["text"].shape == (4, 77)
    assert batch["region_mask"].all()


def test_uint8_images_normalised_on_the_device_equal_the_float_path(tmp_path):
    """DataConfig.uint8_images: the workers hand over uint8 crops, normalize_images gives exactly the tensors
    of open_clip's ToTensor + Normalize (the trainer's results do not change)."""
    from PIL import Image

    from powerclip.data import DataConfig, SampleProcessor, normalize_images

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    buf = io.BytesIO()
    photo.save(buf, format="PNG")
    sample = {"__key__": "k", "png": buf.getvalue(), "txt": b"a red circle"}
    floats = SampleProcessor(DataConfig(image_size=32, use_regions=False))(dict(sample))["image"]
    uint8 = SampleProcessor(DataConfig(image_size=32, use_regions=False, uint8_images=True))(dict(sample))["image"]
    assert uint8.dtype == torch.uint8 and uint8.shape == (3, 32, 32)
    assert torch.equal(normalize_images(uint8[None])[0], floats)
