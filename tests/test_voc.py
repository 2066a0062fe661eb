"""PASCAL VOC 2012 zero-shot segmentation: the fetcher on a tiny copy of the release served from 127.0.0.1 (its
own folder layout inside ``VOCdevkit/VOC2012/``), corrupt and unsafe archives refused, and the segmentation
code on the fetched folder with a model whose right answer is known."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from powerclip.evaluation.fetch import fetch_voc
from powerclip.evaluation.metrics import segmentation_metrics
from powerclip.evaluation.regions import segmentation_confusion_of, voc_segmentation
from powerclip.evaluation.voc import VOC_CLASSES, voc_files, voc_prompts
from powerclip.fetch.http import DownloadError, extract_tar

from servers import FileServer

PERSON = VOC_CLASSES.index("person")
PALETTE = [0, 0, 0, 128, 0, 0] + [0] * 3 * 254  # a VOC-like palette; only the indices matter


def voc_images() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """Grey images with a red block labelled person, a void ring around it (255), aligned to 8 px patches."""
    out = {}
    for image_id, (width, x0) in {"2007_000032": (64, 16), "2007_000033": (96, 40)}.items():
        pixels = np.full((64, width, 3), 128, dtype=np.uint8)
        label = np.zeros((64, width), dtype=np.uint8)
        label[7:33, x0 - 1 : x0 + 17] = 255  # void border, as VOC draws it around objects
        pixels[8:32, x0 : x0 + 16] = (220, 20, 20)
        label[8:32, x0 : x0 + 16] = PERSON
        if width == 96:  # a person outside the centre crop (x 16..80): never scored
            pixels[40:56, 0:8] = (220, 20, 20)
            label[40:56, 0:8] = PERSON
        out[image_id] = (Image.fromarray(pixels), label)
    return out


def voc_tar(extra: list[tuple[str, bytes]] = (), links: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        base = "VOCdevkit/VOC2012"
        images = voc_images()
        add(f"{base}/ImageSets/Segmentation/val.txt", ("\n".join(images) + "\n").encode())
        add(f"{base}/ImageSets/Segmentation/train.txt", b"2008_000001\n")
        add(f"{base}/JPEGImages/2008_000001.jpg", b"not in the val split")
        for image_id, (image, label) in images.items():
            jpg, png = io.BytesIO(), io.BytesIO()
            image.save(jpg, format="JPEG", quality=100)
            mask = Image.fromarray(label, mode="P")
            mask.putpalette(PALETTE)
            mask.save(png, format="PNG")
            add(f"{base}/JPEGImages/{image_id}.jpg", jpg.getvalue())
            add(f"{base}/SegmentationClass/{image_id}.png", png.getvalue())
        for name, data in extra:
            add(name, data)
        if links:
            info = tarfile.TarInfo(f"{base}/JPEGImages/link.jpg")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


@pytest.fixture(scope="module")
def release():
    archive = voc_tar()
    server = FileServer({"/voc/VOCtrainval_11-May-2012.tar": archive})
    try:
        yield server, archive
    finally:
        server.close()


def test_fetch_voc_keeps_the_val_split_in_its_own_layout(release, tmp_path):
    server, archive = release
    out = tmp_path / "voc2012"
    summary = fetch_voc(f"{server.url}/voc/VOCtrainval_11-May-2012.tar", out, sha256=hashlib.sha256(archive).hexdigest(),
                        backoff_s=0)  # fmt: skip
    assert summary["images"] == 2 and summary["split"] == "val" and summary["sha256"] == hashlib.sha256(archive).hexdigest()
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "ImageSets/Segmentation/val.txt", "JPEGImages/2007_000032.jpg", "JPEGImages/2007_000033.jpg",
        "SegmentationClass/2007_000032.png", "SegmentationClass/2007_000033.png",
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voc2012"]  # no archive or work folder left
    assert [i for i, _, _ in voc_files(out)] == ["2007_000032", "2007_000033"]


def test_a_corrupt_archive_is_refused(release, tmp_path):
    server, archive = release
    url = f"{server.url}/voc/VOCtrainval_11-May-2012.tar"
    with pytest.raises(DownloadError, match="sha256 .* does not match"):
        fetch_voc(url, tmp_path / "voc2012", sha256="0" * 64, retries=2, backoff_s=0)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:  # cut inside the last label's data
        last = tar.getmember("VOCdevkit/VOC2012/SegmentationClass/2007_000033.png")
    cut = FileServer({"/voc.tar": archive[: last.offset_data + last.size // 2], "/junk.tar": b"<html>not a tar</html>" * 40})
    try:
        with pytest.raises((DownloadError, ValueError), match="cut short|corrupt|not a readable tar"):
            fetch_voc(f"{cut.url}/voc.tar", tmp_path / "voc2012", backoff_s=0)
        with pytest.raises(DownloadError, match="not a readable tar file"):
            fetch_voc(f"{cut.url}/junk.tar", tmp_path / "voc2012", backoff_s=0)
    finally:
        cut.close()
    assert not (tmp_path / "voc2012").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra, links",
    [([("../../evil.txt", b"x")], False), ([("/tmp/evil.txt", b"x")], False), ([("VOCdevkit/VOC2012/../../up.txt", b"x")], False),
     ([], True)],
)  # fmt: skip
def test_an_unsafe_archive_is_refused_before_anything_is_written(tmp_path, extra, links):
    archive = tmp_path / "unsafe.tar"
    archive.write_bytes(voc_tar(extra, links))
    with pytest.raises(ValueError, match="unsafe member|is a link"):
        extract_tar(archive, tmp_path / "out", subdir="VOCdevkit/VOC2012")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["unsafe.tar"]
    server = FileServer({"/unsafe.tar": archive.read_bytes()})
    try:
        with pytest.raises(DownloadError, match="unsafe member|is a link"):
            fetch_voc(f"{server.url}/unsafe.tar", tmp_path / "voc2012", backoff_s=0)
    finally:
        server.close()
    assert not (tmp_path / "voc2012").exists()


class RedIsPerson(nn.Module):
    """Patch token = (share of grey, share of red pixels) on the background / person axes; a token of text: its class
    word's axis for "background" and "person", a last axis that no patch has for every other token."""

    image_size, patch_size = 64, 8

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.register_buffer("mean", torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1))
        self.background, self.person = (int(tokenizer([w])[0][1]) for w in ("background", "person"))

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        rgb = (images * self.std + self.mean) * 255
        red = ((rgb[:, 0] > 170) & (rgb[:, 1] < 80)).float()  # (B, H, W)
        share = nn.functional.avg_pool2d(red[:, None], 8).flatten(1)  # (B, 64 patches)
        tokens = torch.zeros(*share.shape, len(VOC_CLASSES) + 1)
        tokens[..., 0], tokens[..., PERSON] = 1 - share, share
        return tokens

    def text_tokens(self, text: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*text.shape, len(VOC_CLASSES) + 1)
        out[..., 0] = (text == self.background).float()
        out[..., PERSON] = (text == self.person).float()
        out[..., -1] = ((text != self.background) & (text != self.person) & (text != 0)).float()
        return out

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        return self.text_tokens(text).sum(dim=1)


