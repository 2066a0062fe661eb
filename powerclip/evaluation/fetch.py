"""Evaluation data, fetched where the internet is (compute nodes often have none), laid out for clip-benchmark.

clip-benchmark's WebDataset copies on the Hub (:func:`fetch_clip_benchmark_wds`) and SugarCrepe's COCO
images and caption pairs (:func:`fetch_sugar_crepe_images`, :func:`fetch_sugar_crepe_task`) land where
clip-benchmark reads them, so it never downloads anything itself (it would ``wget`` SugarCrepe's files on
the node that evaluates). Downloads go through :mod:`powerclip.fetch.http` (its one retry policy, verified
files, safe zip extraction); every output appears atomically.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import urllib.parse
from pathlib import Path, PurePosixPath

from powerclip.fetch.http import DownloadError, extract_zip, fetch_url, retry
from powerclip.fetch.huggingface import NotOnHub, hub_call
from powerclip.shards import StageStats, atomic_output, atomic_output_dir, scratch_dir

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------
# clip-benchmark's WebDataset copies on the Hub
# --------------------------------------------------------------------------------------------------------

CLIP_BENCHMARK_OPTIONAL_FILES = ("dataset_type.txt", "classnames.txt", "zeroshot_classification_templates.txt")


def clip_benchmark_repo(dataset: str, repo_prefix: str = "clip-benchmark/wds_") -> str:
    """``wds/vtab/cifar100`` -> ``clip-benchmark/wds_vtab-cifar100`` (clip-benchmark's own naming)."""
    name = dataset[len("wds/") :] if dataset.startswith("wds/") else dataset
    return f"{repo_prefix}{name.replace('/', '-')}"


def fetch_clip_benchmark_wds(
    dataset: str,
    out_dir: str | os.PathLike,
    split: str = "test",
    revision: str = "main",
    repo_prefix: str = "clip-benchmark/wds_",
    endpoint: str | None = None,
    retries: int = 3,
    backoff_s: float = 2.0,
) -> dict:
    """Download one clip-benchmark WebDataset (``<split>/nshards.txt``, its tars and the metadata files)
    into ``out_dir`` in the layout clip-benchmark reads with ``--dataset_root out_dir``.

    Each file gets ``retries`` attempts against network errors and HTTP 408/429/5xx; a missing repository,
    revision or file fails at once. Written into a temporary folder beside ``out_dir`` and renamed into
    place, so a failed download never leaves a half dataset. Returns {"repo", "revision", "nshards", "files"}.
    """
    from huggingface_hub import hf_hub_download

    repo = clip_benchmark_repo(dataset, repo_prefix)
    out_dir = Path(out_dir)

    def get(filename: str, local_dir: Path) -> Path:
        what = f"{dataset}: {filename} of dataset repo {repo!r} revision {revision!r}"

        def download() -> str:
            return hf_hub_download(
                repo, filename, repo_type="dataset", revision=revision, local_dir=local_dir, endpoint=endpoint
            )

        return Path(retry(lambda: hub_call(download, what), retries, backoff_s, what=what))

    with atomic_output_dir(out_dir) as tmp:
        try:
            nshards = int(get(f"{split}/nshards.txt", tmp).read_text().strip())
        except NotOnHub as exc:
            raise DownloadError(f"{dataset}: {repo!r} has no {split}/nshards.txt; is the dataset or split name right? ({exc})") from exc
        files = [f"{split}/nshards.txt"]
        for i in range(nshards):
            get(f"{split}/{i}.tar", tmp)
            files.append(f"{split}/{i}.tar")
        for name in CLIP_BENCHMARK_OPTIONAL_FILES:
            try:
                get(name, tmp)
                files.append(name)
            except NotOnHub:
                pass  # e.g. retrieval datasets have no class names
        shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping of local_dir
    log.info("%s: %d shards of %s from %s", dataset, nshards, split, repo)
    return {"repo": repo, "revision": revision, "nshards": nshards, "files": files}


# --------------------------------------------------------------------------------------------------------
# SugarCrepe (clip-benchmark's sugar_crepe/<task>: COCO val2017 images + one JSON of caption pairs per task)
# --------------------------------------------------------------------------------------------------------

# What clip-benchmark's SugarCrepe dataset reads from each record of <root>/<task>.json.
SUGAR_CREPE_FIELDS = ("filename", "caption", "negative_caption")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def fetch_sugar_crepe_images(
    url: str, out_dir: str | os.PathLike, sha256: str | None = None, subdir: str = "val2017", **fetch_options
) -> dict:
    """Download COCO's ``val2017.zip`` and extract its ``val2017/`` folder as ``out_dir``.

    The archive goes to a work folder beside ``out_dir`` (:func:`~powerclip.fetch.http.fetch_url`, with the
    optional ``sha256`` check) and is deleted once extracted (:func:`~powerclip.fetch.http.extract_zip`: safe
    member names, atomic rename). clip-benchmark would otherwise download it itself with ``wget`` on the
    node that evaluates. Returns :func:`extract_zip`'s summary plus ``"url"``, ``"sha256"`` and ``"images"``.
    """
    out_dir = Path(out_dir)
    name = Path(urllib.parse.urlsplit(url).path).name or "archive.zip"
    with scratch_dir(out_dir) as tmp:
        digest = fetch_url(url, tmp / name, sha256, what="image archive", **fetch_options)
        summary = extract_zip(tmp / name, out_dir, subdir=subdir)
    images = sum(1 for p in out_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if images == 0:
        shutil.rmtree(out_dir)
        raise DownloadError(f"{url}: no image in its {subdir}/ folder; check the images URL in the config")
    log.info("%s: %d images of %d files in %s", url, images, summary["files"], out_dir)
    return {**summary, "url": url, "sha256": digest, "images": images}


def _sugar_crepe_record_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return f"a {type(record).__name__} instead of an object"
    for field in SUGAR_CREPE_FIELDS:
        value = record.get(field)
        if not isinstance(value, str) or not value.strip():
            return f"{field!r} is {value!r}, not a non-empty string"
    filename = PurePosixPath(record["filename"].replace("\\", "/"))
    if len(filename.parts) != 1 or filename.name in (".", ".."):
        return f"filename {record['filename']!r} is not a plain file name (clip-benchmark joins it to val2017/)"
    return None


def read_sugar_crepe_annotations(path: str | os.PathLike, stats: StageStats, source: str | None = None) -> dict:
    """The records of one SugarCrepe task file, validated; counts go into ``stats``.

    The file is a JSON object keyed by id whose values each have string ``filename`` (a COCO val2017 file
    name), ``caption`` (the positive) and ``negative_caption``. Anything else raises a ValueError naming
    ``source`` (default: ``path``) and the first bad record.
    """
    source = source or str(path)
    try:
        data = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source}: not a JSON file ({exc}); check the annotations URL in the config") from exc
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f"{source}: expected a non-empty JSON object of records keyed by id, got "
            f"{type(data).__name__} of length {len(data) if hasattr(data, '__len__') else '?'}"
        )
    for key, record in data.items():
        stats.samples_in += 1
        problem = _sugar_crepe_record_problem(record)
        if problem is not None:
            raise ValueError(
                f"{source}: record {key!r}: {problem}; every record needs string {list(SUGAR_CREPE_FIELDS)}. "
                "Check the annotations URL in the config"
            )
        stats.samples_out += 1
    stats.counters["images"] = len({record["filename"] for record in data.values()})
    stats.check()
    return data


