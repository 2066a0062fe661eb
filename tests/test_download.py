"""Tests of powerclip.download: repackaging, local tars, URL-list splitting, img2dataset, the Hugging Face Hub,
checkpoints and SugarCrepe.

The network is never used: img2dataset and the URL fetches (checkpoints, SugarCrepe's zip and JSON) download
from a local ``http.server`` and huggingface_hub talks to a small fake Hub, all bound to 127.0.0.1 on a free
port and shut down by the fixtures (with a safety timer).
"""

from __future__ import annotations

import csv
import hashlib
import http.server
import io
import json
import os
import re
import sys
import textwrap
import threading
import time
import types
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from powerclip.datasets import local_shards as expand_local_pattern
from powerclip.download import (
    DownloadError,
    fetch_huggingface_shard,
    fetch_img2dataset_shard,
    fetch_local_shard,
    repackage_shard,
    split_url_list,
)
from powerclip.shards import ShardFormatError, ShardWriter, StageStats, iter_samples

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_SAFETY_TIMEOUT_S = 300  # a test server shuts itself down after this even if a fixture never finishes


# ------------------------------------------------------------------------------------------------ helpers


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


def samples_of(path: Path) -> list[dict]:
    return list(iter_samples(path))


def new_stats(shard: str = "s0") -> StageStats:
    return StageStats(stage="fetch", shard=shard)


def read_part(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle, delimiter="\t", quotechar='"'))


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


# ------------------------------------------------------------------------------------------------ repackage


