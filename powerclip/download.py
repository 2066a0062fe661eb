"""Fetch stage: turn one source shard into ``resources/<dataset>/shards/<shard>.tar``.

Three sources feed the same output format (a WebDataset tar whose samples all carry a decodable image
and a non-empty UTF-8 ``txt`` caption, plus ``<shard>.stats.json`` written by the caller from
:class:`~powerclip.shards.StageStats`):

``local``
    Existing WebDataset tars on disk (a directory, a glob or a brace pattern, see
    :func:`expand_local_pattern`). :func:`fetch_local_shard` validates and repackages one of them.

``img2dataset``
    A URL list (e.g. CC12M's official ``cc12m.tsv``: ``url<TAB>caption``, no header).
    :func:`split_url_list` cuts it into one small TSV per shard, then :func:`fetch_img2dataset_shard`
    runs the img2dataset CLI on one part and repackages its output. img2dataset 1.47.0 pins
    ``webdataset<0.3`` and ``pandas<3``, so it lives in its own environment (``.venv-img2dataset``
    locally, ``envs/download.yaml`` on a cluster) and is only ever run as a subprocess: this module
    never imports it.

``huggingface``
    A released shard on the Hugging Face Hub (e.g. the official PowerCLIP combined format with
    ``jpg``/``txt``/``njson``/``samlens.npy``/``samcat.npy`` members). :func:`fetch_huggingface_shard`
    downloads it with ``huggingface_hub`` (retries on network errors, size and sha256 checks against the
    Hub's metadata) and repackages it keeping the release's keys.

Every source ends in :func:`repackage_shard`, which copies the kept samples byte for byte (all fields,
not just image and caption) into an atomically written tar and counts every dropped sample under a
reason, so ``samples_in == samples_out + samples_skipped`` holds for the fetch stage too.

Evaluation data is fetched here as well, where the internet is (compute nodes often have none):
clip-benchmark's WebDataset copies on the Hub (:func:`fetch_clip_benchmark_wds`) and SugarCrepe's COCO
images and caption pairs (:func:`fetch_sugar_crepe_images`, :func:`fetch_sugar_crepe_task`), both laid out
so that clip-benchmark finds them and never downloads anything itself.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from powerclip.shards import (
    ShardFormatError,
    ShardWriter,
    StageStats,
    atomic_output,
    atomic_output_dir,
    decode_image,
    image_field,
    iter_samples,
    split_member_name,
)

log = logging.getLogger(__name__)

__all__ = [
    "DownloadError",
    "clip_benchmark_repo",
    "extract_zip",
    "fetch_checkpoint",
    "fetch_clip_benchmark_wds",
    "fetch_huggingface_shard",
    "fetch_img2dataset_shard",
    "fetch_local_shard",
    "fetch_sugar_crepe_images",
    "fetch_sugar_crepe_task",
    "fetch_url",
    "read_sugar_crepe_annotations",
    "repackage_shard",
    "split_url_list",
]

# Header of the per-shard URL lists written by split_url_list and read by img2dataset.
PART_COLUMNS = ("url", "caption")
# How many error messages from img2dataset's status_dict are logged per shard.
LOGGED_IMG2DATASET_ERRORS = 20
# Lines of img2dataset output quoted in an error message.
IMG2DATASET_TAIL_LINES = 40
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_IMG2DATASET_HINT = (
    "img2dataset lives in its own environment because it pins webdataset<0.3 and pandas<3: run `make venv` "
    "(creates .venv-img2dataset) or use the conda env envs/download.yaml, or pass the absolute path of its "
    "`img2dataset` executable"
)


class DownloadError(RuntimeError):
    """A source shard could not be fetched; the message names the source and what to do next."""


# --------------------------------------------------------------------------------------------------------
# Repackaging (shared by all sources)
# --------------------------------------------------------------------------------------------------------


def _check_sample(sample: dict) -> tuple[str, str | None] | None:
    """Why a raw sample cannot be used, as ``(reason, detail)``, or None if it is fine."""
    ext = image_field(sample)
    if ext is None:
        fields = sorted(k for k in sample if not k.startswith("__"))
        return "missing_image", f"fields {fields}"
    try:
        decode_image(sample[ext])
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the image is unusable
        return "image_not_decodable", f"{ext}: {type(exc).__name__}: {exc}"
    if "txt" not in sample:
        return "missing_caption", None
    try:
        caption = sample["txt"].decode("utf-8")
    except UnicodeDecodeError as exc:
        return "caption_not_utf8", str(exc)
    if not caption.strip():
        return "empty_caption", None
    return None


def _check_rekey(rekey: str | None) -> None:
    if rekey is not None and (not rekey or "." in rekey or "/" in rekey):
        raise ValueError(f"rekey={rekey!r}: a shard name used as key prefix must be non-empty, without '.' or '/'")


def _repackage_samples(
    samples: Iterable[dict], src_name: str, out_tar: str | os.PathLike, stats: StageStats, rekey: str | None
) -> None:
    _check_rekey(rekey)
    out_tar = Path(out_tar)
    n_in = n_out = 0
    with ShardWriter(out_tar) as writer:
        for i, sample in enumerate(samples):
            n_in += 1
            stats.samples_in += 1
            key = sample["__key__"]
            problem = _check_sample(sample)
            if problem is not None:
                reason, detail = problem
                stats.skip(reason, key, detail)
                continue
            new_key = f"{rekey}_{i:06d}" if rekey is not None else key
            writer.write(new_key, {ext: data for ext, data in sample.items() if not ext.startswith("__")})
            n_out += 1
            stats.samples_out += 1
    if n_out == 0:
        log.warning("%s -> %s: no usable sample out of %d (see the skip reasons above)", src_name, out_tar, n_in)
    else:
        log.info("%s -> %s: kept %d of %d samples", src_name, out_tar, n_out, n_in)


def repackage_shard(
    src_tar: str | os.PathLike, out_tar: str | os.PathLike, stats: StageStats, rekey: str | None = None
) -> None:
    """Copy the usable samples of ``src_tar`` into ``out_tar`` (atomically), byte for byte.

    A sample is kept if it has an image (``jpg``/``jpeg``/``png``/``webp``) that decodes and a ``txt``
    caption that is valid UTF-8 and not blank; every other sample is counted in ``stats`` under
    ``missing_image``, ``image_not_decodable``, ``missing_caption``, ``caption_not_utf8`` or
    ``empty_caption``. Kept samples keep all their fields unchanged. With ``rekey`` (a shard name) the
    kept samples are renamed ``f"{rekey}_{i:06d}"``, ``i`` counting the input samples (skipped ones
    included), e.g. for img2dataset output whose keys repeat across parts.

    Raises :class:`~powerclip.shards.ShardFormatError` (naming the file) if ``src_tar`` is not a readable
    tar; ``out_tar`` is then not created.
    """
    _repackage_samples(iter_samples(src_tar), str(src_tar), out_tar, stats, rekey)


# --------------------------------------------------------------------------------------------------------
# Local tars
# --------------------------------------------------------------------------------------------------------


def fetch_local_shard(src: str | Path, out_tar: str | os.PathLike, stats: StageStats) -> None:
    """Validate and repackage one existing local tar (keys unchanged)."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(
            f"local shard {src} does not exist (shard {stats.shard!r}); check the local source pattern in the config "
            "or re-create the file"
        )
    stats.info.setdefault("source", {"type": "local", "path": str(src)})
    repackage_shard(src, out_tar, stats)


