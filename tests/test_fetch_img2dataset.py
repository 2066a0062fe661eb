"""URL-list splitting and the img2dataset source (a stand-in CLI, and the real one against a local server)."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image
from servers import IMAGES, REPO_ROOT, FileServer, new_stats, samples_of, write_part
from servers import fake_img2dataset  # noqa: F401 - a fixture

from powerclip.fetch.http import DownloadError
from powerclip.fetch.img2dataset import fetch_img2dataset_shard
from powerclip.fetch.url_list import split_url_list


def read_part(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle, delimiter="\t", quotechar='"'))



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


def test_fetch_img2dataset_shard_folds_cli_output(tmp_path, fake_img2dataset):
    part = write_part(tmp_path / "p.tsv", [(f"http://e.com/{i}.jpg", f"caption {i}") for i in range(4)])
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
    part = write_part(tmp_path / "p.tsv", [("http://e.com/0.jpg", "zero")])
    with pytest.raises(DownloadError, match="make venv"):
        fetch_img2dataset_shard(part, tmp_path / "o.tar", new_stats(), "s0", executable="no-such-img2dataset-exe")
    with pytest.raises(DownloadError, match="make venv"):
        fetch_img2dataset_shard(part, tmp_path / "o.tar", new_stats(), "s0", executable=str(tmp_path / "nope"))
    monkeypatch.setenv("FAKE_I2D_MODE", "crash")
    with pytest.raises(DownloadError, match=r"(?s)exit code 3.*something broke"):
        fetch_img2dataset_shard(part, tmp_path / "o.tar", new_stats(), "s0", executable=str(fake_img2dataset))
    assert not (tmp_path / "o.tar").exists()
    # An empty part gives an empty shard without running img2dataset.
    empty = write_part(tmp_path / "empty.tsv", [])
    stats = new_stats()
    fetch_img2dataset_shard(empty, tmp_path / "e.tar", stats, "s0", executable=str(fake_img2dataset))
    assert samples_of(tmp_path / "e.tar") == [] and stats.samples_in == 0



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


