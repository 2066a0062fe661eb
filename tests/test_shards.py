import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from powerclip.shards import (
    ShardFormatError,
    ShardWriter,
    StageStats,
    atomic_output,
    atomic_output_dir,
    iter_samples,
    key_problem,
    read_keys,
    scratch_dir,
    split_member_name,
)

REPO = Path(__file__).resolve().parent.parent
UNSAFE_KEYS = ["../../tmp/evil", "/tmp/abs", "a/../b", "a/./b", "./c", "a//b", "a/", "", "a\\b", "a\0b"]


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "sub" / "out.tar"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(target.parent.iterdir()) == [target]


def test_shard_writer_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "s.tar"
    with pytest.raises(ValueError):
        with ShardWriter(path) as sink:
            sink.write("a", {"txt": b"x"})
            raise ValueError("interrupted")
    assert not path.exists() and list(tmp_path.iterdir()) == []
    with ShardWriter(path) as sink:
        sink.write("a", {"txt": b"x", "samlens.npy": b"1"})
        sink.write("b", {"txt": b"y"})
    assert list(iter_samples(path)) == [
        {"__key__": "a", "txt": b"x", "samlens.npy": b"1"},
        {"__key__": "b", "txt": b"y"},
    ]
    assert list(iter_samples(path, fields={"txt"})) == [{"__key__": "a", "txt": b"x"}, {"__key__": "b", "txt": b"y"}]


def test_webdataset_reads_what_we_write(tmp_path):
    import webdataset as wds

    path = tmp_path / "s.tar"
    with ShardWriter(path) as sink:
        sink.write("k0", {"txt": b"hello", "json": b"{}"})
    (sample,) = list(wds.WebDataset(str(path), shardshuffle=False))
    assert sample["__key__"] == "k0" and sample["txt"] == b"hello"


def test_keys_with_dots_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="contains a dot"):
        with ShardWriter(tmp_path / "s.tar") as sink:
            sink.write("a.b", {"txt": b"x"})


def test_member_names_split_like_webdataset():
    assert split_member_name("000123.samlens.npy") == ("000123", "samlens.npy")
    assert split_member_name("dir/k.jpg") == ("dir/k", "jpg")


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_errors_name_the_shard_and_the_key(tmp_path):
    bad = tmp_path / "split.tar"
    _tar(bad, [("a.txt", b"1"), ("b.txt", b"2"), ("a.jpg", b"3")])
    with pytest.raises(ShardFormatError, match=r"split.tar: sample 'a' appears twice"):
        read_keys(bad)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file at all" * 100)
    with pytest.raises(ShardFormatError, match="garbage.tar"):
        read_keys(garbage)
    truncated = tmp_path / "truncated.tar"
    _tar(tmp_path / "ok.tar", [("a.txt", b"x" * 5000), ("b.txt", b"y" * 5000)])
    assert read_keys(tmp_path / "ok.tar") == ["a", "b"]
    for cut in (6000, 5632, 11264, 7000):  # inside a header, at a member boundary, before the marker, in data
        truncated.write_bytes((tmp_path / "ok.tar").read_bytes()[:cut])
        with pytest.raises(ShardFormatError, match="truncated.tar"):
            read_keys(truncated)


def test_stage_stats_must_add_up(tmp_path):
    stats = StageStats("x", "s")
    stats.samples_in = 3
    stats.samples_out = 1
    stats.skip("empty_caption", "k1")
    with pytest.raises(AssertionError, match="samples_in=3"):
        stats.write(tmp_path / "s.json")
    stats.skip("empty_caption", "k2")
    summary = stats.write(tmp_path / "s.json")
    assert summary["samples_skipped"] == 2 and summary["skipped_by_reason"] == {"empty_caption": 2}


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_refused_by_every_writer(tmp_path, key):
    """A key is extracted as a path later: absolute, '..', '.', empty parts, backslashes and NULs never reach a tar."""
    assert key_problem(key) is not None
    with pytest.raises(ValueError, match="unsafe"):
        with ShardWriter(tmp_path / "s.tar") as sink:
            sink.write("fine", {"txt": b"x"})
            sink.write(key, {"txt": b"x"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["000123", "dir/k_1", "a-b/c.d/e", "cc-0007_000001"])
def test_safe_keys_pass(key):
    assert key_problem(key) is None


def _stale(path: Path, kind: str, folder: bool = False) -> Path:
    """A temporary named as the helpers name theirs (.<name>.<8 random>.<kind>), as a killed job leaves it."""
    stale = path.parent / f".{path.name}.k3x9_a2b.{kind}"
    if folder:
        (stale / "inner").mkdir(parents=True)
        (stale / "inner" / "half.jpg").write_bytes(b"half")
    else:
        stale.write_bytes(b"half")
    return stale


def test_stale_temporaries_of_the_same_output_are_removed_at_start(tmp_path):
    out = tmp_path / "out.tar"
    neighbours = [tmp_path / ".other.tar.k3x9_a2b.part", tmp_path / ".out.tar.stats.json.k3x9_a2b.part", tmp_path / "x.part"]
    for n in neighbours:
        n.write_bytes(b"not ours")
    _stale(out, "part")
    with ShardWriter(out) as sink:
        sink.write("a", {"txt": b"x"})
    assert read_keys(out) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([n.name for n in neighbours] + ["out.tar"])

    folder = tmp_path / "suite"
    for kind in ("tmp", "old"):
        _stale(folder, kind, folder=True)
    with atomic_output_dir(folder) as tmp:
        (tmp / "ok.txt").write_text("whole")
    assert [p.name for p in folder.iterdir()] == ["ok.txt"]
    assert not list(tmp_path.glob(".suite.*"))

    _stale(folder, "scratch", folder=True)
    with scratch_dir(folder) as work:
        (work / "download.zip").write_bytes(b"zip")
        assert [p.name for p in tmp_path.glob(".suite.*")] == [work.name]
    assert not list(tmp_path.glob(".suite.*"))


def test_leftovers_of_a_killed_job_are_cleaned_by_the_next(tmp_path):
    """SIGKILL in the middle of writing a shard: the next writer of that shard removes the temp file."""
    code = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1]); from powerclip.shards import ShardWriter; "
        "w = ShardWriter(sys.argv[2]); w.write('a', {'txt': b'x' * 100000}); os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(REPO), str(tmp_path / "s.tar")], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".s.tar.") and left.name.endswith(".part") and left.stat().st_size > 0
    with ShardWriter(tmp_path / "s.tar") as sink:
        sink.write("b", {"txt": b"y"})
    assert [p.name for p in tmp_path.iterdir()] == ["s.tar"] and read_keys(tmp_path / "s.tar") == ["b"]
    assert os.stat(tmp_path / "s.tar").st_size > 0
