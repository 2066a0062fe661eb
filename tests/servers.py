"""Test data and local servers shared by the fetch tests (tests/test_fetch_*.py, tests/test_eval_fetch.py) and
the workflow's network test.

The network is never used: ``FileServer`` is a small ``http.server`` and ``FakeHub`` answers like the Hugging
Face Hub, both bound to 127.0.0.1 on a free port and shut down by the tests (or by a safety timer).
``hf_env`` is a fixture: import it into a test module to use it.
"""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import json
import re
import sys
import tarfile
import textwrap
import threading
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from powerclip.shards import ShardWriter, StageStats, iter_samples

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_SAFETY_TIMEOUT_S = 300  # a test server shuts itself down after this even if a fixture never finishes


def image_bytes(fmt: str, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with ShardWriter(path) as writer:
        for key, fields in samples:
            writer.write(key, fields)
    return path


def raw_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar written member by member, without ShardWriter's checks (what an outside tool may produce)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def samples_of(path: Path) -> list[dict]:
    return list(iter_samples(path))


def new_stats(shard: str = "s0") -> StageStats:
    return StageStats(stage="fetch", shard=shard)




def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class LocalServer:
    """ThreadingHTTPServer on 127.0.0.1:<free port> in a daemon thread; stops on close() or after a timeout."""

    def __init__(self, handler_cls: type[http.server.BaseHTTPRequestHandler]):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.safety = threading.Timer(SERVER_SAFETY_TIMEOUT_S, self.httpd.shutdown)
        self.safety.daemon = True
        self.thread.start()
        self.safety.start()

    def close(self) -> None:
        self.safety.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

IMAGES = {
    "/img/red.png": ("image/png", image_bytes("PNG", (220, 20, 20), (64, 48))),
    "/img/green.jpg": ("image/jpeg", image_bytes("JPEG", (20, 220, 20), (50, 80))),
    "/img/blue.png": ("image/png", image_bytes("PNG", (20, 20, 220), (33, 33))),
    "/page.html": ("text/html; charset=utf-8", b"<html><body>not an image</body></html>"),
}


class FileServer(LocalServer):
    """Serves ``files`` (URL path -> bytes, or (content type, bytes)); 404 for anything else. Paths in ``cut``
    announce more bytes than they send (a connection cut short); ``fail`` gives a path's first answers as
    HTTP error statuses (e.g. ``[503, 503]``); ``redirects`` sends a path elsewhere (302). ``requests``
    lists the paths asked for, in order."""

    def __init__(
        self,
        files: dict[str, bytes | tuple[str, bytes]],
        cut: frozenset[str] = frozenset(),
        fail: dict[str, list[int]] | None = None,
        redirects: dict[str, str] | None = None,
    ):
        fail = {path: list(codes) for path, codes in (fail or {}).items()}
        redirects = redirects or {}
        self.requests: list[str] = []
        requests, lock = self.requests, threading.Lock()

        class Handler(_QuietHandler):
            def do_GET(self):
                path = urllib.parse.urlsplit(self.path).path
                with lock:
                    requests.append(path)
                    status = fail[path].pop(0) if fail.get(path) else None
                if status is not None:
                    self.send_error(status)
                    return
                if path in redirects:
                    self.send_response(302)
                    self.send_header("Location", redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path not in files:
                    self.send_error(404, "File not found")
                    return
                ctype, body = files[path] if isinstance(files[path], tuple) else (None, files[path])
                self.send_response(200)
                if ctype is not None:
                    self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body) + (100 if path in cut else 0)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)
        self.url = f"http://127.0.0.1:{self.port}"


COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "powerclip-test/combined"


