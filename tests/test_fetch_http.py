"""powerclip.fetch.http: the one retry policy, URL downloads (schemes, checksums, cut connections), checkpoints
and safe zip extraction, against a file server on 127.0.0.1."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path

import pytest
from servers import FileServer, LocalServer, _QuietHandler, zip_bytes

from powerclip.fetch.http import DownloadError, TransientError, extract_zip, fetch_checkpoint, fetch_url, retry


def test_fetch_checkpoint_verifies_and_retries(tmp_path, monkeypatch):
    import hashlib as _hashlib

    payload = b"weights" * 1000
    digest = _hashlib.sha256(payload).hexdigest()
    served = {"n": 0, "corrupt_first": 1}

    class Handler(_QuietHandler):
        def do_GET(self):
            if self.path != "/sam_vit_x.pth":
                self.send_error(404)
                return
            served["n"] += 1
            body = payload
            if served["corrupt_first"] > 0:
                served["corrupt_first"] -= 1
                body = b"X" + payload[1:]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = LocalServer(Handler)
    base = f"http://127.0.0.1:{server.port}"
    try:
        out = tmp_path / "ckpt" / "sam_vit_x.pth"
        got = fetch_checkpoint(f"{base}/sam_vit_x.pth", out, sha256=digest[:6], backoff_s=0)
        assert got == digest and out.read_bytes() == payload and served["n"] == 2  # first copy was corrupt
        served["corrupt_first"] = 5
        with pytest.raises(DownloadError, match="after 2 attempts"):
            fetch_checkpoint(f"{base}/sam_vit_x.pth", tmp_path / "bad.pth", sha256=digest, retries=2, backoff_s=0)
        assert not (tmp_path / "bad.pth").exists()
        with pytest.raises(DownloadError, match="HTTP 404"):
            fetch_checkpoint(f"{base}/missing.pth", tmp_path / "missing.pth", backoff_s=0)
        assert list(tmp_path.glob("*.part")) == [] and list((tmp_path / "ckpt").iterdir()) == [out]
    finally:
        server.close()



@pytest.mark.parametrize("member", ["../evil", "val2017/../../evil", "/tmp/evil", "..\\evil"])
def test_extract_zip_rejects_unsafe_members(tmp_path, member):
    archive = tmp_path / "val2017.zip"
    archive.write_bytes(zip_bytes({"val2017/000000000139.jpg": b"jpeg", member: b"payload"}))
    out = tmp_path / "eval" / "val2017"
    with pytest.raises(ValueError, match=re.escape(f"unsafe member {member!r}")):
        extract_zip(archive, out, subdir="val2017")
    assert not (tmp_path / "eval").exists()  # checked before anything is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val2017.zip"] and not Path("/tmp/evil").exists()


def test_extract_zip_without_the_folder_names_what_it_found(tmp_path):
    archive = tmp_path / "val2014.zip"
    archive.write_bytes(zip_bytes({"val2014/000000000042.jpg": b"jpeg"}))
    with pytest.raises(ValueError, match=r"no file under val2017/ \(top-level entries: \['val2014'\]\)"):
        extract_zip(archive, tmp_path / "out" / "val2017", subdir="val2017")
    with pytest.raises(ValueError, match="not a readable zip file"):
        extract_zip(tmp_path / "missing.zip", tmp_path / "out" / "val2017")
    assert list((tmp_path / "out").iterdir()) == []



def test_fetch_url_retries_a_cut_connection_then_fails(tmp_path):
    server = FileServer({"/val2017.zip": b"PK" * 50}, cut=frozenset({"/val2017.zip"}))
    try:
        with pytest.raises(DownloadError, match="after 2 attempts: .*got 100 of the 200 bytes announced"):
            fetch_url(f"{server.url}/val2017.zip", tmp_path / "val2017.zip", retries=2, backoff_s=0)
    finally:
        server.close()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ retries


def test_retry_retries_only_transient_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("cut")
        return "done"

    assert retry(flaky, 3, 0, what="x") == "done" and len(calls) == 3
    calls.clear()
    with pytest.raises(DownloadError, match=r"^x: failed after 2 attempts: cut$") as info:
        retry(flaky, 2, 0, what="x")
    assert isinstance(info.value.__cause__, TransientError) and len(calls) == 2
    for permanent in (ValueError("corrupt tar"), FileNotFoundError("no such file"), DownloadError("HTTP 404")):
        calls.clear()

        def broken(exc=permanent):
            calls.append(1)
            raise exc

        with pytest.raises(type(permanent)):
            retry(broken, 5, 0, what="x")
        assert len(calls) == 1, f"{permanent!r} must not be retried"
    calls.clear()
    assert retry(lambda: calls.append(1) or 7, 1, 0, what="x", retry_on=lambda exc: True) == 7


def test_a_server_that_fails_twice_with_503_then_serves_the_file(tmp_path):
    server = FileServer({"/w.pth": b"weights" * 100}, fail={"/w.pth": [503, 503]})
    try:
        digest = fetch_url(f"{server.url}/w.pth", tmp_path / "w.pth", backoff_s=0)
    finally:
        server.close()
    assert (tmp_path / "w.pth").read_bytes() == b"weights" * 100 and len(digest) == 64
    assert server.requests == ["/w.pth"] * 3


@pytest.mark.parametrize("status", [400, 403, 404, 410])
def test_client_errors_are_not_retried(tmp_path, status):
    server = FileServer({"/w.pth": b"weights"}, fail={"/w.pth": [status] * 5})
    try:
        with pytest.raises(DownloadError, match=re.escape(f"{server.url}/w.pth: HTTP {status}; check the file URL")):
            fetch_url(f"{server.url}/w.pth", tmp_path / "w.pth", retries=5, backoff_s=0)
    finally:
        server.close()
    assert server.requests == ["/w.pth"] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("status", [429, 500, 502])
def test_busy_or_broken_servers_are_retried(tmp_path, status):
    server = FileServer({"/w.pth": b"weights"}, fail={"/w.pth": [status] * 5})
    try:
        with pytest.raises(DownloadError, match=f"failed after 3 attempts: HTTP Error {status}"):
            fetch_url(f"{server.url}/w.pth", tmp_path / "w.pth", retries=3, backoff_s=0)
    finally:
        server.close()
    assert server.requests == ["/w.pth"] * 3


def test_connection_refused_is_retried_then_named(tmp_path):
    server = FileServer({})
    url = f"{server.url}/w.pth"
    server.close()  # nothing listens on that port any more
    with pytest.raises(DownloadError, match=re.escape(f"file {url}: failed after 2 attempts")) as info:
        fetch_url(url, tmp_path / "w.pth", retries=2, backoff_s=0)
    assert isinstance(info.value.__cause__, urllib.error.URLError)


# ------------------------------------------------------------------------------------------------ schemes


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/val2017.zip", "file:///etc/passwd", "/etc/passwd", "http:///x", "gopher://x"])
def test_only_web_urls_are_downloaded(tmp_path, url):
    with pytest.raises(DownloadError, match=re.escape(repr(url)) + ": only http/https URLs can be downloaded"):
        fetch_url(url, tmp_path / "out", retries=3, backoff_s=5)  # refused before any attempt: no wait
    assert list(tmp_path.iterdir()) == []


def test_file_urls_only_when_the_caller_opts_in(tmp_path):
    src = tmp_path / "local.bin"
    src.write_bytes(b"local bytes")
    url = src.as_uri()
    with pytest.raises(DownloadError, match="only http/https"):
        fetch_url(url, tmp_path / "copy.bin")
    fetch_url(url, tmp_path / "copy.bin", schemes=("file",))
    assert (tmp_path / "copy.bin").read_bytes() == b"local bytes"
    with pytest.raises(DownloadError, match="missing.bin"):  # a missing local file is not retried
        fetch_url((tmp_path / "missing.bin").as_uri(), tmp_path / "m.bin", schemes=("file",), backoff_s=5)


def test_redirects_must_stay_on_allowed_schemes(tmp_path):
    server = FileServer({"/real.zip": b"PK"}, redirects={"/to-ftp.zip": "ftp://127.0.0.1/x.zip", "/ok.zip": "/real.zip"})
    try:
        with pytest.raises(DownloadError, match=re.escape("'ftp://127.0.0.1/x.zip': only http/https")):
            fetch_url(f"{server.url}/to-ftp.zip", tmp_path / "x.zip", backoff_s=0)
        fetch_url(f"{server.url}/ok.zip", tmp_path / "ok.zip", backoff_s=0)
    finally:
        server.close()
    assert server.requests == ["/to-ftp.zip", "/ok.zip", "/real.zip"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.zip"]


# ------------------------------------------------------------------------------------------------ pinned defaults


@pytest.mark.parametrize("name", ["config.yaml", "cc12m.yaml"])
def test_every_default_download_is_pinned(name):
    """Checkpoints carry their full sha256, SugarCrepe's images theirs and its annotations come from one commit."""
    import yaml
    from snakemake.utils import validate

    from servers import REPO_ROOT

    config = yaml.safe_load((REPO_ROOT / "config" / name).read_text())
    validate(config, str(REPO_ROOT / "schemas" / "config.schema.yaml"))  # fills in the schema's defaults
    assert config["checkpoints"], "the SAM and SAM 2.1 checkpoints are listed"
    for file, spec in config["checkpoints"].items():
        assert spec["url"].startswith("https://") and spec["url"].endswith("/" + file)
        assert re.fullmatch(r"[0-9a-f]{64}", spec["sha256"]), f"{name}: checkpoint {file} is not pinned by a full sha256"
    sugar_crepe = config["evaluation"]["sugar_crepe"]
    assert re.fullmatch(r"[0-9a-f]{64}", sugar_crepe["images_sha256"])
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/RAIVNLab/sugar-crepe/[0-9a-f]{40}/data/\{task\}\.json",
                        sugar_crepe["annotations_url"])  # fmt: skip