def fetch_sugar_crepe_task(
    url: str, out_json: str | os.PathLike, sha256: str | None = None, stats: StageStats | None = None, **fetch_options
) -> dict:
    """Download one SugarCrepe task file (e.g. ``add_att.json``) and move it into place once it validates.

    The bytes are kept as served; :func:`read_sugar_crepe_annotations` checks them first, so a wrong URL
    (an HTML page, another JSON) never lands at ``out_json``. Returns the stats as a dict (``samples_in`` =
    records read, ``samples_out`` = records kept, ``counters.images`` = distinct images).
    """
    out_json = Path(out_json)
    if stats is None:
        stats = StageStats(stage="fetch_sugar_crepe_task", shard=out_json.stem)
    with atomic_output(out_json) as tmp:
        digest = fetch_url(url, tmp, sha256, what="annotations", **fetch_options)
        read_sugar_crepe_annotations(tmp, stats, source=url)
    stats.info["source"] = {"type": "url", "url": url, "sha256": digest}
    log.info(
        "%s %s: %d records in, %d out, %d images -> %s",
        stats.stage,
        stats.shard,
        stats.samples_in,
        stats.samples_out,
        stats.counters["images"],
        out_json,
    )
    return stats.to_dict()


# --------------------------------------------------------------------------------------------------------
# PASCAL VOC 2012 segmentation (the zero-shot segmentation benchmark; powerclip.evaluation.voc reads it)
# --------------------------------------------------------------------------------------------------------


