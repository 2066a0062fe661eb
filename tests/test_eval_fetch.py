"""powerclip.evaluation.fetch: clip-benchmark's WebDatasets from a fake Hub and SugarCrepe from a file server on
127.0.0.1, laid out so that clip-benchmark reads them without downloading anything itself."""

from __future__ import annotations

import hashlib
import io
import json
import re
import types

import pytest
from PIL import Image
from servers import REPO, FakeHub, FileServer, image_bytes, write_tar, zip_bytes
from servers import hf_env  # noqa: F401 - a fixture

from powerclip.evaluation.fetch import (
    clip_benchmark_repo,
    fetch_clip_benchmark_wds,
    fetch_sugar_crepe_images,
    fetch_sugar_crepe_task,
)
from powerclip.fetch.http import DownloadError


def test_fetch_clip_benchmark_wds_layout(hf_env, tmp_path):
    """A clip-benchmark WebDataset fetched from a (fake) Hub lands in the layout clip-benchmark reads."""
    assert clip_benchmark_repo("wds/vtab/cifar100") == "clip-benchmark/wds_vtab-cifar100"
    write_tar(tmp_path / "0.tar", [("000", {"jpg": image_bytes("JPEG", (1, 2, 3)), "cls": b"1"})])
    files = {
        "test/nshards.txt": b"2\n",
        "test/0.tar": (tmp_path / "0.tar").read_bytes(),
        "test/1.tar": (tmp_path / "0.tar").read_bytes(),
        "classnames.txt": b"cat\ndog\n",
        "zeroshot_classification_templates.txt": b"a photo of a {c}.\n",
    }
    hub = FakeHub(files, lfs=False)
    try:
        prefix, name = REPO.split("/")
        out = tmp_path / "eval" / "wds_x"
        info = fetch_clip_benchmark_wds(f"wds/{name}", out, repo_prefix=f"{prefix}/", endpoint=hub.endpoint, backoff_s=0)
        assert info["nshards"] == 2 and "dataset_type.txt" not in info["files"]
        for rel, data in files.items():
            assert (out / rel).read_bytes() == data
        assert sorted(p.name for p in out.parent.iterdir()) == ["wds_x"]  # no temp folder left
        from clip_benchmark.datasets.builder import build_wds_dataset

        ds = build_wds_dataset(f"wds/{name}", transform=None, data_dir=str(out))
        assert ds.classes == ["cat", "dog"] and len(list(ds)) == 2
        with pytest.raises(DownloadError, match="nshards.txt"):
            fetch_clip_benchmark_wds(f"wds/{name}", tmp_path / "other", split="train", repo_prefix=f"{prefix}/",
                                     endpoint=hub.endpoint, backoff_s=0)  # fmt: skip
        assert not (tmp_path / "other").exists()
    finally:
        hub.close()


# ------------------------------------------------------------------------------------------------ SugarCrepe

SUGAR_CREPE_IMAGES = {  # COCO-style names; one grayscale image, as COCO val2017 has some
    "000000000139.jpg": Image.new("RGB", (48, 40), (200, 40, 40)),
    "000000000285.jpg": Image.new("L", (40, 56), 90),
    "000000000632.jpg": Image.new("RGB", (64, 64), (30, 60, 210)),
}
SUGAR_CREPE_ADD_ATT = {  # ids are not contiguous in the real files either
    "0": {"filename": "000000000139.jpg", "caption": "a red square", "negative_caption": "a red square and a dog"},
    "3": {"filename": "000000000285.jpg", "caption": "a grey wall", "negative_caption": "a grey wall with a window"},
    "7": {"filename": "000000000632.jpg", "caption": "the blue sky", "negative_caption": "the cloudy blue sky"},
}
BAD_ANNOTATIONS = {
    "missing_negative": (
        {"0": SUGAR_CREPE_ADD_ATT["0"], "1": {"filename": "000000000285.jpg", "caption": "a wall"}},
        r"record '1': 'negative_caption' is None",
    ),
    "not_an_object": ([SUGAR_CREPE_ADD_ATT["0"]], "expected a non-empty JSON object"),
    "path_in_filename": (
        {"5": {**SUGAR_CREPE_ADD_ATT["0"], "filename": "../000000000139.jpg"}},
        "record '5': filename '../000000000139.jpg' is not a plain file name",
    ),
}


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sugar_crepe(tmp_path_factory):
    """SugarCrepe's add_att task, fetched over HTTP from 127.0.0.1 with the workflow's own functions."""
    images = {name: jpeg_bytes(image) for name, image in SUGAR_CREPE_IMAGES.items()}
    archive = zip_bytes({"val2017/": b"", **{f"val2017/{n}": data for n, data in images.items()}, "LICENSE.txt": b"cc"})
    annotations = json.dumps(SUGAR_CREPE_ADD_ATT).encode()
    files = {"/zips/val2017.zip": archive, "/data/add_att.json": annotations, "/page.html": b"<html>moved</html>"}
    files.update({f"/data/{name}.json": json.dumps(body).encode() for name, (body, _) in BAD_ANNOTATIONS.items()})
    server = FileServer(files)
    root = tmp_path_factory.mktemp("eval") / "sugar_crepe"
    try:
        fetched_images = fetch_sugar_crepe_images(
            f"{server.url}/zips/val2017.zip", root / "val2017", sha256=hashlib.sha256(archive).hexdigest(), backoff_s=0
        )
        url = "{base}/data/{task}.json".format(base=server.url, task="add_att")  # the config's template
        fetched_task = fetch_sugar_crepe_task(url, root / "add_att.json", backoff_s=0)
        yield types.SimpleNamespace(
            root=root, server=server, images=images, annotations=annotations, archive=archive,
            fetched_images=fetched_images, fetched_task=fetched_task,
        )  # fmt: skip
    finally:
        server.close()


