"""Downloads over HTTP(S): one retry policy, verified files, safe zip extraction.

Every network retry of the fetch code goes through :func:`retry`, which retries only errors that may not
happen again (:class:`TransientError`: a cut connection, a timeout, HTTP 408/429/5xx, a checksum mismatch
after a download) with one back-off policy; a wrong URL, a 404, a corrupt archive or a missing local file
fails at once, so a rerun is never spent on an error that cannot change. :func:`fetch_url` accepts only
``http``/``https`` URLs (``file:`` only when a caller opts in with ``schemes``), also after redirects, and
writes its file atomically once the size and the optional sha256 match. Checkpoints
(:func:`fetch_checkpoint`) and SugarCrepe's images use it; :func:`extract_zip` and :func:`extract_tar` unpack an
archive without letting a member escape its folder.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Collection
from pathlib import Path, PurePosixPath
from typing import TypeVar

from powerclip.shards import atomic_output, atomic_output_dir

log = logging.getLogger(__name__)

T = TypeVar("T")

WEB_SCHEMES = ("http", "https")
# HTTP statuses worth another attempt: request timeout, too many requests; every 5xx is too.
TRANSIENT_HTTP_STATUS = (408, 429)
# Waits between attempts: backoff_s, 2 backoff_s, 4 backoff_s, ... never more than this.
MAX_BACKOFF_S = 60.0
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """Something could not be fetched; the message names the source and what to do next."""


class TransientError(DownloadError):
    """A failure another attempt may not meet again (cut connection, checksum mismatch after a download...)."""


def transient_status(status: int | None) -> bool:
    return status is not None and (status in TRANSIENT_HTTP_STATUS or status >= 500)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth another attempt: network trouble, never a wrong URL, file or format."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, urllib.error.HTTPError):
        return transient_status(exc.code)
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    return isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror, http.client.HTTPException))


def retry(
    fn: Callable[[], T],
    attempts: int,
    backoff_s: float,
    *,
    what: str,
    retry_on: Callable[[BaseException], bool] = is_transient,
    hint: str = "",
) -> T:
    """``fn()``, called again after an error for which ``retry_on`` is true, at most ``attempts`` times.

    Waits ``backoff_s``, then twice as long each time (at most :data:`MAX_BACKOFF_S`). Any other error
    propagates at once. When the last attempt fails, raises :class:`DownloadError` "``what``: failed after
    N attempts: <last error>" (plus ``hint``), chained to that error.
    """
    attempts = max(1, int(attempts))
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified by retry_on, re-raised otherwise
            if not retry_on(exc):
                raise
            if attempt == attempts:
                plural = "s" if attempts != 1 else ""
                raise DownloadError(f"{what}: failed after {attempts} attempt{plural}: {exc}{hint}") from exc
            delay = min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
            log.warning("%s: attempt %d of %d failed (%s); next in %.1f s", what, attempt, attempts, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def check_url(url: str, schemes: Collection[str] = WEB_SCHEMES) -> None:
    """Raise :class:`DownloadError` naming ``url`` unless its scheme is one of ``schemes`` (and a web URL names a host)."""
    parts = urllib.parse.urlsplit(str(url))
    scheme = parts.scheme.lower()
    if scheme not in schemes or (scheme in WEB_SCHEMES and not parts.netloc):
        raise DownloadError(
            f"{url!r}: only {'/'.join(schemes)} URLs can be downloaded here (scheme {scheme or 'none'!r}); "
            "check the URL in the config"
        )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL that :func:`check_url` accepts (urllib would follow one to ftp:)."""

    def __init__(self, schemes: Collection[str]):
        super().__init__()
        self.schemes = schemes

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl, self.schemes)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def fetch_url(
    url: str,
    out_path: str | os.PathLike,
    sha256: str | None = None,
    retries: int = 3,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
    *,
    what: str = "file",
    schemes: Collection[str] = WEB_SCHEMES,
) -> str:
    """Download ``url`` to ``out_path`` atomically and verify it; returns its sha256.

    ``url`` must use one of ``schemes`` (default http/https; pass e.g. ``("file",)`` to read a local file
    on purpose), and so must every redirect. The bytes are streamed into a temporary file beside
    ``out_path`` and renamed into place only when complete (as many bytes as the server's Content-Length
    announced) and, with ``sha256``, matching it (the full digest, or a prefix of it). ``retries`` attempts
    are made through :func:`retry`: a short read, a checksum mismatch, a connection error or HTTP
    408/429/5xx is tried again, any other HTTP status fails at once. Errors name the URL; ``what`` names
    the file in messages ("checkpoint", "image archive"...).
    """
    check_url(url, schemes)
    expected = (sha256 or "").lower() or None
    opener = urllib.request.build_opener(_CheckedRedirects(schemes))

    def download() -> tuple[str, int]:
        try:
            with atomic_output(out_path) as tmp:
                digest, size = hashlib.sha256(), 0
                with opener.open(url, timeout=timeout_s) as response, open(tmp, "wb") as f:
                    announced = response.headers.get("Content-Length")
                    while chunk := response.read(CHUNK):
                        digest.update(chunk)
                        f.write(chunk)
                        size += len(chunk)
                if announced is not None and announced.isdigit() and size != int(announced):
                    raise TransientError(f"{url}: got {size} of the {announced} bytes announced (connection cut)")
                got = digest.hexdigest()
                if expected is not None and not got.startswith(expected):
                    raise TransientError(f"{url}: sha256 {got} does not match the expected {expected}")
            return got, size
        except urllib.error.URLError as exc:
            if is_transient(exc):
                raise
            if isinstance(exc, urllib.error.HTTPError):
                raise DownloadError(f"{url}: HTTP {exc.code}; check the {what} URL in the config") from exc
            raise DownloadError(f"{url}: {exc.reason}; check the {what} URL in the config") from exc

    got, size = retry(download, retries, backoff_s, what=f"{what} {url}")
    log.info("fetched %s -> %s (%d bytes, sha256 %s)", url, out_path, size, got)
    return got