# --------------------------------------------------------------------------------------------------------
# img2dataset
# --------------------------------------------------------------------------------------------------------


def _part_writer(handle) -> csv.writer:
    # Quote only where needed, doubling quotes: exactly what pyarrow's CSV reader (used by img2dataset with
    # delimiter "\t", quote_char '"', double_quote=True) parses back to the same strings.
    return csv.writer(handle, delimiter="\t", quotechar='"', quoting=csv.QUOTE_MINIMAL, lineterminator="\n")


def _part_reader(handle) -> Iterator[list[str]]:
    return csv.reader(handle, delimiter="\t", quotechar='"', doublequote=True, strict=True)


def _split_line(line: str, sep: str, quoted: bool) -> list[str]:
    if quoted:
        return next(csv.reader([line], delimiter=sep, quotechar='"', doublequote=True, strict=True), [])
    return line.split(sep)


def split_url_list(
    url_list: str | Path,
    out_dir: str | Path,
    shard_names: list[str],
    samples_per_shard: int,
    url_col: str = "url",
    caption_col: str = "caption",
    sep: str = "\t",
    header: bool = True,
    *,
    quoted: bool = False,
) -> dict:
    """Cut a URL list into one ``out_dir/<shard>.tsv`` per shard (header ``url<TAB>caption``), streaming.

    Data row ``r`` (0-based, header excluded) goes to part ``r // samples_per_shard``, i.e. shard
    ``shard_names[r // samples_per_shard]``; rows past the last shard are counted, not written. With
    ``header=True`` the columns are found by name (``url_col``, ``caption_col``); with ``header=False``
    (CC12M's official file) column 0 is the URL and column 1 the caption. Fields are split on ``sep``
    literally (CC12M captions contain bare quotes); ``quoted=True`` reads CSV-style double-quoted
    fields instead (one line per row). Rows that are not UTF-8, have the wrong number of columns, an empty
    URL or a blank caption are skipped and counted. Every part file is written atomically, also when it
    ends up empty (the input was shorter than expected; a warning is logged).

    Returns ``{"rows_read", "rows_written", "rows_skipped_by_reason", "rows_beyond_last_shard", "parts"}``
    with ``rows_read == rows_written + sum(rows_skipped_by_reason) + rows_beyond_last_shard`` and
    ``parts = {shard: {"path": ..., "rows": n}}``.
    """
    url_list = Path(url_list)
    out_dir = Path(out_dir)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not shard_names:
        raise ValueError("split_url_list: shard_names is empty")
    if len(set(shard_names)) != len(shard_names):
        dup = sorted(n for n, c in collections.Counter(shard_names).items() if c > 1)
        raise ValueError(f"split_url_list: duplicate shard names {dup[:5]}")
    bad = [n for n in shard_names if not n or "/" in n or n.startswith(".")]
    if bad:
        raise ValueError(f"split_url_list: shard names {bad[:5]} cannot be used as file names")
    if not url_list.is_file():
        raise FileNotFoundError(f"URL list {url_list} does not exist; download it first (see the dataset's config)")
    out_dir.mkdir(parents=True, exist_ok=True)

    capacity = len(shard_names) * samples_per_shard
    skipped: collections.Counter = collections.Counter()
    logged: collections.Counter = collections.Counter()
    rows_read = rows_written = rows_beyond = 0
    parts: dict[str, dict] = {}

    def skip(reason: str, line_no: int, detail: str = "") -> None:
        skipped[reason] += 1
        logged[reason] += 1
        if logged[reason] <= 20:
            log.warning("%s line %d: skipped (%s)%s", url_list, line_no, reason, f": {detail}" if detail else "")

    part_idx = -1
    ctx = handle = writer = None
    part_rows = 0

    def close_part() -> None:
        nonlocal ctx, handle
        if ctx is None:
            return
        handle.close()
        ctx.__exit__(None, None, None)
        name = shard_names[part_idx]
        parts[name] = {"path": str(out_dir / f"{name}.tsv"), "rows": part_rows}
        ctx = handle = None

    def open_part(idx: int) -> None:
        nonlocal ctx, handle, writer, part_idx, part_rows
        close_part()
        part_idx, part_rows = idx, 0
        ctx = atomic_output(out_dir / f"{shard_names[idx]}.tsv")
        tmp = ctx.__enter__()
        handle = open(tmp, "w", encoding="utf-8", newline="")
        writer = _part_writer(handle)
        writer.writerow(PART_COLUMNS)

    try:
        with open(url_list, "rb") as raw:
            url_i, cap_i, n_cols = 0, 1, 2
            line_no = 0
            if header:
                first = raw.readline()
                line_no = 1
                try:
                    names = [c.strip() for c in _split_line(first.decode("utf-8-sig").rstrip("\r\n"), sep, quoted)]
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{url_list}: header line is not UTF-8 ({exc})") from exc
                missing = [c for c in (url_col, caption_col) if c not in names]
                if missing:
                    raise ValueError(
                        f"{url_list}: header has no column(s) {missing} (columns: {names}); set url_col/caption_col, "
                        "or header: false for a file without header (CC12M's cc12m.tsv has none)"
                    )
                url_i, cap_i, n_cols = names.index(url_col), names.index(caption_col), len(names)
            for line_bytes in raw:
                line_no += 1
                row_idx = rows_read
                rows_read += 1
                if row_idx >= capacity:
                    rows_beyond += 1
                    continue
                if row_idx // samples_per_shard != part_idx:
                    for idx in range(part_idx + 1, row_idx // samples_per_shard + 1):
                        open_part(idx)
                try:
                    line = line_bytes.decode("utf-8-sig" if line_no == 1 else "utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    skip("not_utf8", line_no, str(exc))
                    continue
                try:
                    fields = _split_line(line, sep, quoted)
                except csv.Error as exc:
                    skip("malformed_quoting", line_no, str(exc))
                    continue
                if len(fields) != n_cols:
                    skip("wrong_column_count", line_no, f"{len(fields)} columns, expected {n_cols}")
                    continue
                # A lone \r inside a field would end the row for pyarrow's reader (newlines_in_values=False).
                url, caption = fields[url_i].strip(), fields[cap_i].replace("\r", " ")
                if not url:
                    skip("empty_url", line_no)
                    continue
                if not caption.strip():
                    skip("empty_caption", line_no)
                    continue
                writer.writerow((url, caption))
                part_rows += 1
                rows_written += 1
        # Parts the input did not reach still get a (header-only) file: they are workflow outputs.
        for idx in range(part_idx + 1, len(shard_names)):
            open_part(idx)
        close_part()
    except BaseException as exc:
        if handle is not None:
            handle.close()
            ctx.__exit__(type(exc), exc, exc.__traceback__)
        raise

    empty = [name for name, part in parts.items() if part["rows"] == 0]
    if empty:
        log.warning(
            "%s: %d of %d parts are empty (%s%s): the URL list has only %d rows for %d shards x %d",
            url_list,
            len(empty),
            len(parts),
            ", ".join(empty[:5]),
            " ..." if len(empty) > 5 else "",
            rows_read,
            len(shard_names),
            samples_per_shard,
        )
    if rows_beyond:
        log.info("%s: %d rows beyond the last shard were not used", url_list, rows_beyond)
    summary = {
        "url_list": str(url_list),
        "rows_read": rows_read,
        "rows_written": rows_written,
        "rows_skipped_by_reason": dict(sorted(skipped.items())),
        "rows_beyond_last_shard": rows_beyond,
        "parts": parts,
    }
    assert rows_read == rows_written + sum(skipped.values()) + rows_beyond, summary
    log.info(
        "%s: %d rows read, %d written into %d parts, %d skipped %s, %d beyond the last shard",
        url_list,
        rows_read,
        rows_written,
        len(parts),
        sum(skipped.values()),
        dict(skipped) or "",
        rows_beyond,
    )
    return summary


def _count_part_rows(part_tsv: Path) -> int:
    with open(part_tsv, encoding="utf-8", newline="") as handle:
        rows = _part_reader(handle)
        head = next(rows, None)
        if head is None or tuple(head) != PART_COLUMNS:
            raise ValueError(f"{part_tsv}: not a URL-list part (first line {head!r}, expected {list(PART_COLUMNS)})")
        return sum(1 for _ in rows)


def _find_executable(executable: str) -> str:
    if os.sep in executable or (os.altsep and os.altsep in executable):
        path = Path(executable).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path.resolve())
        raise DownloadError(
            f"img2dataset executable {executable} does not exist or is not executable. {_IMG2DATASET_HINT}"
        )
    found = shutil.which(executable)
    if found is None:
        raise DownloadError(f"img2dataset executable {executable!r} is not on PATH. {_IMG2DATASET_HINT}")
    return found


def _iter_tar_sorted(path: Path) -> Iterator[dict]:
    """Samples of a (seekable) tar in key order, whatever order the members were written in.

    img2dataset writes samples as its download threads finish; sorting its zero-padded keys restores the
    row order of the URL list, so reruns give the same keys for the same images.
    """
    try:
        tar = tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError) as exc:
        raise ShardFormatError(f"{path}: not a readable tar file ({exc})") from exc
    with tar:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if not ext or key.split("/")[-1].startswith("_"):
                    continue
                fields = groups.setdefault(key, {})
                if ext in fields:
                    raise ShardFormatError(f"{path}: sample {key!r} has two '{ext}' members")
                fields[ext] = member
            for key in sorted(groups, key=lambda k: (len(k), k)):
                sample = {"__key__": key}
                for ext, member in groups[key].items():
                    sample[ext] = tar.extractfile(member).read()
                yield sample
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise ShardFormatError(f"{path}: corrupt tar ({exc})") from exc


