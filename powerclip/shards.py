"""Shard I/O shared by every stage: atomic outputs, per-stage statistics, reading and writing tars.

Every stage reads a raw WebDataset shard and writes one output tar plus ``<shard>.stats.json``:
``samples_in == samples_out + samples_skipped`` always holds, and each skipped sample is counted under
a reason. Outputs appear under their final name only once complete (temp file + ``os.replace``), so an
interrupted job never leaves a truncated shard behind for the next stage; the temporaries a killed job
left (it cannot clean up after a SIGKILL) are removed when the next job for the same output starts.
Sample keys are checked here too (:func:`key_problem`), so no writer puts a path such as ``../x`` into a
shard that a later ``extractall`` would write outside its folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Fixed member mtime so the same content gives byte-identical tars (determinism tests, checksums).
TAR_MTIME = 0
# How many skipped keys per reason are named in the log (the counts are always complete).
LOGGED_SKIPS_PER_REASON = 20


def umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Temporaries live beside their output as ``.<output name>.<8 random characters>.<kind>``, the random part
# from tempfile (letters, digits, "_"). The kind tells which helper made it, so each helper removes only
# the leftovers of its own kind: a running helper never deletes another one's live temporary of the same output.
_TEMP_RANDOM = r"[a-z0-9_]{8}"
PART, NEW_DIR, OLD_DIR, SCRATCH = "part", "tmp", "old", "scratch"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temporaries(path: str | os.PathLike, kinds: Collection[str]) -> list[Path]:
    """Delete the temporaries of ``path`` of the given kinds that an earlier, killed job left beside it.

    Only names of exactly the helpers' form are touched (``.<name>.<random>.<kind>``), files and folders
    alike. Returns what was removed (logged too)."""
    path = Path(path)
    pattern = re.compile(re.escape(_temp_prefix(path)) + _TEMP_RANDOM + r"\.(" + "|".join(map(re.escape, kinds)) + ")")
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        if not pattern.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        log.warning("removed %s, left by an interrupted job writing %s", entry, path)
    return removed


def _new_temp_dir(path: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=f".{kind}"))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success move it into place, on error remove it.

    Stale temp files of ``path`` (from a job killed before it could clean up) are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path, [PART])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=f".{PART}")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path``, on error it is removed.

    A folder cannot be renamed over a non-empty one: an old ``path`` is moved aside first, so readers see
    either the complete old folder or the complete new one, never a mix. Stale temp folders of ``path``
    are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path, [NEW_DIR, OLD_DIR])
    tmp = _new_temp_dir(path, NEW_DIR)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())
        if path.exists():
            trash = _new_temp_dir(path, OLD_DIR)
            os.replace(path, trash / path.name)
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def scratch_dir(path: str | os.PathLike, where: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a private work folder for making ``path`` (a download, a tool's raw output), removed at exit.

    It lives beside ``path`` (or in ``where``) and is named after it, so the leftovers of a killed job
    are found and removed when the next one starts."""
    path = Path(path)
    anchor = Path(where) / path.name if where is not None else path
    anchor.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(anchor, [SCRATCH])
    tmp = _new_temp_dir(anchor, SCRATCH)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


@dataclass
class StageStats:
    """Counts of one stage on one shard: what came in, what went out, what was skipped and why.

    ``samples_out`` counts samples with a usable result. A skipped sample of a *sidecar* stage still gets
    an empty entry in the sidecar (keys stay aligned with the raw shard); a skipped sample of the fetch
    stage is absent from the raw shard. ``counters`` holds finer counts (phrases dropped, regions kept...).
    """

    stage: str
    shard: str
    samples_in: int = 0
    samples_out: int = 0
    skipped: Counter = field(default_factory=Counter)
    counters: Counter = field(default_factory=Counter)
    info: dict = field(default_factory=dict)

    def skip(self, reason: str, key: str | None = None, detail: str | None = None) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= LOGGED_SKIPS_PER_REASON:
            what = f"sample {key!r}" if key is not None else "a sample"
            extra = f": {detail}" if detail else ""
            log.warning("%s %s: skipped %s (%s)%s", self.stage, self.shard, what, reason, extra)
            if self.skipped[reason] == LOGGED_SKIPS_PER_REASON:
                log.warning("%s %s: further '%s' skips are counted, not logged", self.stage, self.shard, reason)

    @property
    def samples_skipped(self) -> int:
        return sum(self.skipped.values())

    def check(self) -> None:
        if self.samples_in != self.samples_out + self.samples_skipped:
            raise AssertionError(
                f"{self.stage} {self.shard}: samples_in={self.samples_in} != samples_out={self.samples_out}"
                f" + samples_skipped={self.samples_skipped} ({dict(self.skipped)})"
            )

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "shard": self.shard,
            "samples_in": self.samples_in,
            "samples_out": self.samples_out,
            "samples_skipped": self.samples_skipped,
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "counters": dict(sorted(self.counters.items())),
            **({"info": self.info} if self.info else {}),
        }

    def write(self, path: str | os.PathLike) -> dict:
        self.check()
        summary = self.to_dict()
        write_json_atomic(path, summary)
        log.info(
            "%s %s: %d in, %d out, %d skipped %s",
            self.stage,
            self.shard,
            self.samples_in,
            self.samples_out,
            self.samples_skipped,
            dict(self.skipped) or "",
        )
        return summary