class FakeHub:
    """Just enough of the Hub's ``/resolve`` endpoint for hf_hub_download / get_hf_file_metadata.

    HEAD/GET ``/datasets/<repo>/resolve/<revision>/<file>`` answers like the real Hub: for an LFS file a 302 to a
    CDN URL (another host: ``localhost`` instead of ``127.0.0.1``) carrying ``X-Linked-Etag`` (sha256),
    ``X-Linked-Size`` and ``X-Repo-Commit``; for a plain git file a 200 with ``ETag`` (git blob sha1) and
    ``Content-Length``. Unknown repo -> 401 ``X-Error-Code: RepoNotFound``, unknown revision -> 404
    ``RevisionNotFound``, unknown file -> 404 ``EntryNotFound``.
    """

    def __init__(self, files: dict[str, bytes], *, lfs: bool = True, corrupt: bool = False, fail_first: int = 0):
        self.files = files
        self.lfs = lfs
        self.corrupt = corrupt
        self.fail_first = fail_first
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(_QuietHandler):
            def do_HEAD(self):
                hub.handle(self, head=True)

            def do_GET(self):
                hub.handle(self, head=False)

        self.server = LocalServer(Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.port}"

    def count(self, method: str, prefix: str = "") -> int:
        return sum(1 for m, p in self.requests if m == method and p.startswith(prefix))

    def _reply(self, req, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        req.send_response(status)
        for name, value in headers.items():
            req.send_header(name, value)
        req.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
        req.end_headers()
        if not head:
            req.wfile.write(body)

    def handle(self, req, head: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(req.path).path)
        with self.lock:
            self.requests.append(("HEAD" if head else "GET", path))
            if self.fail_first > 0:
                self.fail_first -= 1
                self._reply(req, 503, {"Content-Type": "text/plain"}, b"overloaded", head)
                return
        cdn = re.fullmatch(r"/cdn/([0-9a-f]{64})", path)
        if cdn:
            data = next((d for d in self.files.values() if hashlib.sha256(d).hexdigest() == cdn.group(1)), None)
            if data is None:
                self._reply(req, 404, {}, b"", head)
                return
            if self.corrupt:  # same length, one byte flipped: only a checksum notices
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            self._reply(req, 200, {"Content-Type": "application/octet-stream"}, data, head)
            return
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m is None or m.group(1) != REPO:
            self._reply(
                req, 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b"", head
            )
            return
        if m.group(2) not in ("main", COMMIT):
            self._reply(req, 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, b"", head)
            return
        data = self.files.get(m.group(3))
        if data is None:
            headers = {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": COMMIT}
            self._reply(req, 404, headers, b"", head)
            return
        if self.lfs:
            sha = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
            headers = {
                "Location": f"http://localhost:{self.server.port}/cdn/{sha}",
                "ETag": f'"{hashlib.sha1(pointer).hexdigest()}"',
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(len(data)),
                "X-Repo-Commit": COMMIT,
                "Content-Length": "0",
            }
            self._reply(req, 302, headers, b"", head)
        else:
            blob_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            headers = {"ETag": f'"{blob_sha1}"', "X-Repo-Commit": COMMIT, "Content-Type": "application/octet-stream"}
            self._reply(req, 200, headers, data, head)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """huggingface_hub isolated from the user's setup: tmp HF_HOME, no token, no xet, no telemetry, online."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    for name, value in {
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    # huggingface_hub reads these at import time, so an already imported module must be patched too.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    return tmp_path / "hf_cache"



@pytest.fixture
def combined_shard(tmp_path) -> tuple[bytes, list[dict]]:
    """A shard in the official combined format (jpg, txt, njson, samlens.npy, samcat.npy)."""
    samples = []
    for i in range(3):
        fields = {
            "jpg": image_bytes("JPEG", (40 * i, 100, 200 - 40 * i), (48, 32)),
            "txt": f"sample {i}: a photo of things".encode(),
            "njson": json.dumps({"phrases": ["a photo", "things"], "i": i}).encode(),
            "samlens.npy": npy_bytes(np.array([2, 3 + i], dtype=np.int32)),
            "samcat.npy": npy_bytes(np.arange(5 + i, dtype=np.int16)),
        }
        samples.append({"__key__": f"{i:09d}", **fields})
    path = write_tar(
        tmp_path / "release.tar", [(s["__key__"], {k: v for k, v in s.items() if k != "__key__"}) for s in samples]
    )
    return path.read_bytes(), samples



FAKE_IMG2DATASET = textwrap.dedent(
    """\
    #!{python}
    # Stand-in for the img2dataset CLI: checks the flags, writes 00000.tar (samples in reverse key order, as
    # img2dataset's threads can) and 00000_stats.json. Behaviour is chosen by FAKE_I2D_MODE.
    import io, json, os, sys, tarfile
    args = sys.argv[1:]
    opts = dict(zip(args[0::2], args[1::2]))
    json.dump(args, open(os.environ["FAKE_I2D_ARGS"], "w"))
    if os.environ.get("FAKE_I2D_MODE") == "crash":
        print("Traceback: something broke", file=sys.stderr)
        sys.exit(3)
    out = opts["--output_folder"]
    os.makedirs(out)
    rows = open(opts["--url_list"]).read().splitlines()[1:]
    jpg = open(os.environ["FAKE_I2D_JPG"], "rb").read()
    with tarfile.open(os.path.join(out, "00000.tar"), "w") as tar:
        for i in (2, 0):  # rows 0 and 2 succeed; row 1 failed to download; row 3 vanished
            for ext, data in (("jpg", jpg), ("txt", rows[i].split("\\t")[1].encode()), ("json", b"{{}}")):
                info = tarfile.TarInfo(f"{{i:09d}}.{{ext}}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stats = {{"count": len(rows), "successes": 2, "failed_to_download": 1, "failed_to_resize": 0,
              "status_dict": {{"success": 2, "HTTP Error 404: Not Found": 1}}}}
    json.dump(stats, open(os.path.join(out, "00000_stats.json"), "w"))
    """
)


@pytest.fixture
def fake_img2dataset(tmp_path, monkeypatch):
    exe = tmp_path / "bin" / "img2dataset"
    exe.parent.mkdir()
    exe.write_text(FAKE_IMG2DATASET.format(python=sys.executable))
    exe.chmod(0o755)
    jpg = tmp_path / "img.jpg"
    jpg.write_bytes(image_bytes("JPEG", (9, 99, 199)))
    monkeypatch.setenv("FAKE_I2D_ARGS", str(tmp_path / "args.json"))
    monkeypatch.setenv("FAKE_I2D_JPG", str(jpg))
    return exe


def write_part(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["url", "caption"])
        writer.writerows(rows)
    return path