def test_segmentation_of_the_fetched_folder_scores_the_centre_crop(release, tmp_path):
    import open_clip
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier
    from open_clip.transform import image_transform

    server, archive = release
    out = tmp_path / "voc2012"
    fetch_voc(f"{server.url}/voc/VOCtrainval_11-May-2012.tar", out, sha256=hashlib.sha256(archive).hexdigest())
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    model = RedIsPerson(tokenizer)
    data, classnames, prompts = voc_segmentation(out, image_transform(64, is_train=False))
    assert classnames == list(VOC_CLASSES) and prompts == voc_prompts() and len(data) == 2
    assert prompts["aeroplane"] == ["a photo of an aeroplane"] and prompts["person"] == ["a photo of a person"]
    classifier = zero_shot_classifier(model, tokenizer, classnames, prompts, "cpu", amp=False)
    confusion = segmentation_confusion_of(model, classifier, data, batch_size=2)
    # scored: 64 x 64 pixels per image (the 96 px one cropped to x 16..80) minus the void ring
    void = 26 * 18 - 24 * 16
    assert confusion.sum() == 2 * (64 * 64 - void)
    # the patch logits are upsampled bilinearly (as CLIPpy upsamples its patch features), which rounds each corner
    # of the 3 x 2-patch person: a pixel d, e px inside a corner has person weight (0.5625 + d/8)(0.5625 + e/8),
    # below 1/2 for (d, e) in (0,0) (0,1) (1,0) (0,2) (2,0) (1,1): 6 pixels a corner, 24 an image, lost to background
    assert confusion[PERSON, PERSON] == 2 * (24 * 16 - 24) and confusion[PERSON, 0] == 2 * 24
    assert confusion.trace() + confusion[PERSON, 0] == confusion.sum()
    background = 64 * 64 - void - 24 * 16
    metrics = segmentation_metrics(confusion)
    assert metrics["miou"] == pytest.approx(((2 * background) / (2 * background + 48) + 720 / 768) / 2)
    assert metrics["jaccard"] == pytest.approx(720 / 768)