class ShardFormatError(ValueError):
    """A shard that cannot be read as WebDataset samples; the message names the shard and the key."""


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot name a sample in a shard, or None if it can.

    A key becomes member names (``<key>.<ext>``) that tools extract as paths, so it must stay a relative
    path inside the shard's folder: not absolute, no empty, ``.`` or ``..`` part, no backslash or NUL.
    Its last part must not contain a dot (WebDataset splits the key at the first dot of the file name).
    """
    if not key:
        return "empty key"
    if "\\" in key or "\0" in key:
        return "contains a backslash or a NUL"
    if key.startswith("/"):
        return "absolute path"
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "has an empty, '.' or '..' path part"
    if "." in parts[-1]:
        return "contains a dot; WebDataset splits keys at the first dot"
    return None


def check_key(key: str, where: str | os.PathLike) -> None:
    """Raise a ValueError naming ``where`` if ``key`` cannot be written to a shard (:func:`key_problem`)."""
    problem = key_problem(key)
    if problem is not None:
        raise ValueError(f"{where}: sample key {key!r} is unsafe ({problem}); it was not written")


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/000123.samlens.npy`` -> (``dir/000123``, ``samlens.npy``), WebDataset's key rule."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return name, ""
    return (f"{directory}/{stem}" if directory else stem), ext


def iter_samples(path: str | os.PathLike, fields: Collection[str] | None = None) -> Iterator[dict]:
    """Raw samples of a tar in file order: ``{"__key__": key, ext: bytes, ...}``.

    Follows WebDataset's grouping (consecutive members with the same key form one sample) but reads the
    tar directly, so no decoding happens and errors name the shard and the member. With ``fields``, only
    those extensions are read into memory (every sample is still yielded, with its key).
    """
    path = Path(path)
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed below
        tar = tarfile.open(fileobj=raw, mode="r|")
    except (OSError, tarfile.TarError) as exc:
        raise ShardFormatError(f"{path}: not a readable (uncompressed) tar file ({exc})") from exc
    current: dict | None = None
    seen: set[str] = set()
    with raw, tar:
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if not ext or key.split("/")[-1].startswith("_"):
                    continue  # files like __index__ or keys without extension are not samples
                data = tar.extractfile(member).read() if fields is None or ext in fields else None
                if current is not None and key == current["__key__"]:
                    if data is None:
                        continue
                    if ext in current:
                        raise ShardFormatError(f"{path}: sample {key!r} has two '{ext}' members")
                    current[ext] = data
                    continue
                if current is not None:
                    yield current
                if key in seen:
                    raise ShardFormatError(f"{path}: sample {key!r} appears twice (its members are not contiguous)")
                seen.add(key)
                current = {"__key__": key}
                if data is not None:
                    current[ext] = data
        except (OSError, tarfile.TarError, EOFError) as exc:
            last = current["__key__"] if current else None
            raise ShardFormatError(f"{path}: corrupt tar after sample {last!r} ({exc})") from exc
        # A tar cut at a member boundary reads as a shorter valid tar: only the end-of-archive
        # marker (a zero block) tells a complete file from a truncated one.
        raw.seek(tar.offset)
        marker = raw.read(tarfile.BLOCKSIZE)
        if len(marker) < tarfile.BLOCKSIZE or any(marker):
            last = current["__key__"] if current else None
            raise ShardFormatError(f"{path}: truncated tar (no end-of-archive marker after sample {last!r}); fetch it again")
    if current is not None:
        yield current


def read_keys(path: str | os.PathLike) -> list[str]:
    return [s["__key__"] for s in iter_samples(path)]


class ShardWriter:
    """Write samples into one tar, atomically (the final name appears only after ``close``); every key is
    checked with :func:`check_key`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._ctx = atomic_output(self.path)
        self._tmp = self._ctx.__enter__()
        self._tar = tarfile.open(self._tmp, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, key: str, fields: Mapping[str, bytes]) -> None:
        check_key(key, self.path)
        for ext, data in fields.items():
            if ext.startswith("__"):
                continue
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError(f"{self.path}: sample {key!r} field {ext!r} must be bytes, got {type(data).__name__}")
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = TAR_MTIME
            info.mode = 0o444
            info.uname = info.gname = "powerclip"
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._ctx.__exit__(None, None, None)

    def abort(self, exc: BaseException) -> None:
        self._tar.close()
        with contextlib.suppress(BaseException):
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
        else:
            self.abort(exc)


def image_field(sample: Mapping) -> str | None:
    """The image extension a sample carries, or None."""
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)


def decode_image(data: bytes):
    """Image bytes -> RGB PIL image (decoded fully, so a truncated file fails here, not later)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.convert("RGB")