def fetch_img2dataset_shard(
    part_tsv: str | Path,
    out_tar: str | os.PathLike,
    stats: StageStats,
    shard_name: str,
    image_size: int = 256,
    executable: str = "img2dataset",
    processes: int = 1,
    threads: int = 4,
    retries: int = 2,
    timeout: int = 10,
    resize_mode: str = "keep_ratio",
    extra_args: list[str] | None = None,
    workdir: str | Path | None = None,
) -> dict:
    """Download the URLs of one part (written by :func:`split_url_list`) with the img2dataset CLI.

    Runs ``img2dataset`` (found on PATH or given as a path) into a temporary folder (under ``workdir``,
    default: beside ``out_tar``), then repackages its single output tar into ``out_tar`` with keys
    ``f"{shard_name}_{i:06d}"`` in URL-list order (image re-encoded by img2dataset as ``jpg``, plus ``txt``
    and img2dataset's ``json`` metadata with the URL). Rows img2dataset could not use are counted in
    ``stats`` as ``download_failed`` / ``resize_failed`` (their error messages are logged and kept in
    ``stats.info``), so ``samples_in`` (= rows of the part) == ``samples_out + samples_skipped``.
    Returns img2dataset's own ``*_stats.json`` dict.
    """
    part_tsv = Path(part_tsv).resolve()
    out_tar = Path(out_tar)
    _check_rekey(shard_name)
    if not part_tsv.is_file():
        raise FileNotFoundError(
            f"URL-list part {part_tsv} for shard {shard_name!r} does not exist; run split_url_list first"
        )
    exe = _find_executable(executable)
    rows = _count_part_rows(part_tsv)
    info = stats.info.setdefault("source", {})
    info.update({"type": "img2dataset", "part": str(part_tsv), "rows": rows, "image_size": image_size})
    if rows == 0:
        log.warning("%s: part %s has no URL; writing an empty shard", shard_name, part_tsv)
        ShardWriter(out_tar).close()
        stats.check()
        return {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0, "status_dict": {}}

    # Absolute: img2dataset resolves a relative output folder through fsspec against another directory.
    tmp_parent = (Path(workdir) if workdir is not None else out_tar.parent).resolve()
    tmp_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{shard_name}.img2dataset.", dir=tmp_parent) as tmp:
        output_folder = Path(tmp) / "out"
        cmd = [
            exe,
            "--url_list", str(part_tsv),
            "--input_format", "tsv",
            "--url_col", "url",
            "--caption_col", "caption",
            "--output_format", "webdataset",
            "--output_folder", str(output_folder),
            "--processes_count", str(processes),
            "--thread_count", str(threads),
            "--image_size", str(image_size),
            "--resize_mode", resize_mode,
            "--retries", str(retries),
            "--timeout", str(timeout),
            "--number_sample_per_shard", str(max(rows, 1)),
            "--enable_wandb", "False",
            "--distributor", "multiprocessing",
            *(extra_args or []),
        ]  # fmt: skip
        # img2dataset runs in its own environment: keep this process's PYTHONPATH/PYTHONHOME (e.g. the main
        # venv's webdataset 1.x / pandas 3) out of it, and keep wandb from reaching out.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        # albumentations (imported by img2dataset) checks PyPI for updates at import unless told not to.
        env.update(WANDB_MODE="disabled", WANDB_SILENT="true", PYTHONUNBUFFERED="1", NO_ALBUMENTATIONS_UPDATE="1")
        log.info("%s: running %s", shard_name, " ".join(cmd))
        started = time.monotonic()
        tail: collections.deque[str] = collections.deque(maxlen=IMG2DATASET_TAIL_LINES)
        with subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tmp,
            env=env,
            text=True,
            errors="replace",
        ) as proc:
            for line in proc.stdout:
                for piece in line.rstrip("\n").split("\r"):  # tqdm redraws with \r
                    if piece.strip():
                        tail.append(piece)
                        log.debug("img2dataset %s: %s", shard_name, piece)
            rc = proc.wait()
        elapsed = time.monotonic() - started
        output_tail = "\n".join(tail)
        if rc != 0:
            raise DownloadError(
                f"img2dataset failed on shard {shard_name!r} (part {part_tsv}, exit code {rc}); last output:\n"
                f"{output_tail}"
            )
        stats_files = sorted(output_folder.glob("*_stats.json"))
        tars = sorted(output_folder.glob("*.tar"))
        if len(stats_files) != 1 or len(tars) != 1:
            raise DownloadError(
                f"img2dataset did not finish shard {shard_name!r} (part {part_tsv}): expected one .tar and one "
                f"*_stats.json in its output, found {[p.name for p in tars + stats_files]}; last output:\n{output_tail}"
            )
        i2d_stats = json.loads(stats_files[0].read_text())
        log.info(
            "%s: img2dataset done in %.1f s: %s of %s rows downloaded",
            shard_name,
            elapsed,
            i2d_stats.get("successes"),
            i2d_stats.get("count"),
        )

        in_before = stats.samples_in
        _repackage_samples(_iter_tar_sorted(tars[0]), f"{shard_name} (img2dataset)", out_tar, stats, shard_name)
        n_tar = stats.samples_in - in_before

    failed_download = int(i2d_stats.get("failed_to_download", 0))
    failed_resize = int(i2d_stats.get("failed_to_resize", 0))
    if i2d_stats.get("count") != rows:
        log.error(
            "%s: img2dataset read %s rows from %s but the part has %d; "
            "the difference is counted as 'lost_in_img2dataset'",
            shard_name,
            i2d_stats.get("count"),
            part_tsv,
            rows,
        )
    if i2d_stats.get("successes") != n_tar:
        log.warning(
            "%s: img2dataset reports %s successes but its tar holds %d samples",
            shard_name,
            i2d_stats.get("successes"),
            n_tar,
        )
    missing = rows - n_tar
    lost = missing - failed_download - failed_resize
    if missing < 0 or lost < 0:
        out_tar.unlink(missing_ok=True)
        raise DownloadError(
            f"img2dataset output for shard {shard_name!r} does not add up: part has {rows} rows, tar holds {n_tar} "
            f"samples, stats say failed_to_download={failed_download}, failed_to_resize={failed_resize}; "
            "rerun the shard"
        )
    stats.samples_in += missing
    for reason, n in (
        ("download_failed", failed_download),
        ("resize_failed", failed_resize),
        ("lost_in_img2dataset", lost),
    ):
        if n:
            stats.skipped[reason] += n
    status = collections.Counter(i2d_stats.get("status_dict") or {})
    errors = [(msg, n) for msg, n in status.most_common() if msg != "success"]
    for msg, n in errors[:LOGGED_IMG2DATASET_ERRORS]:
        log.warning("%s: img2dataset: %d x %s", shard_name, n, msg)
    if len(errors) > LOGGED_IMG2DATASET_ERRORS:
        log.warning(
            "%s: img2dataset: %d more distinct error messages", shard_name, len(errors) - LOGGED_IMG2DATASET_ERRORS
        )
    info["img2dataset"] = {
        k: i2d_stats.get(k) for k in ("count", "successes", "failed_to_download", "failed_to_resize", "duration")
    }
    info["img2dataset"]["errors"] = dict(errors[:LOGGED_IMG2DATASET_ERRORS])
    stats.check()
    return i2d_stats