@pytest.fixture
def no_wget(monkeypatch):
    """clip-benchmark shells out to wget/unzip for missing SugarCrepe files: make any such call fail."""
    import clip_benchmark.datasets.builder as builder

    def refuse(cmd, **kwargs):
        raise AssertionError(f"clip-benchmark tried to download: {cmd}")

    monkeypatch.setattr(builder, "call", refuse)


def test_sugar_crepe_fetch_lays_out_what_clip_benchmark_reads(sugar_crepe, no_wget):
    from clip_benchmark.datasets.builder import build_dataset

    root = sugar_crepe.root
    assert sorted(p.name for p in root.iterdir()) == ["add_att.json", "val2017"]  # no temp file or archive left
    assert sorted(p.name for p in root.parent.iterdir()) == ["sugar_crepe"]
    assert {p.name: p.read_bytes() for p in (root / "val2017").iterdir()} == sugar_crepe.images
    assert (root / "add_att.json").read_bytes() == sugar_crepe.annotations  # kept byte for byte
    images = sugar_crepe.fetched_images
    assert images["files"] == images["images"] == 3 and images["skipped"] == 1  # LICENSE.txt is outside val2017/
    assert images["sha256"] == hashlib.sha256(sugar_crepe.archive).hexdigest()
    task = sugar_crepe.fetched_task
    assert (task["samples_in"], task["samples_out"], task["samples_skipped"]) == (3, 3, 0)
    assert task["counters"] == {"images": 3} and task["shard"] == "add_att"
    assert task["info"]["source"]["url"].endswith("/data/add_att.json")

    dataset = build_dataset("sugar_crepe/add_att", root=str(root), transform=None, task="image_caption_selection")
    assert len(dataset) == 3
    for i, record in enumerate(SUGAR_CREPE_ADD_ATT.values()):
        image, captions = dataset[i]
        expected = SUGAR_CREPE_IMAGES[record["filename"]]
        assert image.size == expected.size and image.mode == expected.mode
        assert captions == [record["caption"], record["negative_caption"]]


def test_sugar_crepe_evaluation_matches_hand_computation(sugar_crepe, no_wget, tmp_path):
    """One real evaluation through run_benchmark (what rule eval_benchmark calls) with a tiny checkpoint."""
    import open_clip
    import torch
    import torch.nn.functional as F

    from powerclip.evaluation.loader import eval_transform
    from powerclip.evaluation.runner import run_benchmark
    from powerclip.model import create_model, save_checkpoint

    model = create_model("PowerCLIP-Tiny-64-8", seed=0).eval()
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", model)
    out = tmp_path / "sugar_crepe_add_att.json"
    result = run_benchmark(
        checkpoint, "sugar_crepe/add_att", sugar_crepe.root, "image_caption_selection", out, device="cpu"
    )
    assert json.loads(out.read_text()) == result and result["dataset"] == "sugar_crepe/add_att"
    metrics = result["metrics"]
    assert 0.0 <= metrics["acc"] <= 1.0 and metrics["tie_rate"] == 0.0

    records = list(SUGAR_CREPE_ADD_ATT.values())
    transform = eval_transform(model)
    with torch.no_grad():  # batched like clip-benchmark: all images, then all captions, in one batch each
        pixels = torch.stack([transform(Image.open(sugar_crepe.root / "val2017" / r["filename"])) for r in records])
        images = F.normalize(model.encode_image(pixels), dim=-1)
        captions = [c for r in records for c in (r["caption"], r["negative_caption"])]
        texts = F.normalize(model.encode_text(open_clip.get_tokenizer("PowerCLIP-Tiny-64-8")(captions)), dim=-1)
    scores = (images[:, None, :] * texts.view(len(records), 2, -1)).sum(-1)
    margins = scores[:, 0] - scores[:, 1]
    assert margins.abs().min() > 1e-5  # no near-tie that float noise could flip
    assert metrics["acc"] == metrics["text_acc_ties_split"] == pytest.approx((margins > 0).double().mean().item())


@pytest.mark.parametrize("name", sorted(BAD_ANNOTATIONS))
def test_fetch_sugar_crepe_task_rejects_bad_annotations(sugar_crepe, tmp_path, name):
    url = f"{sugar_crepe.server.url}/data/{name}.json"
    with pytest.raises(ValueError, match=re.escape(url) + ": .*" + BAD_ANNOTATIONS[name][1]):
        fetch_sugar_crepe_task(url, tmp_path / "task" / "add_att.json", backoff_s=0)
    assert list((tmp_path / "task").iterdir()) == []  # nothing moved into place, no temp file left


def test_fetch_sugar_crepe_task_errors_name_the_url(sugar_crepe, tmp_path):
    page = f"{sugar_crepe.server.url}/page.html"
    with pytest.raises(ValueError, match=re.escape(page) + ": not a JSON file"):
        fetch_sugar_crepe_task(page, tmp_path / "add_att.json", backoff_s=0)
    missing = f"{sugar_crepe.server.url}/data/add_color.json"
    with pytest.raises(DownloadError, match=re.escape(missing) + ": HTTP 404; check the annotations URL"):
        fetch_sugar_crepe_task(missing, tmp_path / "add_att.json", backoff_s=0)
    assert list(tmp_path.iterdir()) == []


