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

    summary = main(train_argv(shards, tmp_path, "--method", "powerclip", "--sam-loss-ratio", "0.1"))
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

    argv = train_argv(shards, tmp_path, "--method", "clip")
    i = argv.index("--phrases-dir")
    del argv[i : i + 4]  # no sidecars at all
    main(argv)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert rows and all(r["loss"] == r["contrastive_loss"] and "local_loss" not in r for r in rows)


def test_missing_sidecar_is_a_clear_error(shards, tmp_path):
    from powerclip.train import main

    argv = train_argv(shards, tmp_path, "--method", "powerclip", "--sam-loss-ratio", "0.1")
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
    extra = ["--method", "powerclip", "--sam-loss-ratio", "0.1", "--save-every", "3"]
    proc = _run(train_argv(shards, straight, *extra, steps_epochs=(steps, epochs)), env)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    proc = _run(train_argv(shards, killed, *extra, steps_epochs=(steps, epochs)), env)
    resume = killed / "work" / "resume" / "latest.pt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if resume.exists() and torch.load(resume, weights_only=True)["step"] >= 6:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "checkpoint.pt").exists()
    resumed_from = torch.load(resume, weights_only=True)["step"]
    assert 6 <= resumed_from < steps * epochs
    proc = _run(train_argv(shards, killed, *extra, steps_epochs=(steps, epochs)), env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert f"resumed from {resume} at step {resumed_from}" in err
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "checkpoint.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = list(csv.DictReader((killed / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, steps * epochs + 1))
    same = ("step", "epoch", "lr", "loss", "contrastive_loss", "local_loss", "logit_scale")
    reference = list(csv.DictReader((straight / "metrics.csv").open()))
    assert [[r[k] for k in same] for r in rows] == [[r[k] for k in same] for r in reference]


def test_two_ranks_through_torchrun_train_one_model(shards, tmp_path):
    """DDP as the cluster runs it (torchrun --standalone, one process per GPU), here 2 CPU ranks over gloo."""
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = train_argv(shards, tmp_path, "--method", "powerclip", "--sam-loss-ratio", "0.1", "--gather-with-grad")
    argv[argv.index("--batch-size") + 1] = "4"  # per rank: the global batch stays 8
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nnodes=1", "--nproc-per-node=2", "-m", "powerclip.train", *argv],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stderr and "global batch 8" in proc.stderr
    training = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["training"]
    assert training["world_size"] == 2 and training["global_batch"] == 8 and training["steps"] == 2
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))  # written by rank 0 alone
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(float(r["local_loss"]) > 0 and float(r["contrastive_loss"]) > 0 for r in rows)


class RunsCode:
    """Unpickling this calls Path.touch on a marker file: a pickle that runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_resume_file_that_would_run_code_is_refused(shards, tmp_path):
    from powerclip.train import main

    marker = tmp_path / "ran"
    resume = tmp_path / "work" / "resume" / "latest.pt"
    resume.parent.mkdir(parents=True)
    torch.save({"step": 1, "payload": RunsCode(marker)}, resume)
    with pytest.raises(RuntimeError, match="cannot be read as a resume checkpoint of plain tensors"):
        main(train_argv(shards, tmp_path, "--method", "clip"))
    assert not marker.exists()


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    from powerclip.model import load_model

    marker = tmp_path / "ran"
    torch.save({"powerclip_cfg": {}, "state_dict": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()


def test_regions_of_another_grid_are_refused(shards, tmp_path):
    """The sidecars' stats record their grid: 64/16 regions never reach a 64/8 model."""
    import json
    import shutil

    from powerclip.train import main

    regions = tmp_path / "regions"
    shutil.copytree(shards / "regions", regions)
    for stats in regions.glob("*.json"):
        shutil.move(stats, stats.with_suffix("").with_suffix(".stats.json"))
    argv = train_argv(shards, tmp_path, "--method", "powerclip")
    argv[argv.index("--regions-dir") + 1] = str(regions)
    stats = regions / "00000.stats.json"
    info = json.loads(stats.read_text())
    info["info"]["patch_size"] = 16
    stats.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="mapped onto a 64/16 grid .* the model's grid is 64/8"):
        main(argv)


def test_a_region_cell_outside_the_grid_names_the_sample(tmp_path):
    """Without stats (e.g. combined-format shards), each sample's cells are checked against the grid."""
    from powerclip.csr import npy_bytes, to_csr
    from powerclip.data import DataConfig, SampleProcessor
    from powerclip.synthetic import ShapesConfig, write_shard
    from powerclip.shards import iter_samples

    write_shard(tmp_path / "s.tar", "s", 0, 1, seed=0, config=ShapesConfig())
    sample = next(iter(iter_samples(tmp_path / "s.tar")))
    lens, cat = to_csr([[0, 1], [70]])
    sample.update({"samlens.npy": npy_bytes(lens.astype("int32")), "samcat.npy": npy_bytes(cat.astype("int16")), "njson": b'{"lengths": [1], "indices": [1]}', "__shard__": "s.tar"})
    with pytest.raises(ValueError, match=r"s.tar: sample .* region cell >= 64, outside the model's 64/8 grid"):
        SampleProcessor(DataConfig(image_size=64, patch_size=8))(sample)


def test_provenance_prints_what_the_checkpoint_was_trained_with(shards, tmp_path, capsys):
    from powerclip.provenance import main as provenance
    from powerclip.train import main

    main(train_argv(shards, tmp_path, "--method", "powerclip", "--sam-loss-ratio", "0.3"))
    info = provenance([str(tmp_path / "checkpoint.pt")])
    out = capsys.readouterr().out
    assert info["args"]["sam_loss_ratio"] == 0.3 and info["args"]["method"] == "powerclip" and info["steps"] == 2
    assert "  sam_loss_ratio: 0.3" in out and "vision_pool: avg" in out