# --------------------------------------------------------------------------------------------------------
# Hugging Face Hub
# --------------------------------------------------------------------------------------------------------


def _sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _remove_cached(path: str) -> None:
    """Delete a downloaded file from the hub cache: the snapshot pointer and the blob it points to."""
    blob = os.path.realpath(path)
    Path(path).unlink(missing_ok=True)
    if blob != os.path.abspath(path):
        Path(blob).unlink(missing_ok=True)


def _commit_from_snapshot_path(path: str, filename: str) -> str | None:
    """``<cache>/snapshots/<commit>/<filename>`` -> ``<commit>``."""
    p = Path(path)
    depth = len(Path(filename).parts)
    if len(p.parents) > depth and p.parents[depth].name == "snapshots":
        return p.parents[depth - 1].name
    return None


def fetch_huggingface_shard(
    repo_id: str,
    filename: str,
    out_tar: str | os.PathLike,
    stats: StageStats,
    revision: str = "main",
    repo_type: str = "dataset",
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
    retries: int = 3,
    verify: bool = True,
    *,
    backoff_s: float = 2.0,
    keep_cache: bool = True,
) -> dict:
    """Download ``filename`` of a Hub repo with ``huggingface_hub`` and repackage it into ``out_tar``.

    The file's metadata (size, ETag, commit) comes from a HEAD call (:func:`huggingface_hub.get_hf_file_metadata`),
    the file itself from :func:`huggingface_hub.hf_hub_download` (into ``cache_dir``, default the HF cache:
    ``HF_HUB_CACHE``/``HF_HOME``), retried if the revision moved to another commit in between. ``endpoint``
    overrides ``HF_ENDPOINT`` (a mirror).
    The downloaded size must match the metadata and, when the ETag is a sha256 (LFS files, i.e. tar shards)
    and ``verify`` is set, so must the file's sha256; a mismatch deletes the cached copy and downloads again.
    Network errors, HTTP 408/429/5xx and checksum mismatches are retried ``retries`` times with exponential
    backoff (``backoff_s``, 2x ``backoff_s``, ...); a missing repo, revision or file fails at once. With
    ``HF_HUB_OFFLINE=1`` the file must already be in the cache (it is checked against its blob name).
    Keys of the release are kept. ``keep_cache=False`` removes the cached copy after repackaging.

    Returns ``{"sha256", "size", "commit", "etag", "repo_id", "filename", "revision"}``.
    """
    import httpx2
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        DisabledRepoError,
        FileMetadataError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{repo_type} repo {repo_id!r} revision {revision!r} file {filename!r}"
    where = f" at {endpoint}" if endpoint else ""
    attempts = max(1, retries + 1)
    common = {"repo_type": repo_type, "endpoint": endpoint, "token": token, "cache_dir": cache_dir}
    last_error: BaseException | None = None
    force = False

    for attempt in range(1, attempts + 1):
        if attempt > 1:
            delay = min(backoff_s * 2 ** (attempt - 2), 60.0)
            log.warning("%s: attempt %d/%d in %.1f s (last error: %s)", what, attempt, attempts, delay, last_error)
            time.sleep(delay)
        try:
            if constants.is_offline_mode():
                # No HEAD call possible: take the cached copy, whose blob is named after the ETag.
                path = hf_hub_download(repo_id, filename, revision=revision, local_files_only=True, **common)
                etag = os.path.basename(os.path.realpath(path))
                commit = _commit_from_snapshot_path(path, filename) or revision
                expected_size = None
                log.info("%s: HF_HUB_OFFLINE is set, using the cached copy %s", what, path)
            else:
                url = hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision, endpoint=endpoint)
                meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
                commit, etag, expected_size = meta.commit_hash, meta.etag, meta.size
                # Download by `revision` (not by commit) so the cache records revision -> commit, which an
                # offline rerun (HF_HUB_OFFLINE=1) needs to find the file.
                path = hf_hub_download(repo_id, filename, revision=revision, force_download=force, **common)
                got_commit = _commit_from_snapshot_path(path, filename)
                if got_commit is not None and got_commit != commit:
                    last_error = DownloadError(f"{revision!r} moved from commit {commit} to {got_commit} meanwhile")
                    continue
        except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError, DisabledRepoError) as exc:
            raise DownloadError(
                f"{what} not found on the Hub{where} ({type(exc).__name__}); check repo_id, revision and filename in "
                f"the config, and for a private or gated repo set HF_TOKEN. Hub said: {str(exc).splitlines()[0]}"
            ) from exc
        except LocalEntryNotFoundError as exc:
            if constants.is_offline_mode():
                raise DownloadError(
                    f"{what} is not in the cache {cache_dir or constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is set; "
                    "unset HF_HUB_OFFLINE (or run the download where the Hub is reachable)"
                ) from exc
            last_error = exc  # hf_hub_download could not reach the Hub
            continue
        except OfflineModeIsEnabled as exc:
            raise DownloadError(f"{what}: HF_HUB_OFFLINE is set; unset it to download") from exc
        except FileMetadataError as exc:
            raise DownloadError(
                f"{what}: the server{where} did not answer like a Hugging Face Hub ({exc}); "
                "check `endpoint`/HF_ENDPOINT"
            ) from exc
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status is not None and (status in (408, 429) or status >= 500):
                last_error = exc
                continue
            raise DownloadError(
                f"{what}: HTTP {status} from the Hub{where}; check access rights (HF_TOKEN) and the repo settings. "
                f"Hub said: {str(exc).splitlines()[0]}"
            ) from exc
        except httpx2.TransportError as exc:
            last_error = exc
            continue
        except OSError as exc:
            if exc.errno is not None:
                raise  # a local file-system problem (disk full, permissions): retrying will not help
            last_error = exc  # e.g. huggingface_hub's "Consistency check failed" after a cut download
            continue

        size = os.path.getsize(path)
        sha256 = _sha256_file(path)
        problem = None
        if expected_size is not None and size != expected_size:
            problem = f"size {size} != {expected_size} announced by the Hub"
        elif verify and etag and _SHA256_RE.fullmatch(etag) and sha256 != etag:
            problem = f"sha256 {sha256} != {etag} announced by the Hub"
        if problem is not None:
            log.warning("%s: downloaded file %s is corrupt (%s); deleting it", what, path, problem)
            _remove_cached(path)
            last_error = DownloadError(problem)
            force = True
            if constants.is_offline_mode():
                raise DownloadError(
                    f"{what}: the cached copy was corrupt ({problem}) and has been deleted; HF_HUB_OFFLINE is set, "
                    "so it cannot be downloaded again: unset HF_HUB_OFFLINE"
                )
            continue
        if not (etag and _SHA256_RE.fullmatch(etag)):
            log.info("%s: ETag %r is not a sha256 (not an LFS file); only the size was checked", what, etag)
        break
    else:
        raise DownloadError(
            f"{what}: download failed after {attempts} attempt(s){where}: {last_error}. Check the network (or "
            "HF_ENDPOINT), then rerun; a persistent checksum mismatch means the file on the Hub differs from its "
            "metadata"
        ) from last_error

    result = {
        "sha256": sha256,
        "size": size,
        "commit": commit,
        "etag": etag,
        "repo_id": repo_id,
        "filename": filename,
        "revision": revision,
    }
    stats.info.setdefault("source", {}).update({"type": "huggingface", "repo_type": repo_type, **result})
    log.info("%s: downloaded %d bytes, commit %s, sha256 %s", what, size, commit, sha256)
    repackage_shard(path, out_tar, stats)
    if not keep_cache:
        _remove_cached(path)
    return result


