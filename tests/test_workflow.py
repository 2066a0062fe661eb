"""The workflow itself: lint, formatting, dry runs, and a real tiny run of the data stages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from powerclip.csr import decode_njson, decode_regions
from powerclip.shards import iter_samples, read_keys

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SNAKEMAKE = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile")]


def run(args, cwd, timeout=600, check=True):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def micro_config(tmp_path, **datasets):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["datasets"]["shapes"]["num_shards"] = 2
    cfg["datasets"]["shapes"]["synthetic"]["samples_per_shard"] = 24
    cfg["datasets"].update(datasets)
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_lint():
    proc = run([str(BIN / "snakemake"), "--lint"], cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_snakefmt():
    proc = run([str(BIN / "snakefmt"), "--check", "."], cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dry_run(tmp_path, *targets, config=REPO / "config" / "config.yaml"):
    """A dry run in an empty working directory, so earlier results in the repository do not matter."""
    return run(SNAKEMAKE + ["-n", "--cores", "2", "--configfile", str(config), "--directory", str(tmp_path), *targets], cwd=REPO)


def test_dry_run_of_the_default_config_lists_every_shard_job(tmp_path):
    proc = dry_run(tmp_path, "all")
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    shards = cfg["datasets"][cfg["dataset"]]["num_shards"]
    sources = len(cfg["segment"]["sources"])
    for rule, count in [("fetch_shard", shards), ("parse_shard", shards), ("segment_shard", shards * sources)]:
        assert any(line.split() == [rule, str(count)] for line in proc.stdout.splitlines()), proc.stdout


def test_dry_run_of_sam_targets_names_gpu_rules(tmp_path):
    proc = dry_run(tmp_path, "results/shapes/regions/sam/00000.tar", "results/shapes/regions/sam2/00001.tar")
    assert "rule segment_shard_sam:" in proc.stdout and "rule segment_shard_sam2:" in proc.stdout
    assert "gpu=1" in proc.stdout


def test_invalid_config_fails_at_parse_time(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["grid"]["patch_size"] = "eight"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = run(SNAKEMAKE + ["-n", "--cores", "1", "--configfile", str(bad), "--directory", str(tmp_path)], cwd=REPO, check=False)
    assert proc.returncode != 0 and "patch_size" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_tiny_real_run_of_the_data_stages(tmp_path):
    local = {"source": "local", "local": {"pattern": str(tmp_path / "resources/shapes/shards/*.tar")}}
    config = micro_config(tmp_path, copy=local)
    base = SNAKEMAKE + ["--cores", "2", "--configfile", str(config), "--directory", str(tmp_path)]
    run(base + ["all"], cwd=REPO)
    shards = ["00000", "00001"]
    for shard in shards:
        raw = tmp_path / f"resources/shapes/shards/{shard}.tar"
        keys = read_keys(raw)
        assert len(keys) == 24
        phrases = tmp_path / f"results/shapes/phrases/{shard}.tar"
        assert read_keys(phrases) == keys
        assert all(decode_njson(s["njson"]) for s in iter_samples(phrases))
        for source in ("felzenszwalb", "random"):
            regions = tmp_path / f"results/shapes/regions/{source}/{shard}.tar"
            assert read_keys(regions) == keys
            for sample in iter_samples(regions):
                cells = decode_regions(sample["samlens.npy"], sample["samcat.npy"])
                assert cells and all(0 <= c < 64 for region in cells for c in region)
        for stats_path in [
            raw.with_suffix(".stats.json"),
            phrases.with_suffix(".stats.json"),
            *(tmp_path / f"results/shapes/regions/{s}/{shard}.stats.json" for s in ("felzenszwalb", "random")),
        ]:
            stats = json.loads(stats_path.read_text())
            assert stats["samples_in"] == stats["samples_out"] + stats["samples_skipped"] == 24
        for log in ("fetch_shard", "parse_shard"):
            assert (tmp_path / f"logs/{log}/shapes/{shard}.log").read_text().strip()
    # nothing left to do on a second run
    again = run(base + ["-n", "all"], cwd=REPO)
    assert "Nothing to be done" in again.stdout + again.stderr
    # the local source re-validates existing shards and keeps their keys
    run(base + ["resources/copy/shards/00001.tar"], cwd=REPO)
    assert read_keys(tmp_path / "resources/copy/shards/00001.tar") == read_keys(tmp_path / "resources/shapes/shards/00001.tar")
