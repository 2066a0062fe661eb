"""Source ``img2dataset``: download one URL-list part (see :mod:`powerclip.fetch.url_list`) into one shard.

img2dataset 1.47.0 pins ``webdataset<0.3`` and ``pandas<3``, so it lives in its own environment
(``.venv-img2dataset`` locally, ``envs/download.yaml`` on a cluster) and is only ever run as a
subprocess: this module never imports it. Its output tar is repackaged with keys ``<shard>_<row>`` in
URL-list order; the rows it could not use are counted by reason from its own stats.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from powerclip.fetch.http import DownloadError
from powerclip.fetch.repackage import check_rekey, repackage_samples
from powerclip.fetch.url_list import count_part_rows
from powerclip.shards import ShardFormatError, ShardWriter, StageStats, scratch_dir, split_member_name

if TYPE_CHECKING:
    from powerclip.fetch.registry import ShardJob

log = logging.getLogger(__name__)

# Keys of `datasets.<name>.img2dataset` that configure one shard's download (the others split the URL list).
SHARD_KEYS = ("image_size", "executable", "processes", "threads", "retries", "timeout", "resize_mode", "extra_args")
# How many error messages from img2dataset's status_dict are logged per shard.
LOGGED_IMG2DATASET_ERRORS = 20
# Lines of img2dataset output quoted in an error message.
IMG2DATASET_TAIL_LINES = 40
_IMG2DATASET_HINT = (
    "img2dataset lives in its own environment because it pins webdataset<0.3 and pandas<3: run `make venv` "
    "(creates .venv-img2dataset) or use the conda env envs/download.yaml, or pass the absolute path of its "
    "`img2dataset` executable"
)


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
    check_rekey(shard_name)
    if not part_tsv.is_file():
        raise FileNotFoundError(
            f"URL-list part {part_tsv} for shard {shard_name!r} does not exist; run split_url_list first"
        )
    exe = _find_executable(executable)
    rows = count_part_rows(part_tsv)
    info = stats.info.setdefault("source", {})
    info.update({"type": "img2dataset", "part": str(part_tsv), "rows": rows, "image_size": image_size})
    if rows == 0:
        log.warning("%s: part %s has no URL; writing an empty shard", shard_name, part_tsv)
        ShardWriter(out_tar).close()
        stats.check()
        return {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0, "status_dict": {}}

    # Absolute: img2dataset resolves a relative output folder through fsspec against another directory.
    where = Path(workdir).resolve() if workdir is not None else None
    with scratch_dir(out_tar.resolve(), where) as tmp:
        output_folder = tmp / "out"
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
        repackage_samples(_iter_tar_sorted(tars[0]), f"{shard_name} (img2dataset)", out_tar, stats, shard_name)
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



def fetch(job: ShardJob, stats: StageStats) -> None:
    """This shard's part, ``job.part``, with the download settings of ``datasets.<name>.img2dataset``."""
    opts = {k: v for k, v in job.dataset["img2dataset"].items() if k in SHARD_KEYS}
    opts.setdefault("processes", max(1, job.threads))
    fetch_img2dataset_shard(job.need("part"), job.out_tar, stats, shard_name=job.shard, **opts)