# --------------------------------------------------------------------------------------------------------
# Plain URLs and zip archives (SAM / SAM 2 checkpoints, SugarCrepe's images)
# --------------------------------------------------------------------------------------------------------


def fetch_url(
    url: str,
    out_path: str | os.PathLike,
    sha256: str | None = None,
    retries: int = 3,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
    *,
    what: str = "file",
) -> str:
    """Download ``url`` to ``out_path`` atomically and verify it; returns its sha256.

    The bytes are streamed into a temporary file beside ``out_path`` and renamed into place only when
    complete (as many bytes as the server's Content-Length announced) and, with ``sha256``, matching it:
    the full digest or a prefix of it (PyTorch-hub style: SAM's ``sam_vit_h_4b8939.pth`` carries the first
    six hex digits in its name). A short read or a mismatch is retried like a network error; HTTP 401/403/404
    fail at once. The last failure raises :class:`DownloadError` naming the URL; ``what`` names the file in
    messages ("checkpoint", "image archive"...).
    """
    expected = (sha256 or "").lower() or None
    last: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            with atomic_output(out_path) as tmp:
                digest = hashlib.sha256()
                size = 0
                with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as f:
                    announced = response.headers.get("Content-Length")
                    while chunk := response.read(1 << 20):
                        digest.update(chunk)
                        f.write(chunk)
                        size += len(chunk)
                if announced is not None and announced.isdigit() and size != int(announced):
                    raise DownloadError(f"{url}: got {size} of the {announced} bytes announced (connection cut)")
                got = digest.hexdigest()
                if expected is not None and not got.startswith(expected):
                    raise DownloadError(f"{url}: sha256 {got} does not match the expected {expected}")
            log.info("fetched %s -> %s (%d bytes, sha256 %s)", url, out_path, size, got)
            return got
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403, 404):
                raise DownloadError(f"{url}: HTTP {exc.code}; check the {what} URL in the config") from exc
            last = exc
        except (OSError, DownloadError) as exc:
            last = exc
        log.warning("%s download %s failed (attempt %d of %d): %s", what, url, attempt, retries, last)
        if attempt < retries:
            time.sleep(backoff_s * attempt)
    raise DownloadError(f"could not fetch {url} after {retries} attempts: {last}")


