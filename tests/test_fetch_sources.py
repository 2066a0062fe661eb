"""The shard sources: repackaging, local tars, the registry through which fetch_shard reaches every source, and
the refusals that keep a shard safe (unsafe keys) and a failed job cheap (no retry of a corrupt tar)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from servers import REPO_ROOT, image_bytes, new_stats, npy_bytes, raw_tar, samples_of, write_tar
from servers import combined_shard, fake_img2dataset, hf_env  # noqa: F401 - fixtures

from powerclip.datasets import local_shards as expand_local_pattern
from powerclip.fetch.local import fetch_local_shard
from powerclip.fetch.repackage import repackage_shard
from powerclip.shards import ShardFormatError

UNSAFE_KEYS = ["../../tmp/evil", "/tmp/abs", "a/../b", "a/./b", "./c", "a//b", "a\\b"]


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

def test_repackage_refuses_unsafe_keys(tmp_path):
    """Member names like ../../tmp/evil would be written outside the folder by a later extractall."""
    jpg = image_bytes("JPEG", (5, 5, 5))
    members = [(f"{key}.{ext}", data) for key in ["ok", *UNSAFE_KEYS, "dir/fine"] for ext, data in (("jpg", jpg), ("txt", b"cap"))]
    src = raw_tar(tmp_path / "in.tar", members)
    stats = new_stats()
    repackage_shard(src, tmp_path / "out" / "s0.tar", stats)
    assert [s["__key__"] for s in samples_of(tmp_path / "out" / "s0.tar")] == ["ok", "dir/fine"]
    assert dict(stats.skipped) == {"unsafe_key": len(UNSAFE_KEYS)}
    stats.check()
    with tarfile.open(tmp_path / "out" / "s0.tar") as tar:
        assert sorted(tar.getnames()) == ["dir/fine.jpg", "dir/fine.txt", "ok.jpg", "ok.txt"]


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



# ------------------------------------------------------------------------------------------------ registry


def test_registry_names_every_source_the_config_allows():
    from powerclip.datasets import SOURCES as NAMES
    from powerclip.fetch.registry import SOURCES

    schema = yaml.safe_load((REPO_ROOT / "schemas" / "config.schema.yaml").read_text())
    allowed = schema["properties"]["datasets"]["additionalProperties"]["properties"]["source"]["enum"]
    assert set(SOURCES) == set(NAMES) == set(allowed)


@pytest.fixture
def one_shard_of_each_source(tmp_path, hf_env, combined_shard, fake_img2dataset):
    """source -> (dataset entry, fetch_shard keywords, expected keys) for one real shard of every source."""
    from servers import REPO, FakeHub, write_part

    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    synthetic = {**config["datasets"]["shapes"], "num_shards": 3}
    synthetic["synthetic"] = {**synthetic["synthetic"], "samples_per_shard": 2}
    jpg = image_bytes("JPEG", (5, 5, 5))
    local = write_tar(tmp_path / "local" / "x-0001.tar", [("a", {"jpg": jpg, "txt": b"one"})])
    (tmp_path / "parts").mkdir()
    write_part(tmp_path / "parts" / "00001.tsv", [(f"http://e.com/{i}.jpg", f"caption {i}") for i in range(4)])
    hub = FakeHub({"train/00001.tar": combined_shard[0]})
    cases = {
        "synthetic": (synthetic, {"index": 1}, ["00001_000000", "00001_000001"]),
        "local": ({"source": "local", "local": {"pattern": str(local.parent)}}, {"src": local}, ["a"]),
        "img2dataset": (
            {"source": "img2dataset", "img2dataset": {"url_list": "-", "samples_per_shard": 4, "executable": str(fake_img2dataset)}},
            {"parts_dir": tmp_path / "parts"},
            ["00001_000000", "00001_000001"],
        ),
        "huggingface": (
            {"source": "huggingface", "huggingface": {"repo_id": REPO, "filename_pattern": "train/{00000..00001}.tar",
                                                      "endpoint": hub.endpoint, "cache_dir": str(hf_env)}},
            {"filename": "train/00001.tar"},
            [s["__key__"] for s in combined_shard[1]],
        ),
    }  # fmt: skip
    try:
        yield cases
    finally:
        hub.close()


@pytest.mark.parametrize("source", ["synthetic", "local", "img2dataset", "huggingface"])
def test_each_source_is_reached_through_the_registry(tmp_path, monkeypatch, one_shard_of_each_source, source):
    """fetch_shard dispatches by name through SOURCES: the registered function runs, a real shard comes out."""
    from powerclip.fetch import registry

    dataset, given, keys = one_shard_of_each_source[source]
    calls = []
    real = registry.SOURCES[source]
    monkeypatch.setitem(registry.SOURCES, source, lambda job, stats: calls.append(job) or real(job, stats))
    out = tmp_path / "shards" / "00001.tar"
    stats = registry.fetch_shard(dataset, "00001", out, out.with_suffix(".stats.json"), **given)
    assert len(calls) == 1 and calls[0].shard == "00001" and calls[0].out_tar == out
    assert stats["info"]["source"]["type"] == source
    assert [s["__key__"] for s in samples_of(out)] == keys
    assert stats["samples_out"] == len(keys) and stats["samples_in"] == stats["samples_out"] + stats["samples_skipped"]


def test_fetch_shard_names_what_is_missing(tmp_path):
    from powerclip.fetch.registry import fetch_shard

    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    with pytest.raises(ValueError, match=r"shard '00002': source 'synthetic' needs 'index'"):
        fetch_shard(config["datasets"]["shapes"], "00002", tmp_path / "s.tar", tmp_path / "s.json")
    with pytest.raises(ValueError, match="unknown dataset source 'ftp'"):
        fetch_shard({"source": "ftp"}, "00002", tmp_path / "s.tar", tmp_path / "s.json")
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_local_shard_fails_at_once(tmp_path):
    """A format error cannot change on a rerun: the fetch_shard job runs once, not once per Snakemake retry."""
    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "corrupt.tar").write_bytes(b"this is not a tar" * 100)
    config["datasets"]["bad"] = {"source": "local", "local": {"pattern": str(tmp_path / "bad" / "*.tar")}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run(
        [str(bin_dir / "snakemake"), "-s", str(REPO_ROOT / "Snakefile"), "--cores", "1", "--configfile",
         str(tmp_path / "config.yaml"), "--directory", str(tmp_path / "work"), "resources/bad/shards/corrupt.tar"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.count("Error in rule fetch_shard:") == 1, proc.stderr[-3000:]
    assert "Trying to restart" not in proc.stderr
    log = (tmp_path / "work" / "logs" / "fetch_shard" / "bad" / "corrupt.log").read_text()
    assert "corrupt.tar: not a readable (uncompressed) tar file" in log
    assert not (tmp_path / "work" / "resources" / "bad" / "shards" / "corrupt.tar").exists()