def fetch_voc(url: str, out_dir: str | os.PathLike, sha256: str | None = None, split: str | None = None, **fetch_options) -> dict:
    """Download PASCAL VOC 2012's ``VOCtrainval_11-May-2012.tar`` and extract one segmentation split into
    ``out_dir`` in VOC's own layout (``ImageSets/Segmentation/<split>.txt``, its ``JPEGImages/<id>.jpg`` and
    ``SegmentationClass/<id>.png``; nothing else of the 2 GB archive).

    The archive goes to a work folder beside ``out_dir`` (:func:`~powerclip.fetch.http.fetch_url`, checked
    against ``sha256``) and is deleted once extracted (:func:`~powerclip.fetch.http.extract_tar`: every member
    checked first, links and paths outside the folder refused, atomic rename). Returns the extraction summary
    plus ``"url"``, ``"sha256"``, ``"split"`` and ``"images"``.
    """
    from powerclip.evaluation.voc import VOC_SPLIT, VOC_SUBDIR, voc_files
    from powerclip.fetch.http import extract_tar

    split = split or VOC_SPLIT
    out_dir = Path(out_dir)
    listing = PurePosixPath("ImageSets", "Segmentation", f"{split}.txt")
    name = Path(urllib.parse.urlsplit(url).path).name or "voc.tar"
    with scratch_dir(out_dir) as tmp:
        digest = fetch_url(url, tmp / name, sha256, what="PASCAL VOC archive", **fetch_options)
        try:
            extract_tar(tmp / name, tmp / "lists", subdir=VOC_SUBDIR, select=lambda rel: rel == listing)
        except ValueError as exc:
            raise DownloadError(f"{url}: {exc}; no {VOC_SUBDIR}/{listing} in it? Check the VOC URL in the config") from exc
        ids = {line.strip() for line in (tmp / "lists").joinpath(*listing.parts).read_text().splitlines() if line.strip()}
        wanted = {listing} | {PurePosixPath("JPEGImages", f"{i}.jpg") for i in ids}
        wanted |= {PurePosixPath("SegmentationClass", f"{i}.png") for i in ids}
        summary = extract_tar(tmp / name, out_dir, subdir=VOC_SUBDIR, select=lambda rel: rel in wanted)
    try:
        images = len(voc_files(out_dir, split))
    except (FileNotFoundError, ValueError) as exc:
        shutil.rmtree(out_dir)
        raise DownloadError(f"{url}: the {split} split is incomplete ({exc}); check the VOC URL in the config") from exc
    log.info("%s: %s split, %d images and labels in %s", url, split, images, out_dir)
    return {**summary, "url": url, "sha256": digest, "split": split, "images": images}