def fetch_checkpoint(url: str, out_path: str | os.PathLike, sha256: str | None = None, **options) -> str:
    """Download a checkpoint file atomically and verify it (:func:`fetch_url` and its options); returns its sha256."""
    return fetch_url(url, out_path, sha256, what="checkpoint", **options)


def _zip_member_path(name: str, archive: Path) -> PurePosixPath:
    """A member name as a relative path; absolute names and ``..`` parts (zip slip) are rejected."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        raise ValueError(
            f"{archive}: unsafe member {name!r} (absolute path or '..'); nothing was extracted. The archive is "
            "not what the config's URL should serve: check the URL"
        )
    return path


def extract_zip(archive: str | os.PathLike, out_dir: str | os.PathLike, subdir: str | None = None) -> dict:
    """Extract a zip file into ``out_dir`` safely and atomically.

    Every member name is checked before anything is written (an absolute path or a ``..`` part rejects the
    whole archive with a ValueError naming the member). The files are extracted into a temporary folder
    beside ``out_dir``, which is renamed into place at the end (replacing an old ``out_dir``), so a failure
    never leaves a half folder. With ``subdir`` (e.g. ``val2017`` for COCO's ``val2017.zip``), that
    top-level folder of the archive becomes ``out_dir`` and the members outside it are skipped and counted.

    Returns ``{"archive", "members", "files", "bytes", "skipped"}``.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    try:
        zf = zipfile.ZipFile(archive)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{archive}: not a readable zip file ({exc}); delete it and fetch it again") from exc
    with zf:
        members = [(info, _zip_member_path(info.filename, archive)) for info in zf.infolist()]
        files = size = skipped = 0
        with atomic_output_dir(out_dir) as tmp:
            for info, rel in members:
                if subdir is not None:
                    if rel.parts[:1] != (subdir,):
                        skipped += 1
                        continue
                    rel = PurePosixPath(*rel.parts[1:])
                if not rel.parts or info.is_dir():
                    tmp.joinpath(*rel.parts).mkdir(parents=True, exist_ok=True)
                    continue
                target = tmp.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except zipfile.BadZipFile as exc:
                    raise ValueError(f"{archive}: member {info.filename!r} is corrupt ({exc}); fetch it again") from exc
                files += 1
                size += info.file_size
            if subdir is not None and files == 0:
                tops = sorted({rel.parts[0] for _, rel in members if rel.parts})
                raise ValueError(f"{archive}: no file under {subdir}/ (top-level entries: {tops[:10]})")
    if skipped:
        log.info("%s: %d members outside %s/ were not extracted", archive, skipped, subdir)
    log.info("%s -> %s: %d files, %d bytes", archive, out_dir, files, size)
    return {"archive": str(archive), "members": len(members), "files": files, "bytes": size, "skipped": skipped}


# --------------------------------------------------------------------------------------------------------
# Evaluation datasets (clip-benchmark's WebDataset copies on the Hub)
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

    Written into a temporary folder beside ``out_dir`` and renamed into place, so a failed download never
    leaves a half dataset. Returns {"repo", "revision", "nshards", "files"}.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    repo = clip_benchmark_repo(dataset, repo_prefix)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    def get(filename: str, local_dir: Path) -> Path:
        for attempt in range(1, retries + 1):
            try:
                return Path(
                    hf_hub_download(
                        repo, filename, repo_type="dataset", revision=revision, local_dir=local_dir, endpoint=endpoint
                    )
                )
            except EntryNotFoundError:
                raise
            except (HfHubHTTPError, OSError) as exc:
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if status in (401, 403, 404) or attempt == retries:
                    raise DownloadError(
                        f"{dataset}: could not fetch {filename} from dataset repo {repo!r} revision {revision!r} ({exc})"
                    ) from exc
                log.warning("%s: %s failed (attempt %d of %d): %s", repo, filename, attempt, retries, exc)
                time.sleep(backoff_s * attempt)
        raise AssertionError("unreachable")

    with atomic_output_dir(out_dir) as tmp:
        try:
            nshards = int(get(f"{split}/nshards.txt", tmp).read_text().strip())
        except EntryNotFoundError as exc:
            raise DownloadError(f"{dataset}: {repo!r} has no {split}/nshards.txt; is the dataset or split name right?") from exc
        files = [f"{split}/nshards.txt"]
        for i in range(nshards):
            get(f"{split}/{i}.tar", tmp)
            files.append(f"{split}/{i}.tar")
        for name in CLIP_BENCHMARK_OPTIONAL_FILES:
            try:
                get(name, tmp)
                files.append(name)
            except EntryNotFoundError:
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

    The archive goes to a temporary folder beside ``out_dir`` (:func:`fetch_url`, with the optional
    ``sha256`` check) and is deleted once extracted (:func:`extract_zip`: safe member names, atomic rename).
    clip-benchmark would otherwise download it itself with ``wget`` on the node that evaluates.
    Returns :func:`extract_zip`'s summary plus ``"url"``, ``"sha256"`` and ``"images"``.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    name = Path(urllib.parse.urlsplit(url).path).name or "archive.zip"
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.download.", dir=out_dir.parent) as tmp:
        digest = fetch_url(url, Path(tmp) / name, sha256, what="image archive", **fetch_options)
        summary = extract_zip(Path(tmp) / name, out_dir, subdir=subdir)
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
