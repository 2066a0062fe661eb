"""Source ``huggingface``: one tar file of a Hub repository (e.g. a pre-processed CC12M release), verified.

The file comes through ``huggingface_hub`` (its cache, ``HF_ENDPOINT``/``HF_TOKEN``/``HF_HUB_OFFLINE``),
is checked against the size and sha256 the Hub announces, and is repackaged keeping the release's keys
and every field (e.g. the official combined format's ``njson``/``samlens.npy``/``samcat.npy``).
:func:`hub_call` turns ``huggingface_hub``'s exceptions into a :class:`~powerclip.fetch.http.TransientError`
(retried by :func:`~powerclip.fetch.http.retry`) or a :class:`~powerclip.fetch.http.DownloadError` that says
what to fix; the evaluation fetchers use it too.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from powerclip.fetch.http import DownloadError, TransientError, retry, sha256_file, transient_status
from powerclip.fetch.repackage import repackage_shard
from powerclip.shards import StageStats

if TYPE_CHECKING:
    from powerclip.fetch.registry import ShardJob

log = logging.getLogger(__name__)

T = TypeVar("T")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class NotOnHub(DownloadError):
    """The repository, revision or file does not exist on the Hub (or is not visible with this token)."""


def _hub_failure(exc: BaseException, what: str, where: str) -> DownloadError | None:
    """What to raise for a failed ``huggingface_hub`` call, or None to let ``exc`` through unchanged."""
    import httpx2
    from huggingface_hub import constants
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

    said = (str(exc).splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError, DisabledRepoError)):
        return NotOnHub(
            f"{what} not found on the Hub{where} ({type(exc).__name__}); check repo_id, revision and filename in "
            f"the config, and for a private or gated repo set HF_TOKEN. Hub said: {said}"
        )
    if isinstance(exc, LocalEntryNotFoundError):
        if constants.is_offline_mode():
            return DownloadError(
                f"{what} is not in the local Hub cache and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE (or run the "
                "download where the Hub is reachable)"
            )
        return TransientError(f"{what}: the Hub{where} could not be reached ({said})")
    if isinstance(exc, OfflineModeIsEnabled):
        return DownloadError(f"{what}: HF_HUB_OFFLINE is set; unset it to download")
    if isinstance(exc, FileMetadataError):
        return DownloadError(
            f"{what}: the server{where} did not answer like a Hugging Face Hub ({exc}); check `endpoint`/HF_ENDPOINT"
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if transient_status(status):
            return TransientError(f"{what}: HTTP {status} from the Hub{where}: {said}")
        return DownloadError(
            f"{what}: HTTP {status} from the Hub{where}; check access rights (HF_TOKEN) and the repo settings. "
            f"Hub said: {said}"
        )
    if isinstance(exc, httpx2.TransportError):
        return TransientError(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, OSError) and exc.errno is None:
        return TransientError(f"{what}: {exc}")  # e.g. huggingface_hub's "Consistency check failed" after a cut download
    return None  # a local file-system problem (disk full, permissions...): another attempt will not help


def hub_call(fn: Callable[[], T], what: str, where: str = "") -> T:
    """``fn()``, a ``huggingface_hub`` call; its errors become :class:`TransientError` (network trouble, HTTP
    408/429/5xx), :class:`NotOnHub` or :class:`DownloadError`, each naming ``what`` (and ``where``)."""
    try:
        return fn()
    except Exception as exc:
        failure = _hub_failure(exc, what, where)
        if failure is None:
            raise
        raise failure from exc


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
    Network errors, HTTP 408/429/5xx and checksum mismatches are retried ``retries`` times after the first
    attempt (:func:`~powerclip.fetch.http.retry`, first wait ``backoff_s``); a missing repo, revision or file
    fails at once. With ``HF_HUB_OFFLINE=1`` the file must already be in the cache (it is checked against its
    blob name). Keys of the release are kept. ``keep_cache=False`` removes the cached copy after repackaging.

    Returns ``{"sha256", "size", "commit", "etag", "repo_id", "filename", "revision"}``.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

    what = f"{repo_type} repo {repo_id!r} revision {revision!r} file {filename!r}"
    where = f" at {endpoint}" if endpoint else ""
    common = {"repo_type": repo_type, "endpoint": endpoint, "token": token, "cache_dir": cache_dir}
    force = False

    def download() -> tuple[str, str, str, int | None]:
        if constants.is_offline_mode():
            # No HEAD call possible: take the cached copy, whose blob is named after the ETag.
            path = hf_hub_download(repo_id, filename, revision=revision, local_files_only=True, **common)
            log.info("%s: HF_HUB_OFFLINE is set, using the cached copy %s", what, path)
            etag = os.path.basename(os.path.realpath(path))
            return path, _commit_from_snapshot_path(path, filename) or revision, etag, None
        url = hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision, endpoint=endpoint)
        meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
        # Download by `revision` (not by commit) so the cache records revision -> commit, which an offline
        # rerun (HF_HUB_OFFLINE=1) needs to find the file.
        path = hf_hub_download(repo_id, filename, revision=revision, force_download=force, **common)
        got_commit = _commit_from_snapshot_path(path, filename)
        if got_commit is not None and got_commit != meta.commit_hash:
            raise TransientError(f"{revision!r} moved from commit {meta.commit_hash} to {got_commit} meanwhile")
        return path, meta.commit_hash, meta.etag, meta.size

    def attempt() -> tuple[str, str, str, int, str]:
        nonlocal force
        path, commit, etag, expected_size = hub_call(download, what, where)
        size, sha256 = os.path.getsize(path), sha256_file(path)
        problem = None
        if expected_size is not None and size != expected_size:
            problem = f"size {size} != {expected_size} announced by the Hub"
        elif verify and etag and _SHA256_RE.fullmatch(etag) and sha256 != etag:
            problem = f"sha256 {sha256} != {etag} announced by the Hub"
        if problem is not None:
            log.warning("%s: downloaded file %s is corrupt (%s); deleting it", what, path, problem)
            _remove_cached(path)
            force = True
            if constants.is_offline_mode():
                raise DownloadError(
                    f"{what}: the cached copy was corrupt ({problem}) and has been deleted; HF_HUB_OFFLINE is set, "
                    "so it cannot be downloaded again: unset HF_HUB_OFFLINE"
                )
            raise TransientError(problem)
        if not (etag and _SHA256_RE.fullmatch(etag)):
            log.info("%s: ETag %r is not a sha256 (not an LFS file); only the size was checked", what, etag)
        return path, commit, etag, size, sha256

    path, commit, etag, size, sha256 = retry(
        attempt,
        max(1, retries + 1),
        backoff_s,
        what=f"{what}{where}",
        hint=". Check the network (or HF_ENDPOINT), then rerun; a persistent checksum mismatch means the file on "
        "the Hub differs from its metadata",
    )
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


def fetch(job: ShardJob, stats: StageStats) -> None:
    """The shard's file ``job.filename`` of the repository in ``datasets.<name>.huggingface``."""
    hf = job.dataset["huggingface"]
    fetch_huggingface_shard(
        hf["repo_id"],
        job.need("filename"),
        job.out_tar,
        stats,
        revision=hf.get("revision", "main"),
        repo_type=hf.get("repo_type", "dataset"),
        endpoint=hf.get("endpoint"),
        cache_dir=hf.get("cache_dir"),
        retries=hf.get("retries", 3),
    )
