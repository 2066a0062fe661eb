"""Shard lists of the configured datasets, with the standard library only.

The Snakefile imports this module at parse time, in whatever environment runs Snakemake itself (a
login node's base env), so it must not need numpy, torch or webdataset. The rules also take from it what
each fetch job is told (a local shard's file, a Hub shard's file name), so no job recomputes the list.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from pathlib import Path

SOURCES = ("synthetic", "local", "img2dataset", "huggingface")
SHARD_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{0000..0003}`` ranges (zero padding kept) and ``{a,b}`` lists, left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    if ".." in body:
        lo, _, hi = body.partition("..")
        if not (lo.isdigit() and hi.isdigit()):
            raise ValueError(f"brace range {{{body}}} in {pattern!r} must be numeric, like {{0000..2175}}")
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [head + option + rest for option in options for rest in expand_braces(tail)]


def shard_name_of(path: str) -> str:
    name = os.path.basename(path)
    return name[: -len(".tar")] if name.endswith(".tar") else name


def local_shards(pattern: str) -> dict[str, str]:
    """Local shard paths by shard name (basename without ``.tar``), in sorted order.

    ``pattern`` is a directory (all ``*.tar`` directly in it), a glob (``/data/cc3m/*.tar``) or a brace
    pattern (``/data/x-{0000..0003}.tar``; its pieces may contain glob characters). Names given explicitly
    by a brace pattern must exist. Raises ValueError if nothing matches, if a brace-named file is missing,
    or if two files would get the same shard name.
    """
    pattern = os.path.expanduser(str(pattern))
    if os.path.isdir(pattern):
        paths = sorted(str(p) for p in Path(pattern).glob("*.tar") if p.is_file())
        where = f"directory {pattern}"
    else:
        paths, missing = [], []
        for piece in expand_braces(pattern):
            if glob.has_magic(piece):
                paths.extend(sorted(p for p in glob.glob(piece) if os.path.isfile(p)))
            elif os.path.isfile(piece):
                paths.append(piece)
            else:
                missing.append(piece)
        if missing:
            shown = ", ".join(missing[:5]) + (f" ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise ValueError(f"local shard pattern {pattern!r}: missing file(s) {shown}; check the path in the config")
        where = f"pattern {pattern!r}"
    if not paths:
        raise ValueError(f"no .tar file matches {where}; check the local source path in the config")
    shards: dict[str, str] = {}
    for path in paths:
        if not path.endswith(".tar"):
            raise ValueError(f"{path}: local shards must be .tar files (the shard name is the basename without .tar)")
        name = shard_name_of(path)
        if name in shards:
            if os.path.realpath(shards[name]) == os.path.realpath(path):
                continue  # the same file named twice by the pattern
            raise ValueError(
                f"{where}: {shards[name]} and {path} would both be shard {name!r}; shard names (basenames) must be unique"
            )
        shards[name] = path
    return shards


def shard_names(dataset: dict) -> list[str]:
    """Shard names of one `datasets:` entry of the config (validated by the schema)."""
    source = dataset["source"]
    if source in ("synthetic", "img2dataset"):
        names = [f"{i:05d}" for i in range(int(dataset["num_shards"]))]
    elif source == "local":
        names = list(local_shards(dataset["local"]["pattern"]))
    elif source == "huggingface":
        names = [shard_name_of(p) for p in expand_braces(dataset["huggingface"]["filename_pattern"])]
        if "num_shards" in dataset:
            names = names[: int(dataset["num_shards"])]
    else:
        raise ValueError(f"unknown dataset source {source!r}; choose from {SOURCES}")
    bad = [n for n in names if not SHARD_NAME.match(n)]
    if bad:
        raise ValueError(f"shard names must match {SHARD_NAME.pattern} (no dots): {bad[:5]}")
    if len(set(names)) != len(names):
        raise ValueError("shard names are not unique")
    return names


@functools.lru_cache(maxsize=16)
def _huggingface_files(pattern: str) -> dict[str, str]:
    files: dict[str, str] = {}
    for path in expand_braces(pattern):
        files.setdefault(shard_name_of(path), path)
    return files


def huggingface_filename(dataset: dict, shard: str) -> str:
    """The file of the Hub repository that is shard ``shard`` (expanded once per pattern, then looked up)."""
    pattern = dataset["huggingface"]["filename_pattern"]
    try:
        return _huggingface_files(pattern)[shard]
    except KeyError:
        raise KeyError(f"shard {shard!r} is not in {pattern!r}") from None
