"""The huggingface source against a fake Hub on 127.0.0.1: verified downloads, what is retried and what is not."""

from __future__ import annotations

import hashlib
import time

import pytest
from servers import COMMIT, REPO, FakeHub, image_bytes, new_stats, raw_tar, samples_of
from servers import combined_shard, hf_env  # noqa: F401 - fixtures

from powerclip.fetch.http import DownloadError
from powerclip.fetch.huggingface import fetch_huggingface_shard


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


def test_huggingface_unsafe_keys_of_a_release_are_dropped(hf_env, tmp_path):
    """A release is repackaged like any tar: a key that is a path outside the folder never reaches the shard."""
    jpg = image_bytes("JPEG", (1, 2, 3))
    keys = ("000000000", "../../tmp/evil", "/tmp/abs")
    release = raw_tar(tmp_path / "release.tar", [(f"{k}.{ext}", d) for k in keys for ext, d in (("jpg", jpg), ("txt", b"a caption"))])
    hub = FakeHub({"train/00000.tar": release.read_bytes()})
    try:
        stats = new_stats()
        fetch_huggingface_shard(REPO, "train/00000.tar", tmp_path / "o.tar", stats, endpoint=hub.endpoint, cache_dir=hf_env)
    finally:
        hub.close()
    assert [s["__key__"] for s in samples_of(tmp_path / "o.tar")] == ["000000000"]
    assert dict(stats.skipped) == {"unsafe_key": 2}
