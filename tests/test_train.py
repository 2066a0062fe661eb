"""The trainer on the tiny model, CPU, fixed seeds: a short run, resume after a kill, plain CLIP."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from powerclip.phrases import parse_shard
from powerclip.regions import PatchGrid, segment_shard
from powerclip.synthetic import ShapesConfig, write_shard

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory, extractor):
    """Two shapes shards of 48 samples with phrases and felzenszwalb regions, in the workflow's layout."""
    root = tmp_path_factory.mktemp("data")
    for i in range(2):
        name = f"{i:05d}"
        raw = root / "shards" / f"{name}.tar"
        write_shard(raw, name, i, 48, seed=0, config=ShapesConfig())
        parse_shard(raw, root / "phrases" / f"{name}.tar", root / "phrases" / f"{name}.json", name, extractor=extractor)
        segment_shard(
            raw, root / "regions" / f"{name}.tar", root / "regions" / f"{name}.json", name, "felzenszwalb",
            PatchGrid(64, 8), options={"scale": 500, "sigma": 0.5, "min_size": 30},
        )  # fmt: skip
    return root


def train_argv(shards, tmp_path, *extra, steps_epochs=(2, 1)):
    batch = 8
    samples, epochs = steps_epochs[0] * batch, steps_epochs[1]
    return [
        "--train-data", str(shards / "shards" / "{00000,00001}.tar"),
        "--phrases-dir", str(shards / "phrases"),
        "--regions-dir", str(shards / "regions"),
        "--samples-per-epoch", str(samples), "--epochs", str(epochs),
        "--batch-size", str(batch), "--workers", "0", "--shuffle-buffer", "32",
        "--model", "PowerCLIP-Tiny-64-8", "--lr", "1e-3", "--warmup", "2", "--seed", "0",
        "--threads", "1", "--log-every", "1",
        "--checkpoint", str(tmp_path / "checkpoint.pt"), "--metrics", str(tmp_path / "metrics.csv"),
        "--work-dir", str(tmp_path / "work"), *extra,
    ]  # fmt: skip


def test_two_step_run_writes_checkpoint_and_metrics(shards, tmp_path):
    from powerclip.model import load_model
    from powerclip.train import main

    summary = main(train_argv(shards, tmp_path, "--sam-loss-ratio", "0.1"))
    assert summary["steps"] == 2
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2]
    for row in rows:
        assert float(row["local_loss"]) > 0 and float(row["contrastive_loss"]) > 0
        assert float(row["loss"]) == pytest.approx(float(row["contrastive_loss"]) + 0.1 * float(row["local_loss"]), rel=1e-4)
    model = load_model(tmp_path / "checkpoint.pt")
    assert model.visual.pool_type == "avg"
    assert not (tmp_path / "work" / "resume" / "latest.pt").exists()  # superseded by the final checkpoint


def test_plain_clip_needs_no_sidecars(shards, tmp_path):
    from powerclip.train import main

    argv = train_argv(shards, tmp_path, "--sam-loss-ratio", "0")
    i = argv.index("--phrases-dir")
    del argv[i : i + 4]  # no sidecars at all
    main(argv)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert all(float(r["local_loss"]) == 0 and r["loss"] == r["contrastive_loss"] for r in rows)


def test_missing_sidecar_is_a_clear_error(shards, tmp_path):
    from powerclip.train import main

    argv = train_argv(shards, tmp_path, "--sam-loss-ratio", "0.1")
    argv[argv.index("--regions-dir") + 1] = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(argv)


def _run(argv, env):
    return subprocess.Popen([sys.executable, "-m", "powerclip.train", *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(shards, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    steps, epochs = 4, 3  # 12 steps, a resumable checkpoint every 3: the kill lands mid-epoch
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    extra = ["--sam-loss-ratio", "0.1", "--save-every", "3"]
    proc = _run(train_argv(shards, straight, *extra, steps_epochs=(steps, epochs)), env)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    proc = _run(train_argv(shards, killed, *extra, steps_epochs=(steps, epochs)), env)
    resume = killed / "work" / "resume" / "latest.pt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if resume.exists() and torch.load(resume, weights_only=False)["step"] >= 6:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "checkpoint.pt").exists()
    resumed_from = torch.load(resume, weights_only=False)["step"]
    assert 6 <= resumed_from < steps * epochs
    proc = _run(train_argv(shards, killed, *extra, steps_epochs=(steps, epochs)), env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert f"resumed from {resume} at step {resumed_from}" in err
    a = torch.load(straight / "checkpoint.pt", weights_only=False)["state_dict"]
    b = torch.load(killed / "checkpoint.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader((killed / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, steps * epochs + 1))
    same = ("step", "epoch", "lr", "loss", "contrastive_loss", "local_loss", "logit_scale")
    reference = list(csv.DictReader((straight / "metrics.csv").open()))
    assert [[r[k] for k in same] for r in rows] == [[r[k] for k in same] for r in reference]


def test_two_ranks_through_torchrun_train_one_model(shards, tmp_path):
    """DDP as the cluster runs it (torchrun --standalone, one process per GPU), here 2 CPU ranks over gloo."""
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = train_argv(shards, tmp_path, "--sam-loss-ratio", "0.1", "--gather-with-grad")
    argv[argv.index("--batch-size") + 1] = "4"  # per rank: the global batch stays 8
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nnodes=1", "--nproc-per-node=2", "-m", "powerclip.train", *argv],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr and "global batch 8" in proc.stderr
    training = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["training"]
    assert training["world_size"] == 2 and training["global_batch"] == 8 and training["steps"] == 2
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))  # written by rank 0 alone
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(float(r["local_loss"]) > 0 and float(r["contrastive_loss"]) > 0 for r in rows)