def fetch_checkpoint(url: str, out_path: str | os.PathLike, sha256: str | None = None, **options) -> str:
    """Download a checkpoint file atomically and verify it (:func:`fetch_url` and its options); returns its sha256."""
    return fetch_url(url, out_path, sha256, what="checkpoint", **options)


def _member_path(name: str, archive: Path) -> PurePosixPath:
    """A member name as a relative path; absolute names and ``..`` parts (zip slip) are rejected."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and path.parts[0].endswith(":")):
        raise ValueError(
            f"{archive}: unsafe member {name!r} (absolute path or '..'); nothing was extracted. The archive is "
            "not what the config's URL should serve: check the URL"
        )
    return path


def _write_member(tmp: Path, rel: PurePosixPath, is_dir: bool, open_member: Callable, errors, archive: Path, name: str) -> int | None:
    """Write one archive member (already checked) under ``tmp``: a folder entry makes the folder (None), a file
    is copied from ``open_member()`` (the bytes written); a read error in ``errors`` names the member."""
    if not rel.parts or is_dir:
        tmp.joinpath(*rel.parts).mkdir(parents=True, exist_ok=True)
        return None
    target = tmp.joinpath(*rel.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open_member() as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    except errors as exc:
        raise ValueError(f"{archive}: member {name!r} is corrupt ({exc}); fetch it again") from exc
    return target.stat().st_size


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
        members = [(info, _member_path(info.filename, archive)) for info in zf.infolist()]
        files = size = skipped = 0
        with atomic_output_dir(out_dir) as tmp:
            for info, rel in members:
                if subdir is not None:
                    if rel.parts[:1] != (subdir,):
                        skipped += 1
                        continue
                    rel = PurePosixPath(*rel.parts[1:])
                written = _write_member(tmp, rel, info.is_dir(), lambda i=info: zf.open(i), zipfile.BadZipFile, archive, info.filename)
                if written is None:
                    continue
                files += 1
                size += info.file_size
            if subdir is not None and files == 0:
                tops = sorted({rel.parts[0] for _, rel in members if rel.parts})
                raise ValueError(f"{archive}: no file under {subdir}/ (top-level entries: {tops[:10]})")
    if skipped:
        log.info("%s: %d members outside %s/ were not extracted", archive, skipped, subdir)
    log.info("%s -> %s: %d files, %d bytes", archive, out_dir, files, size)
    return {"archive": str(archive), "members": len(members), "files": files, "bytes": size, "skipped": skipped}


def extract_tar(
    archive: str | os.PathLike,
    out_dir: str | os.PathLike,
    subdir: str | None = None,
    select: Callable[[PurePosixPath], bool] | None = None,
) -> dict:
    """Extract a tar file (plain or compressed) into ``out_dir`` safely and atomically, as :func:`extract_zip`.

    Every member is checked before anything is written: an absolute name, a ``..`` part, a symbolic or hard
    link, a device or a FIFO rejects the whole archive with a ValueError naming the member. With ``subdir`` (a
    folder path such as ``VOCdevkit/VOC2012``) that folder becomes ``out_dir``; ``select`` (a path relative to
    it -> bool) keeps only some files. Skipped members are counted. Returns ``{"archive", "members", "files",
    "bytes", "skipped"}``.
    """
    import tarfile

    archive, out_dir = Path(archive), Path(out_dir)
    prefix = PurePosixPath(subdir).parts if subdir else ()
    try:
        tf = tarfile.open(archive, "r:*")
        infos = tf.getmembers()
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise ValueError(f"{archive}: not a readable tar file ({exc}); delete it and fetch it again") from exc
    errors = (OSError, tarfile.TarError, EOFError)
    with tf:
        members = []
        for info in infos:
            rel = _member_path(info.name, archive)
            if not (info.isfile() or info.isdir()):
                raise ValueError(
                    f"{archive}: member {info.name!r} is a {'link' if info.issym() or info.islnk() else 'special file'}; "
                    "nothing was extracted. The archive is not what the config's URL should serve: check the URL"
                )
            members.append((info, rel))
        files = size = skipped = 0
        with atomic_output_dir(out_dir) as tmp:
            for info, rel in members:
                if rel.parts[: len(prefix)] != prefix or (select is not None and not select(PurePosixPath(*rel.parts[len(prefix) :]))):
                    skipped += 1
                    continue
                rel = PurePosixPath(*rel.parts[len(prefix) :])
                written = _write_member(tmp, rel, info.isdir(), lambda i=info: tf.extractfile(i), errors, archive, info.name)
                if written is None:
                    continue
                if written != info.size:
                    raise ValueError(f"{archive}: member {info.name!r} is cut short; fetch it again")
                files += 1
                size += info.size
            if files == 0:
                raise ValueError(f"{archive}: no file selected under {subdir or '.'}/ ({len(members)} members)")
    log.info("%s -> %s: %d files, %d bytes (%d members skipped)", archive, out_dir, files, size, skipped)
    return {"archive": str(archive), "members": len(members), "files": files, "bytes": size, "skipped": skipped}