def test_repackage_keeps_usable_samples_byte_for_byte_and_counts_reasons(tmp_path):
    jpg = image_bytes("JPEG", (200, 10, 10))
    png = image_bytes("PNG", (10, 200, 10))
    good1 = {"jpg": jpg, "txt": b"a red square", "json": b'{"url": "x"}'}
    good2 = {
        "png": png,
        "txt": "caf\u00e9 \u2014 green".encode(),
        "njson": b"{}",
        "samlens.npy": npy_bytes(np.arange(3)),
    }
    src = write_tar(
        tmp_path / "src.tar",
        [
            ("k0", good1),
            ("k1", {"txt": b"no image here"}),
            ("k2", {"jpg": b"not a jpeg at all", "txt": b"broken"}),
            ("k3", {"jpg": jpg[: len(jpg) // 2], "txt": b"truncated"}),
            ("k4", {"jpg": jpg}),
            ("k5", {"jpg": jpg, "txt": b"\xff\xfe bad"}),
            ("k6", {"jpg": jpg, "txt": b"  \n\t"}),
            ("k7", good2),
        ],
    )
    stats = new_stats()
    out = tmp_path / "out" / "s0.tar"
    repackage_shard(src, out, stats)

    kept = samples_of(out)
    assert [s["__key__"] for s in kept] == ["k0", "k7"]
    assert {k: v for k, v in kept[0].items() if k != "__key__"} == good1
    assert {k: v for k, v in kept[1].items() if k != "__key__"} == good2
    assert stats.samples_in == 8 and stats.samples_out == 2
    assert dict(stats.skipped) == {
        "missing_image": 1,
        "image_not_decodable": 2,
        "missing_caption": 1,
        "caption_not_utf8": 1,
        "empty_caption": 1,
    }
    stats.check()
    assert not list(out.parent.glob(".*.part")), "no temp file may remain"


def test_repackage_rekey_counts_input_samples(tmp_path):
    jpg = image_bytes("JPEG", (1, 2, 3))
    src = write_tar(
        tmp_path / "src.tar",
        [
            ("000000000", {"jpg": jpg, "txt": b"a"}),
            ("000000001", {"txt": b"b"}),
            ("000000002", {"jpg": jpg, "txt": b"c"}),
        ],
    )
    stats = new_stats("part-0003")
    repackage_shard(src, tmp_path / "out.tar", stats, rekey="part-0003")
    kept = samples_of(tmp_path / "out.tar")
    assert [s["__key__"] for s in kept] == ["part-0003_000000", "part-0003_000002"]
    assert [s["txt"] for s in kept] == [b"a", b"c"]
    with pytest.raises(ValueError, match="rekey"):
        repackage_shard(src, tmp_path / "bad.tar", new_stats(), rekey="a.b")


def test_repackage_unreadable_tar_names_the_file(tmp_path):
    src = tmp_path / "garbage.tar"
    src.write_bytes(b"this is not a tar" * 100)
    out = tmp_path / "out.tar"
    with pytest.raises(ShardFormatError, match="garbage.tar"):
        repackage_shard(src, out, new_stats())
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ local


def test_expand_local_pattern_directory_glob_and_braces(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for i in range(4):
        (d / f"x-{i:04d}.tar").write_bytes(b"")
    (d / "notes.txt").write_text("ignored")
    expected = {f"x-{i:04d}": str(d / f"x-{i:04d}.tar") for i in range(4)}

    assert expand_local_pattern(str(d)) == expected
    assert list(expand_local_pattern(str(d))) == sorted(expected)
    assert expand_local_pattern(str(d / "x-*.tar")) == expected
    assert expand_local_pattern(str(d / "x-{0001..0002}.tar")) == {k: expected[k] for k in ("x-0001", "x-0002")}
    assert expand_local_pattern(str(d / "x-0003.tar")) == {"x-0003": expected["x-0003"]}


def test_expand_local_pattern_errors(tmp_path):
    with pytest.raises(ValueError, match="no .tar file matches"):
        expand_local_pattern(str(tmp_path / "*.tar"))
    (tmp_path / "x-0000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="x-0001.tar"):
        expand_local_pattern(str(tmp_path / "x-{0000..0001}.tar"))
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "same.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="unique"):
        expand_local_pattern(str(tmp_path / "{a,b}/same.tar"))


def test_fetch_local_shard(tmp_path):
    jpg = image_bytes("JPEG", (5, 5, 5))
    src = write_tar(tmp_path / "in.tar", [("a", {"jpg": jpg, "txt": b"one"}), ("b", {"jpg": jpg, "txt": b""})])
    stats = new_stats("in")
    fetch_local_shard(src, tmp_path / "out.tar", stats)
    assert [s["__key__"] for s in samples_of(tmp_path / "out.tar")] == ["a"]
    assert stats.to_dict()["skipped_by_reason"] == {"empty_caption": 1}
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        fetch_local_shard(tmp_path / "missing.tar", tmp_path / "out2.tar", new_stats())


# ------------------------------------------------------------------------------------------------ split_url_list


def test_split_url_list_without_header_cc12m_style(tmp_path):
    lines = [
        b"http://e.com/0.jpg\tzero",
        b'http://e.com/1.jpg\tHe said "hi" to <PERSON>',
        b"http://e.com/2.jpg\ttoo\tmany",  # wrong column count
        b"\tno url",  # empty url
        b"http://e.com/4.jpg\t   ",  # blank caption
        b"http://e.com/5.jpg\tcaf\xc3\xa9",
        b"http://e.com/6.jpg\tbad \xff byte",  # not UTF-8
        b"http://e.com/7.jpg\tsev\ren",  # a lone CR inside the caption
        b"http://e.com/8.jpg\tbeyond",
        b"http://e.com/9.jpg\tbeyond too",
    ]
    src = tmp_path / "cc12m.tsv"
    src.write_bytes(b"\r\n".join(lines) + b"\r\n")
    out = tmp_path / "parts"
    summary = split_url_list(src, out, ["s0", "s1", "s2", "s3"], samples_per_shard=2, header=False, url_col="ignored")

    assert read_part(out / "s0.tsv") == [
        ["url", "caption"],
        ["http://e.com/0.jpg", "zero"],
        ["http://e.com/1.jpg", 'He said "hi" to <PERSON>'],
    ]
    assert read_part(out / "s1.tsv") == [["url", "caption"]]
    assert read_part(out / "s2.tsv") == [["url", "caption"], ["http://e.com/5.jpg", "caf\u00e9"]]
    assert read_part(out / "s3.tsv") == [["url", "caption"], ["http://e.com/7.jpg", "sev en"]]
    # quotes are doubled inside a quoted field, which is what pyarrow (img2dataset's reader) expects
    assert '"He said ""hi"" to <PERSON>"' in (out / "s0.tsv").read_text()
    assert summary["rows_read"] == 10
    assert summary["rows_written"] == 4
    assert summary["rows_beyond_last_shard"] == 2
    assert summary["rows_skipped_by_reason"] == {
        "wrong_column_count": 1,
        "empty_url": 1,
        "empty_caption": 1,
        "not_utf8": 1,
    }
    assert {k: v["rows"] for k, v in summary["parts"].items()} == {"s0": 2, "s1": 0, "s2": 1, "s3": 1}
    assert summary["parts"]["s2"]["path"] == str(out / "s2.tsv")
    assert not list(out.glob(".*")), "no temp file may remain"


def test_split_url_list_with_header_and_short_input(tmp_path):
    src = tmp_path / "list.tsv"
    src.write_text(
        "\ufeffkey\tcaption_text\timage_url\n"
        "1\tfirst\thttp://e.com/a.png\n"
        "2\tsecond\n"  # wrong column count
        "3\tthird\thttp://e.com/c.png\n",
        encoding="utf-8",
    )
    out = tmp_path / "parts"
    summary = split_url_list(
        src, out, ["a", "b", "c"], samples_per_shard=2, url_col="image_url", caption_col="caption_text"
    )
    assert read_part(out / "a.tsv") == [["url", "caption"], ["http://e.com/a.png", "first"]]
    assert read_part(out / "b.tsv") == [["url", "caption"], ["http://e.com/c.png", "third"]]
    assert read_part(out / "c.tsv") == [["url", "caption"]]  # input too short: empty part still written
    assert summary["rows_read"] == 3 and summary["rows_written"] == 2
    assert summary["rows_skipped_by_reason"] == {"wrong_column_count": 1}
    assert summary["rows_beyond_last_shard"] == 0

    with pytest.raises(ValueError, match="no column"):
        split_url_list(src, tmp_path / "p2", ["a"], samples_per_shard=2)  # default url/caption columns absent
    with pytest.raises(ValueError, match="duplicate"):
        split_url_list(
            src, tmp_path / "p3", ["a", "a"], samples_per_shard=2, url_col="image_url", caption_col="caption_text"
        )


def test_split_url_list_quoted_csv(tmp_path):
    src = tmp_path / "list.csv"
    src.write_text('url,caption\nhttp://e.com/a.png,"one, two"\nhttp://e.com/b.png,"unterminated\n', encoding="utf-8")
    summary = split_url_list(src, tmp_path / "parts", ["s"], samples_per_shard=5, sep=",", quoted=True)
    assert read_part(tmp_path / "parts" / "s.tsv") == [["url", "caption"], ["http://e.com/a.png", "one, two"]]
    assert summary["rows_written"] == 1 and sum(summary["rows_skipped_by_reason"].values()) == 1


# ------------------------------------------------------------------------------------------------ img2dataset


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


def _write_part(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["url", "caption"])
        writer.writerows(rows)
    return path


def test_fetch_img2dataset_shard_folds_cli_output(tmp_path, fake_img2dataset):
    part = _write_part(tmp_path / "p.tsv", [(f"http://e.com/{i}.jpg", f"caption {i}") for i in range(4)])
    stats = new_stats("cc-0007")
    out = tmp_path / "shards" / "cc-0007.tar"
    result = fetch_img2dataset_shard(
        part, out, stats, "cc-0007", executable=str(fake_img2dataset), threads=3, retries=1
    )

    args = json.loads((tmp_path / "args.json").read_text())
    opts = dict(zip(args[0::2], args[1::2], strict=True))
    assert opts["--url_list"] == str(part.resolve())
    assert opts["--input_format"] == "tsv" and opts["--output_format"] == "webdataset"
    assert opts["--url_col"] == "url" and opts["--caption_col"] == "caption"
    assert opts["--number_sample_per_shard"] == "4" and opts["--thread_count"] == "3" and opts["--retries"] == "1"
    assert opts["--enable_wandb"] == "False" and opts["--distributor"] == "multiprocessing"

    kept = samples_of(out)
    assert [s["__key__"] for s in kept] == ["cc-0007_000000", "cc-0007_000001"]
    assert [s["txt"] for s in kept] == [b"caption 0", b"caption 2"]  # URL-list order restored
    assert stats.samples_in == 4 and stats.samples_out == 2
    assert dict(stats.skipped) == {"download_failed": 1, "lost_in_img2dataset": 1}
    stats.check()
    assert result["successes"] == 2
    assert stats.info["source"]["img2dataset"]["errors"] == {"HTTP Error 404: Not Found": 1}
    assert [p.name for p in out.parent.iterdir()] == ["cc-0007.tar"], "the temporary folder must be removed"


def test_fetch_img2dataset_shard_errors(tmp_path, fake_img2dataset, monkeypatch):
    part = _write_part(tmp_path / "p.tsv", [("http://e.com/0.jpg", "zero")])
    with pytest.raises(DownloadError, match="make venv"):
        fetch_img2dataset_shard(part, tmp_path / "o.tar", new_stats(), "s0", executable="no-such-img2dataset-exe")
    with pytest.raises(DownloadError, match="make venv"):
        fetch_img2dataset_shard(part, tmp_path / "o.tar", new_stats(), "s0", executable=str(tmp_path / "nope"))
    monkeypatch.setenv("FAKE_I2D_MODE", "crash")
    with pytest.raises(DownloadError, match=r"(?s)exit code 3.*something broke"):
        fetch_img2dataset_shard(part, tmp_path / "o.tar", new_stats(), "s0", executable=str(fake_img2dataset))
    assert not (tmp_path / "o.tar").exists()
    # An empty part gives an empty shard without running img2dataset.
    empty = _write_part(tmp_path / "empty.tsv", [])
    stats = new_stats()
    fetch_img2dataset_shard(empty, tmp_path / "e.tar", stats, "s0", executable=str(fake_img2dataset))
    assert samples_of(tmp_path / "e.tar") == [] and stats.samples_in == 0


IMAGES = {
    "/img/red.png": ("image/png", image_bytes("PNG", (220, 20, 20), (64, 48))),
    "/img/green.jpg": ("image/jpeg", image_bytes("JPEG", (20, 220, 20), (50, 80))),
    "/img/blue.png": ("image/png", image_bytes("PNG", (20, 20, 220), (33, 33))),
    "/page.html": ("text/html; charset=utf-8", b"<html><body>not an image</body></html>"),
}


class FileServer(LocalServer):
    """Serves ``files`` (URL path -> bytes, or (content type, bytes)); 404 for anything else. Paths in ``cut``
    announce more bytes than they send (a connection cut short)."""

    def __init__(self, files: dict[str, bytes | tuple[str, bytes]], cut: frozenset[str] = frozenset()):
        class Handler(_QuietHandler):
            def do_GET(self):
                path = urllib.parse.urlsplit(self.path).path
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


@pytest.fixture
def image_server():
    server = FileServer(IMAGES)
    try:
        yield server.url
    finally:
        server.close()


@pytest.mark.slow
def test_img2dataset_real_cli_against_local_server(tmp_path, image_server):
    exe = Path(os.environ.get("POWERCLIP_IMG2DATASET", REPO_ROOT / ".venv-img2dataset" / "bin" / "img2dataset"))
    if not exe.exists():
        pytest.skip(f"img2dataset not installed at {exe} (run `make venv` or set POWERCLIP_IMG2DATASET)")
    rows = [
        (f"{image_server}/img/red.png", "a red rectangle"),
        (f"{image_server}/missing.png", "this one 404s"),
        (f"{image_server}/img/green.jpg", 'He said "green" \u2014 caf\u00e9'),
        (f"{image_server}/page.html", "an html page, not an image"),
        (f"{image_server}/img/blue.png", "a blue square"),
    ]
    url_list = tmp_path / "urls.tsv"
    url_list.write_text("".join(f"{u}\t{c}\n" for u, c in rows), encoding="utf-8")
    summary = split_url_list(url_list, tmp_path / "parts", ["cc-0000"], samples_per_shard=10, header=False)
    assert summary["parts"]["cc-0000"]["rows"] == 5

    stats = new_stats("cc-0000")
    out = tmp_path / "shards" / "cc-0000.tar"
    result = fetch_img2dataset_shard(
        tmp_path / "parts" / "cc-0000.tsv", out, stats, "cc-0000", image_size=32, executable=str(exe),
        threads=4, retries=0, timeout=5,
    )  # fmt: skip

    kept = samples_of(out)
    assert [s["__key__"] for s in kept] == ["cc-0000_000000", "cc-0000_000001", "cc-0000_000002"]
    assert [s["txt"].decode() for s in kept] == ["a red rectangle", 'He said "green" \u2014 caf\u00e9', "a blue square"]
    for sample, (url, _) in zip(kept, [rows[0], rows[2], rows[4]], strict=True):
        assert json.loads(sample["json"])["url"] == url
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            assert min(img.size) == 32  # keep_ratio: the smaller side becomes image_size
    assert result["count"] == 5 and result["successes"] == 3
    assert stats.samples_in == 5 and stats.samples_out == 3
    assert dict(stats.skipped) == {"download_failed": 1, "resize_failed": 1}
    stats.check()
    assert [p.name for p in out.parent.iterdir()] == ["cc-0000.tar"]


# ------------------------------------------------------------------------------------------------ Hugging Face


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


@pytest.mark.parametrize("lfs", [True, False], ids=["lfs-redirect", "plain-git-file"])
def test_huggingface_download_verify_and_repackage(hf_env, tmp_path, combined_shard, lfs):
    data, samples = combined_shard
    hub = FakeHub({"train/00000.tar": data}, lfs=lfs)
    try:
        stats = new_stats("00000")
        out = tmp_path / "shards" / "00000.tar"
        result = fetch_huggingface_shard(REPO, "train/00000.tar", out, stats, endpoint=hub.endpoint, cache_dir=hf_env)
        assert result["sha256"] == hashlib.sha256(data).hexdigest()
        assert result["size"] == len(data) and result["commit"] == COMMIT
        assert samples_of(out) == samples  # every member of every sample survives, keys unchanged
        assert stats.samples_in == 3 and stats.samples_out == 3 and not stats.skipped
        assert stats.info["source"]["commit"] == COMMIT
        downloads = hub.count("GET")
        assert downloads == 1
        if lfs:
            assert hub.count("GET", "/cdn/") == 1  # the bytes came from the "CDN" the HEAD redirected to

        # Second fetch: served from the verified cache, only metadata requests.
        again = fetch_huggingface_shard(
            REPO, "train/00000.tar", tmp_path / "again.tar", new_stats(), endpoint=hub.endpoint, cache_dir=hf_env
        )
        assert again["sha256"] == result["sha256"] and hub.count("GET") == downloads
    finally:
        hub.close()


@pytest.mark.parametrize(
    "repo,revision,filename,error",
    [
        (REPO, "main", "train/99999.tar", "EntryNotFound"),
        (REPO, "v9", "train/00000.tar", "RevisionNotFound"),
        ("nobody/nothing", "main", "train/00000.tar", "RepositoryNotFound"),
    ],
)
def test_huggingface_missing_fails_at_once(hf_env, tmp_path, combined_shard, repo, revision, filename, error):
    hub = FakeHub({"train/00000.tar": combined_shard[0]})
    try:
        started = time.monotonic()
        with pytest.raises(DownloadError) as info:
            fetch_huggingface_shard(
                repo, filename, tmp_path / "o.tar", new_stats(), revision=revision, endpoint=hub.endpoint,
                cache_dir=hf_env, retries=3, backoff_s=5.0,
            )  # fmt: skip
        message = str(info.value)
        assert repo in message and repr(revision) in message and filename in message and error in message
        assert time.monotonic() - started < 4.0, "a missing file must not be retried"
        assert hub.requests == [("HEAD", hub.requests[0][1])]
        assert not (tmp_path / "o.tar").exists()
    finally:
        hub.close()


def test_huggingface_corrupt_bytes_fail_after_retries(hf_env, tmp_path, combined_shard):
    hub = FakeHub({"train/00000.tar": combined_shard[0]}, corrupt=True)
    try:
        with pytest.raises(DownloadError, match=r"(?s)3 attempt.*sha256"):
            fetch_huggingface_shard(
                REPO, "train/00000.tar", tmp_path / "o.tar", new_stats(), endpoint=hub.endpoint, cache_dir=hf_env,
                retries=2, backoff_s=0.01,
            )  # fmt: skip
        assert hub.count("GET", "/cdn/") == 3
        assert not (tmp_path / "o.tar").exists()
        blobs = list(hf_env.glob("datasets--*/blobs/*"))
        assert blobs == [], f"corrupt downloads must not stay in the cache: {blobs}"
    finally:
        hub.close()


def test_huggingface_retries_server_errors_then_succeeds(hf_env, tmp_path, combined_shard):
    hub = FakeHub({"train/00000.tar": combined_shard[0]}, fail_first=2)
    try:
        stats = new_stats()
        result = fetch_huggingface_shard(
            REPO, "train/00000.tar", tmp_path / "o.tar", stats, endpoint=hub.endpoint, cache_dir=hf_env,
            retries=3, backoff_s=0.01,
        )  # fmt: skip
        assert result["size"] == len(combined_shard[0]) and stats.samples_out == 3
        assert [m for m, _ in hub.requests[:2]] == ["HEAD", "HEAD"]
    finally:
        hub.close()


def test_huggingface_offline_uses_verified_cache(hf_env, tmp_path, combined_shard, monkeypatch):
    from huggingface_hub import constants

    hub = FakeHub({"train/00000.tar": combined_shard[0]})
    try:
        first = fetch_huggingface_shard(
            REPO, "train/00000.tar", tmp_path / "a.tar", new_stats(), endpoint=hub.endpoint, cache_dir=hf_env
        )
    finally:
        hub.close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    stats = new_stats()
    again = fetch_huggingface_shard(REPO, "train/00000.tar", tmp_path / "b.tar", stats, cache_dir=hf_env)
    assert again["sha256"] == first["sha256"] and again["commit"] == COMMIT and stats.samples_out == 3
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        fetch_huggingface_shard(REPO, "train/00001.tar", tmp_path / "c.tar", new_stats(), cache_dir=hf_env)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_fetch_checkpoint_verifies_and_retries(tmp_path, monkeypatch):
    import hashlib as _hashlib

    from powerclip.download import fetch_checkpoint

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


def test_fetch_clip_benchmark_wds_layout(hf_env, tmp_path):
    """A clip-benchmark WebDataset fetched from a (fake) Hub lands in the layout clip-benchmark reads."""
    from powerclip.download import clip_benchmark_repo, fetch_clip_benchmark_wds

    assert clip_benchmark_repo("wds/vtab/cifar100") == "clip-benchmark/wds_vtab-cifar100"
    write_tar(tmp_path / "0.tar", [("000", {"jpg": image_bytes("JPEG", (1, 2, 3)), "cls": b"1"})])
    files = {
        "test/nshards.txt": b"2\n",
        "test/0.tar": (tmp_path / "0.tar").read_bytes(),
        "test/1.tar": (tmp_path / "0.tar").read_bytes(),
        "classnames.txt": b"cat\ndog\n",
        "zeroshot_classification_templates.txt": b"a photo of a {c}.\n",
    }
    hub = FakeHub(files, lfs=False)
    try:
        prefix, name = REPO.split("/")
        out = tmp_path / "eval" / "wds_x"
        info = fetch_clip_benchmark_wds(f"wds/{name}", out, repo_prefix=f"{prefix}/", endpoint=hub.endpoint, backoff_s=0)
        assert info["nshards"] == 2 and "dataset_type.txt" not in info["files"]
        for rel, data in files.items():
            assert (out / rel).read_bytes() == data
        assert sorted(p.name for p in out.parent.iterdir()) == ["wds_x"]  # no temp folder left
        from clip_benchmark.datasets.builder import build_wds_dataset

        ds = build_wds_dataset(f"wds/{name}", transform=None, data_dir=str(out))
        assert ds.classes == ["cat", "dog"] and len(list(ds)) == 2
        with pytest.raises(DownloadError, match="nshards.txt"):
            fetch_clip_benchmark_wds(f"wds/{name}", tmp_path / "other", split="train", repo_prefix=f"{prefix}/",
                                     endpoint=hub.endpoint, backoff_s=0)  # fmt: skip
        assert not (tmp_path / "other").exists()
    finally:
        hub.close()


# ------------------------------------------------------------------------------------------------ SugarCrepe

SUGAR_CREPE_IMAGES = {  # COCO-style names; one grayscale image, as COCO val2017 has some
    "000000000139.jpg": Image.new("RGB", (48, 40), (200, 40, 40)),
    "000000000285.jpg": Image.new("L", (40, 56), 90),
    "000000000632.jpg": Image.new("RGB", (64, 64), (30, 60, 210)),
}
SUGAR_CREPE_ADD_ATT = {  # ids are not contiguous in the real files either
    "0": {"filename": "000000000139.jpg", "caption": "a red square", "negative_caption": "a red square and a dog"},
    "3": {"filename": "000000000285.jpg", "caption": "a grey wall", "negative_caption": "a grey wall with a window"},
    "7": {"filename": "000000000632.jpg", "caption": "the blue sky", "negative_caption": "the cloudy blue sky"},
}
BAD_ANNOTATIONS = {
    "missing_negative": (
        {"0": SUGAR_CREPE_ADD_ATT["0"], "1": {"filename": "000000000285.jpg", "caption": "a wall"}},
        r"record '1': 'negative_caption' is None",
    ),
    "not_an_object": ([SUGAR_CREPE_ADD_ATT["0"]], "expected a non-empty JSON object"),
    "path_in_filename": (
        {"5": {**SUGAR_CREPE_ADD_ATT["0"], "filename": "../000000000139.jpg"}},
        "record '5': filename '../000000000139.jpg' is not a plain file name",
    ),
}


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sugar_crepe(tmp_path_factory):
    """SugarCrepe's add_att task, fetched over HTTP from 127.0.0.1 with the workflow's own functions."""
    from powerclip.download import fetch_sugar_crepe_images, fetch_sugar_crepe_task

    images = {name: jpeg_bytes(image) for name, image in SUGAR_CREPE_IMAGES.items()}
    archive = zip_bytes({"val2017/": b"", **{f"val2017/{n}": data for n, data in images.items()}, "LICENSE.txt": b"cc"})
    annotations = json.dumps(SUGAR_CREPE_ADD_ATT).encode()
    files = {"/zips/val2017.zip": archive, "/data/add_att.json": annotations, "/page.html": b"<html>moved</html>"}
    files.update({f"/data/{name}.json": json.dumps(body).encode() for name, (body, _) in BAD_ANNOTATIONS.items()})
    server = FileServer(files)
    root = tmp_path_factory.mktemp("eval") / "sugar_crepe"
    try:
        fetched_images = fetch_sugar_crepe_images(
            f"{server.url}/zips/val2017.zip", root / "val2017", sha256=hashlib.sha256(archive).hexdigest(), backoff_s=0
        )
        url = "{base}/data/{task}.json".format(base=server.url, task="add_att")  # the config's template
        fetched_task = fetch_sugar_crepe_task(url, root / "add_att.json", backoff_s=0)
        yield types.SimpleNamespace(
            root=root, server=server, images=images, annotations=annotations, archive=archive,
            fetched_images=fetched_images, fetched_task=fetched_task,
        )  # fmt: skip
    finally:
        server.close()


@pytest.fixture
def no_wget(monkeypatch):
    """clip-benchmark shells out to wget/unzip for missing SugarCrepe files: make any such call fail."""
    import clip_benchmark.datasets.builder as builder

    def refuse(cmd, **kwargs):
        raise AssertionError(f"clip-benchmark tried to download: {cmd}")

    monkeypatch.setattr(builder, "call", refuse)


def test_sugar_crepe_fetch_lays_out_what_clip_benchmark_reads(sugar_crepe, no_wget):
    from clip_benchmark.datasets.builder import build_dataset

    root = sugar_crepe.root
    assert sorted(p.name for p in root.iterdir()) == ["add_att.json", "val2017"]  # no temp file or archive left
    assert sorted(p.name for p in root.parent.iterdir()) == ["sugar_crepe"]
    assert {p.name: p.read_bytes() for p in (root / "val2017").iterdir()} == sugar_crepe.images
    assert (root / "add_att.json").read_bytes() == sugar_crepe.annotations  # kept byte for byte
    images = sugar_crepe.fetched_images
    assert images["files"] == images["images"] == 3 and images["skipped"] == 1  # LICENSE.txt is outside val2017/
    assert images["sha256"] == hashlib.sha256(sugar_crepe.archive).hexdigest()
    task = sugar_crepe.fetched_task
    assert (task["samples_in"], task["samples_out"], task["samples_skipped"]) == (3, 3, 0)
    assert task["counters"] == {"images": 3} and task["shard"] == "add_att"
    assert task["info"]["source"]["url"].endswith("/data/add_att.json")

    dataset = build_dataset("sugar_crepe/add_att", root=str(root), transform=None, task="image_caption_selection")
    assert len(dataset) == 3
    for i, record in enumerate(SUGAR_CREPE_ADD_ATT.values()):
        image, captions = dataset[i]
        expected = SUGAR_CREPE_IMAGES[record["filename"]]
        assert image.size == expected.size and image.mode == expected.mode
        assert captions == [record["caption"], record["negative_caption"]]


def test_sugar_crepe_evaluation_matches_hand_computation(sugar_crepe, no_wget, tmp_path):
    """One real evaluation through run_benchmark (what rule eval_benchmark calls) with a tiny checkpoint."""
    import open_clip
    import torch
    import torch.nn.functional as F

    from powerclip.evaluate import eval_transform, run_benchmark
    from powerclip.model import create_model, save_checkpoint

    model = create_model("PowerCLIP-Tiny-64-8", seed=0).eval()
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", model)
    out = tmp_path / "sugar_crepe_add_att.json"
    result = run_benchmark(
        checkpoint, "sugar_crepe/add_att", sugar_crepe.root, "image_caption_selection", out, device="cpu"
    )
    assert json.loads(out.read_text()) == result and result["dataset"] == "sugar_crepe/add_att"
    metrics = result["metrics"]
    assert 0.0 <= metrics["acc"] <= 1.0 and metrics["tie_rate"] == 0.0

    records = list(SUGAR_CREPE_ADD_ATT.values())
    transform = eval_transform(model)
    with torch.no_grad():  # batched like clip-benchmark: all images, then all captions, in one batch each
        pixels = torch.stack([transform(Image.open(sugar_crepe.root / "val2017" / r["filename"])) for r in records])
        images = F.normalize(model.encode_image(pixels), dim=-1)
        captions = [c for r in records for c in (r["caption"], r["negative_caption"])]
        texts = F.normalize(model.encode_text(open_clip.get_tokenizer("PowerCLIP-Tiny-64-8")(captions)), dim=-1)
    scores = (images[:, None, :] * texts.view(len(records), 2, -1)).sum(-1)
    margins = scores[:, 0] - scores[:, 1]
    assert margins.abs().min() > 1e-5  # no near-tie that float noise could flip
    assert metrics["acc"] == metrics["text_acc_ties_split"] == pytest.approx((margins > 0).double().mean().item())


@pytest.mark.parametrize("member", ["../evil", "val2017/../../evil", "/tmp/evil", "..\\evil"])
def test_extract_zip_rejects_unsafe_members(tmp_path, member):
    from powerclip.download import extract_zip

    archive = tmp_path / "val2017.zip"
    archive.write_bytes(zip_bytes({"val2017/000000000139.jpg": b"jpeg", member: b"payload"}))
    out = tmp_path / "eval" / "val2017"
    with pytest.raises(ValueError, match=re.escape(f"unsafe member {member!r}")):
        extract_zip(archive, out, subdir="val2017")
    assert not (tmp_path / "eval").exists()  # checked before anything is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val2017.zip"] and not Path("/tmp/evil").exists()


def test_extract_zip_without_the_folder_names_what_it_found(tmp_path):
    from powerclip.download import extract_zip

    archive = tmp_path / "val2014.zip"
    archive.write_bytes(zip_bytes({"val2014/000000000042.jpg": b"jpeg"}))
    with pytest.raises(ValueError, match=r"no file under val2017/ \(top-level entries: \['val2014'\]\)"):
        extract_zip(archive, tmp_path / "out" / "val2017", subdir="val2017")
    with pytest.raises(ValueError, match="not a readable zip file"):
        extract_zip(tmp_path / "missing.zip", tmp_path / "out" / "val2017")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("name", sorted(BAD_ANNOTATIONS))
def test_fetch_sugar_crepe_task_rejects_bad_annotations(sugar_crepe, tmp_path, name):
    from powerclip.download import fetch_sugar_crepe_task

    url = f"{sugar_crepe.server.url}/data/{name}.json"
    with pytest.raises(ValueError, match=re.escape(url) + ": .*" + BAD_ANNOTATIONS[name][1]):
        fetch_sugar_crepe_task(url, tmp_path / "task" / "add_att.json", backoff_s=0)
    assert list((tmp_path / "task").iterdir()) == []  # nothing moved into place, no temp file left


def test_fetch_sugar_crepe_task_errors_name_the_url(sugar_crepe, tmp_path):
    from powerclip.download import fetch_sugar_crepe_task

    page = f"{sugar_crepe.server.url}/page.html"
    with pytest.raises(ValueError, match=re.escape(page) + ": not a JSON file"):
        fetch_sugar_crepe_task(page, tmp_path / "add_att.json", backoff_s=0)
    missing = f"{sugar_crepe.server.url}/data/add_color.json"
    with pytest.raises(DownloadError, match=re.escape(missing) + ": HTTP 404; check the annotations URL"):
        fetch_sugar_crepe_task(missing, tmp_path / "add_att.json", backoff_s=0)
    assert list(tmp_path.iterdir()) == []


def test_fetch_url_retries_a_cut_connection_then_fails(tmp_path):
    from powerclip.download import fetch_url

    server = FileServer({"/val2017.zip": b"PK" * 50}, cut=frozenset({"/val2017.zip"}))
    try:
        with pytest.raises(DownloadError, match="after 2 attempts: .*got 100 of the 200 bytes announced"):
            fetch_url(f"{server.url}/val2017.zip", tmp_path / "val2017.zip", retries=2, backoff_s=0)
    finally:
        server.close()
    assert list(tmp_path.iterdir()) == []
