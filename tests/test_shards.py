import io
import tarfile

import pytest

from powerclip.shards import (
    ShardFormatError,
    ShardWriter,
    StageStats,
    atomic_output,
    iter_samples,
    read_keys,
    split_member_name,
)


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
