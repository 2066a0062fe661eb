"""The workflow itself: lint, formatting, dry runs, and a real tiny run of the data stages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from powerclip.csr import decode_njson, decode_regions
from powerclip.shards import iter_samples, read_keys

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SNAKEMAKE = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile")]


def run(args, cwd, timeout=600, check=True, env=None):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def micro_config(tmp_path, **datasets):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["datasets"]["shapes"]["num_shards"] = 2
    cfg["datasets"]["shapes"]["synthetic"]["samples_per_shard"] = 24
    cfg["train"].update(samples_per_epoch=32, epochs=2, batch_size=16, warmup_steps=1, save_every_steps=1, log_every_steps=1)
    cfg["evaluation"]["items_per_suite"] = 24
    cfg["datasets"]["shapes_heldout"]["synthetic"]["samples_per_shard"] = 4
    cfg["pictures"]["samples"] = 2
    # two runs of the demo's table (its extra seeds would only repeat them)
    runs = (REPO / "config" / "runs.tsv").read_text().splitlines()
    (tmp_path / "runs.tsv").write_text("\n".join(line for line in runs if line.split("\t")[0] in ("run", "clip", "powerclip")) + "\n")
    cfg["runs"] = str(tmp_path / "runs.tsv")
    cfg["datasets"].update(datasets)
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def job_counts(proc):
    """The job stats table of a dry run as {rule: count}, and the whole output."""
    text = proc.stdout + proc.stderr
    counts = {}
    for line in text[text.index("Job stats:") : text.index("\n\n", text.index("Job stats:"))].splitlines()[3:]:
        rule, count = line.split()
        counts[rule] = int(count)
    return counts, text


def test_every_rule_names_an_existing_env():
    from envcheck import rule_envs

    envs = rule_envs()
    assert {"fetch_shard", "parse_shard", "segment_shard", "segment_shard_sam", "train"} <= set(envs)
    for rule, env in envs.items():
        if rule == "all":
            continue
        assert env is not None and env.exists(), f"rule {rule} names no existing conda env ({env})"
        assert env.parent == REPO / "envs"


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
    # the held-out pictures need the phrases and one region source of one more dataset's shards
    held_out = cfg["datasets"][cfg["pictures"]["dataset"]]["num_shards"]
    for rule, count in [
        ("fetch_shard", shards + held_out),
        ("parse_shard", shards + held_out),
        ("segment_shard", shards * sources + held_out),
    ]:
        assert any(line.split() == [rule, str(count)] for line in proc.stdout.splitlines()), proc.stdout


def test_dry_run_of_sam_targets_names_gpu_rules(tmp_path):
    proc = dry_run(tmp_path, "results/shapes/regions/sam/00000.tar", "results/shapes/regions/sam2/00001.tar")
    assert "rule segment_shard_sam:" in proc.stdout and "rule segment_shard_sam2:" in proc.stdout
    assert "gpu=1" in proc.stdout
    # the checkpoints are inputs, fetched first
    assert "resources/checkpoints/sam_vit_h_4b8939.pth" in proc.stdout and "fetch_checkpoint" in proc.stdout


def test_paper_config_dry_run_through_the_slurm_profile(tmp_path):
    """The whole CC12M DAG resolves with the real profile (conda swapped for env-modules: no conda here)."""
    proc = run(
        SNAKEMAKE + ["-n", "--profile", str(REPO / "slurm"), "--sdm", "env-modules", "--configfile",
                     str(REPO / "config" / "cc12m.yaml"), "--directory", str(tmp_path), "all"],
        cwd=REPO, timeout=300,
    )  # fmt: skip
    counts = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    assert counts["fetch_shard"] == counts["segment_shard_sam2"] == 2176
    # 26 clip-benchmark WebDatasets + SugarCrepe's 7 tasks (one JSON each, one shared COCO val2017 folder)
    # ... and PASCAL VOC 2012 segmentation (one val folder, fetched once)
    # the run table: 12 PowerCLIP rows and ablations + flip, clip-pgs-0.3/0.5, clip-stock, clippy (both kinds), clips
    assert counts["train"] == 19 and counts["fetch_eval_dataset"] == 26
    # clips reads synthetic captions: one recaption table fetched and indexed once, joined per shard
    assert counts["fetch_recaption_table"] == counts["index_recaption_table"] == 1
    assert counts["recaption_shard"] == 2176 and counts["summarize_recaptions"] == 1
    assert counts["eval_benchmark"] == counts["train"] * (26 + 7 + 1) and counts["fetch_voc"] == 1
    assert counts["fetch_sugar_crepe_task"] == 7 and counts["fetch_sugar_crepe_images"] == 1
    train = proc.stdout[proc.stdout.index("rule train:") :]
    assert "gpu=8" in train[: train.index("\n\n")]


@pytest.mark.parametrize(
    "run_name, extra",
    [("flip", []), ("powerclip-oracle-s1", ["--config", "runs=config/runs_study.tsv"])],  # demo table, study table
)
def test_one_ablation_target_trains_and_evaluates_only_that_run(tmp_path, run_name, extra):
    proc = dry_run(tmp_path, f"results/runs/{run_name}/eval.csv", *extra)
    counts = {p[0]: int(p[1]) for p in (line.split() for line in proc.stdout.splitlines()) if len(p) == 2 and p[1].isdigit()}
    benchmarks = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["evaluation"]["benchmarks"]
    assert counts["train"] == 1 and counts["eval_benchmark"] == len(benchmarks) and counts["aggregate_run_eval"] == 1
    assert "aggregate_eval" not in counts
    assert f"wildcards: run={run_name}" in proc.stdout and "run=clip" not in proc.stdout


@pytest.mark.slow
def test_sam_rules_run_with_random_weights(tmp_path):
    """segment_shard_sam / _sam2 through the workflow on CPU with untrained weights (format check only)."""
    cfg = yaml.safe_load(micro_config(tmp_path).read_text())
    cfg["datasets"]["shapes"]["synthetic"]["samples_per_shard"] = 2
    tiny = {"allow_random_weights": True, "checkpoint": None, "points_per_side": 2, "pred_iou_thresh": 0.0,
            "stability_score_thresh": 0.0, "device": "cpu"}  # fmt: skip
    cfg["segment"]["sam"] = {"model_type": "vit_b", **tiny}
    cfg["segment"]["sam2"] = {"config": "configs/sam2.1/sam2.1_hiera_t.yaml", **tiny}
    cfg["segment"]["gpus"] = 0
    config = tmp_path / "sam.yaml"
    config.write_text(yaml.safe_dump(cfg))
    imports = tmp_path / "imports"
    targets = ["results/shapes/regions/sam/00000.tar", "results/shapes/regions/sam2/00000.tar"]
    run(SNAKEMAKE + ["--cores", "2", "--configfile", str(config), "--directory", str(tmp_path), *targets],
        cwd=REPO, env={"POWERCLIP_RECORD_IMPORTS": str(imports)})  # fmt: skip
    keys = read_keys(tmp_path / "resources/shapes/shards/00000.tar")
    for source in ("sam", "sam2"):
        assert read_keys(tmp_path / f"results/shapes/regions/{source}/00000.tar") == keys
        stats = json.loads((tmp_path / f"results/shapes/regions/{source}/00000.stats.json").read_text())
        assert stats["samples_in"] == 2 and stats["info"]["source"] == source
    from envcheck import check_recorded

    assert {json.loads(p.read_text())["rule"] for p in imports.glob("*.json")} >= {"segment_shard_sam", "segment_shard_sam2"}
    assert check_recorded(imports) == {}


def test_invalid_config_fails_at_parse_time(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["grid"]["patch_size"] = "eight"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = run(SNAKEMAKE + ["-n", "--cores", "1", "--configfile", str(bad), "--directory", str(tmp_path)], cwd=REPO, check=False)
    assert proc.returncode != 0 and "patch_size" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda cfg, runs: cfg.update(trian={"epochs": 1}), "Additional properties are not allowed ('trian' was unexpected)"),
        (lambda cfg, runs: cfg["grid"].update(patch_size=16), "does not match train.model 'PowerCLIP-Tiny-64-8' (image_size 64, patch_size 8)"),
        (lambda cfg, runs: runs.write_text(runs.read_text().splitlines()[0] + "\n"), "the run table has only its header"),
        (lambda cfg, runs: runs.write_text(runs.read_text().replace("clip-pgs-0.5\t", "..\t")), "row 4 (line 5): run name '..' is not a plain name"),
    ],
)
def test_bad_configuration_is_refused_before_any_job(tmp_path, change, message):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    runs = tmp_path / "runs.tsv"
    runs.write_text((REPO / "config" / "runs.tsv").read_text())
    cfg["runs"] = str(runs)
    change(cfg, runs)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = run(SNAKEMAKE + ["-n", "--configfile", str(bad), "--directory", str(tmp_path)], cwd=REPO, check=False)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "resources").exists()


def test_the_design_card_command_needs_no_flag(tmp_path):
    """`snakemake -n results/eval.csv` in the repository: the workflow profile gives the cores."""
    proc = run([str(BIN / "snakemake"), "-n", "results/eval.csv"], cwd=REPO)
    assert "aggregate_eval" in proc.stdout


@pytest.mark.slow
def test_train_rule_in_a_checkout_whose_path_has_a_space(tmp_path):
    """The train rule passes paths as arguments, never through a shell: a space anywhere is fine."""
    checkout = tmp_path / "a checkout" / "powerclip workflow"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in files.stdout.splitlines():
        if (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            (checkout / name).write_bytes((REPO / name).read_bytes())
    work = tmp_path / "work dir"
    work.mkdir()
    config = micro_config(work)
    run([str(BIN / "snakemake"), "-s", str(checkout / "Snakefile"), "--cores", "2", "--configfile", str(config),
         "--directory", str(work), "results/runs/clip/checkpoint.pt"], cwd=checkout)  # fmt: skip
    assert torch.load(work / "results/runs/clip/checkpoint.pt", weights_only=True)["training"]["steps"] == 4


@pytest.mark.slow
def test_tiny_real_run_of_the_data_stages(tmp_path):
    local = {"source": "local", "local": {"pattern": str(tmp_path / "resources/shapes/shards/*.tar")}}
    config = micro_config(tmp_path, copy=local)
    base = SNAKEMAKE + ["--cores", "2", "--configfile", str(config), "--directory", str(tmp_path)]
    imports = tmp_path / "imports"
    run(base + ["all"], cwd=REPO, env={"POWERCLIP_RECORD_IMPORTS": str(imports)})
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
    from powerclip.model import load_model

    for name in ("clip", "powerclip"):
        model = load_model(tmp_path / f"results/runs/{name}/checkpoint.pt")
        assert model.visual.pool_type == "avg"
        rows = (tmp_path / f"results/runs/{name}/metrics.csv").read_text().splitlines()
        assert len(rows) == 1 + 4  # header + 2 epochs x 2 steps
        assert (tmp_path / f"logs/train/{name}.log").exists()
    # the results table: every run x benchmark, the documented columns, a headline summary
    import pandas as pd

    table = pd.read_csv(tmp_path / "results/eval.csv")
    assert list(table.columns) == ["run", "benchmark", "task", "metric", "value"]
    benchmarks = set(yaml.safe_load(config.read_text())["evaluation"]["benchmarks"])
    assert set(table["run"]) == {"clip", "powerclip"} and set(table["benchmark"]) == benchmarks
    assert table["value"].between(0, 1).all()
    summary = pd.read_csv(tmp_path / "results/eval_summary.csv", index_col="run")
    assert set(summary.index) == {"clip", "powerclip"} and set(summary.columns) == benchmarks
    for png in ("eval_bars", "training_curves"):
        assert (tmp_path / f"results/plots/{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = run(base + ["--report", str(tmp_path / "report.html")], cwd=REPO)
    html = (tmp_path / "report.html").read_text()
    assert "eval_bars.png" in html and "eval.csv" in html, report.stderr[-2000:]
    for name in ("clip", "powerclip"):  # region-phrase pictures of the held-out images, in the report too
        assert (tmp_path / f"results/runs/{name}/region_phrases.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "2 pictures of resources/shapes_heldout/shards/00000.tar" in (tmp_path / f"logs/draw_region_phrases/{name}.log").read_text()
    assert "region_phrases.png" in html
    seeds = pd.read_csv(tmp_path / "results/eval_seeds.csv")
    assert set(seeds["setting"]) == {"clip", "powerclip"} and (seeds["n"] == 1).all()
    for name in ("clip", "powerclip"):
        own = pd.read_csv(tmp_path / f"results/runs/{name}/eval.csv")
        assert set(own["run"]) == {name} and len(own) == (table["run"] == name).sum()
    # every job's imports are provided by its rule's conda env
    from envcheck import check_recorded

    assert {json.loads(p.read_text())["rule"] for p in imports.glob("*.json")} == {
        "fetch_shard", "parse_shard", "segment_shard", "train", "write_eval_suites", "eval_benchmark",
        "aggregate_run_eval", "aggregate_eval", "plot_results", "draw_region_phrases", "region_quality",
    }  # fmt: skip
    assert check_recorded(imports) == {}
    # nothing left to do on a second run
    again = run(base + ["-n", "all"], cwd=REPO)
    assert "Nothing to be done" in again.stdout + again.stderr
    # a changed row reruns exactly that run's training, evaluation and the aggregation
    runs_tsv = Path(yaml.safe_load(config.read_text())["runs"])
    runs_tsv.write_text(runs_tsv.read_text().replace("powerclip\tpowerclip\tfelzenszwalb\t0.1", "powerclip\tpowerclip\tfelzenszwalb\t0.5"))
    counts, text = job_counts(run(base + ["-n", "results/eval.csv"], cwd=REPO))
    assert counts == {"train": 1, "eval_benchmark": len(benchmarks), "aggregate_run_eval": 1, "aggregate_eval": 1, "total": 3 + len(benchmarks)}
    assert "run=clip" not in text and "Params have changed since last execution" in text
    run(base + ["results/runs/powerclip/checkpoint.pt"], cwd=REPO)
    training = torch.load(tmp_path / "results/runs/powerclip/checkpoint.pt", weights_only=True)["training"]
    assert training["args"]["sam_loss_ratio"] == 0.5  # the checkpoint records the settings it was trained with
    # a changed train: setting reruns every run; a free-text description or a log interval none
    runs_tsv.write_text(runs_tsv.read_text().replace("OpenCLIP baseline", "The OpenCLIP baseline"))
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["log_every_steps"] = 2
    config.write_text(yaml.safe_dump(cfg))
    counts, _ = job_counts(run(base + ["-n", "all"], cwd=REPO))
    assert "train" not in counts  # (powerclip's evaluation is pending: only its checkpoint was rebuilt)
    cfg["train"]["epochs"] = 3
    config.write_text(yaml.safe_dump(cfg))
    counts, _ = job_counts(run(base + ["-n", "all"], cwd=REPO))
    assert counts["train"] == 2 and "fetch_shard" not in counts and "parse_shard" not in counts
    # the local source re-validates existing shards and keeps their keys
    run(base + ["resources/copy/shards/00001.tar"], cwd=REPO)
    assert read_keys(tmp_path / "resources/copy/shards/00001.tar") == read_keys(tmp_path / "resources/shapes/shards/00001.tar")


@pytest.mark.slow
def test_network_sources_through_the_rules(tmp_path):
    """img2dataset (split_url_list + fetch_shard) and huggingface, against servers on 127.0.0.1."""
    from servers import REPO as HUB_REPO
    from servers import IMAGES, FakeHub, FileServer

    exe = Path(os.environ.get("POWERCLIP_IMG2DATASET", REPO / ".venv-img2dataset" / "bin" / "img2dataset"))
    if not exe.exists():
        pytest.skip(f"img2dataset is not installed at {exe} (run `make venv`)")
    images = FileServer(IMAGES)
    release = tmp_path / "release"
    release.mkdir()
    for i in range(2):
        src = tmp_path / f"src{i}"
        run(SNAKEMAKE + ["--cores", "1", "--configfile", str(micro_config(tmp_path)), "--directory", str(src),
                         "resources/shapes/shards/00000.tar"], cwd=REPO)
        (release / f"part-{i}.tar").write_bytes((src / "resources/shapes/shards/00000.tar").read_bytes())
    hub = FakeHub({f"part-{i}.tar": (release / f"part-{i}.tar").read_bytes() for i in range(2)})
    try:
        base = images.url
        url_list = tmp_path / "urls.tsv"
        url_list.write_text(
            f"{base}/img/red.png\ta red square\n{base}/img/missing.jpg\ta lost picture\n"
            f"{base}/page.html\tnot an image\n{base}/img/blue.png\ta blue square\n{base}/img/green.jpg\ta green thing\n"
        )
        web = {
            "source": "img2dataset",
            "num_shards": 2,
            "img2dataset": {"url_list": str(url_list), "header": False, "samples_per_shard": 3, "image_size": 64,
                            "executable": str(exe), "timeout": 5, "retries": 0},
        }
        hf = {
            "source": "huggingface",
            "huggingface": {"repo_id": HUB_REPO, "filename_pattern": "part-{0..1}.tar", "endpoint": hub.endpoint,
                            "cache_dir": str(tmp_path / "hf_cache")},
        }
        config = micro_config(tmp_path, web=web, hub=hf)
        env = {"POWERCLIP_RECORD_IMPORTS": str(tmp_path / "imports"), "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        targets = ["results/web/phrases/00000.tar", "results/web/phrases/00001.tar", "results/hub/phrases/part-1.tar"]
        run(SNAKEMAKE + ["--cores", "2", "--configfile", str(config), "--directory", str(tmp_path), *targets],
            cwd=REPO, env=env)
    finally:
        images.close()
        hub.close()
    stats = [json.loads((tmp_path / f"resources/web/shards/{s}.stats.json").read_text()) for s in ("00000", "00001")]
    assert [s["samples_in"] for s in stats] == [3, 2]
    assert sum(s["samples_out"] for s in stats) == 3
    assert sum(s["samples_skipped"] for s in stats) == 2
    for shard in ("00000", "00001"):
        keys = read_keys(tmp_path / f"resources/web/shards/{shard}.tar")
        assert keys == read_keys(tmp_path / f"results/web/phrases/{shard}.tar")
        assert all(k.startswith(f"{shard}_") for k in keys)
    assert read_keys(tmp_path / "resources/hub/shards/part-1.tar") == read_keys(release / "part-1.tar")
    assert read_keys(tmp_path / "results/hub/phrases/part-1.tar") == read_keys(release / "part-1.tar")
    from envcheck import check_recorded

    assert check_recorded(tmp_path / "imports") == {}
