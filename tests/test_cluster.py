"""The workflow on a real one-node SLURM cluster: the profile slurm/config.yaml, sacct polling, a GPU rule.

tests/cluster/slurm_up.sh installs and starts SLURM 22.05 from Debian's packages (munge, MariaDB + slurmdbd,
slurmctld, slurmd with two fake GPUs), the test runs a micro config of the workflow through
`snakemake --profile slurm`, and tests/cluster/slurm_down.sh stops the daemons afterwards, pass or fail.
Needs root (it installs packages and starts daemons); see tests/cluster/README.md.
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLUSTER = REPO / "tests" / "cluster"
ACCOUNT = os.environ.get("POWERCLIP_SLURM_ACCOUNT", "powerclip-ci")
CPU_PARTITION = "cpu"  # the partitions slurm_up.sh creates; the profile's GPU rules ask for "gpu"
GPU_PARTITION = "gpu"
TARGET = "results/runs/powerclip/checkpoint.pt"
SNAKEMAKE_TIMEOUT = 900
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct")


def slurm_env():
    """The submitting environment, which jobs inherit (sbatch --export=ALL): this venv first on PATH (torchrun)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SNAKEMAKE_", "SLURM_", "SBATCH_", "SRUN_"))}
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/local/bin:/usr/bin:/bin')}:/usr/sbin:/sbin"
    env["TQDM_DISABLE"] = "1"
    return env


def cluster_script(name, *args, timeout=600):
    return subprocess.run(
        ["bash", str(CLUSTER / name), *args], env=slurm_env(), capture_output=True, text=True, timeout=timeout
    )


def load_profile():
    return yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())


def rule_names():
    return {m for path in (REPO / "rules").glob("*.smk") for m in re.findall(r"^rule (\w+):", path.read_text(), flags=re.M)}


def test_profile_names_only_existing_rules_and_no_gres_tasks_or_gpu_counts():
    """Snakemake ignores set-resources of unknown rules silently; plugin 2.x refuses GRES, `tasks` starts the
    command once per GPU, and GPU counts come from the config (segment.gpus, train.gpus), which also sizes torchrun."""
    profile = load_profile()
    assert profile["executor"] == "slurm"
    assert not set(profile["set-resources"]) - rule_names(), "set-resources names a rule that does not exist"
    for rule, resources in profile["set-resources"].items():
        assert not {"gres", "tasks", "tasks_per_gpu", "slurm_extra", "gpu", "gpus"} & set(resources), rule


def test_profile_gives_the_gpu_rules_a_gpu_partition_in_a_dry_run(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["segment"]["sources"] = ["felzenszwalb", "sam", "sam2"]
    cfg["train"]["gpus"] = 2
    config = tmp_path / "gpu.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [
        "timeout", "-s", "INT", "-k", "10", "300", str(BIN / "snakemake"), "-n", "all",
        "--snakefile", str(REPO / "Snakefile"), "--profile", "slurm", "--software-deployment-method", "env-modules",
        "--configfile", str(config), "--directory", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=slurm_env(), capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resources, rule = {}, None
    for line in proc.stdout.splitlines():
        if match := re.match(r"(?:local)?rule (\w+):$", line):
            rule = match.group(1)
        elif rule and (match := re.match(r"\s+resources: (.*)$", line)):
            resources[rule] = dict(kv.split("=", 1) for kv in match.group(1).split(", "))
    profile = load_profile()["set-resources"]
    for rule in ("segment_shard_sam", "segment_shard_sam2", "train"):
        cpus = str(profile[rule]["cpus_per_gpu"])
        assert resources[rule]["slurm_partition"] == GPU_PARTITION and resources[rule]["cpus_per_gpu"] == cpus, resources[rule]
    assert resources["train"]["gpu"] == "2" and resources["segment_shard_sam"]["gpu"] == "1"
    for rule in ("parse_shard", "segment_shard"):
        assert resources[rule]["slurm_partition"] == CPU_PARTITION and "gpu" not in resources[rule], resources[rule]


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running one-node cluster for the module; always torn down, also when bring-up or the test fails."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the SLURM cluster test runs on Linux only")
    if os.geteuid() != 0:
        pytest.skip("the SLURM cluster test needs root (it installs Debian packages and starts daemons)")
    installed = all(shutil.which(d, path="/usr/sbin:/usr/bin:/sbin:/bin") for d in DAEMONS)
    if not installed and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is unavailable to install it")
    try:
        t0 = time.monotonic()
        up = cluster_script("slurm_up.sh")
        elapsed = time.monotonic() - t0
        if up.returncode != 0:
            pytest.fail(f"tests/cluster/slurm_up.sh failed ({up.returncode}) after {elapsed:.0f} s:\n{up.stdout}\n{up.stderr}")
        print(f"slurm_up.sh: {elapsed:.1f} s\n{up.stderr.strip()}")
        yield
    finally:
        down = cluster_script("slurm_down.sh", timeout=180)
        print(f"slurm_down.sh ({down.returncode}): {down.stderr.strip()}")


def micro_config(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["datasets"][cfg["dataset"]]["num_shards"] = 2
    cfg["datasets"][cfg["dataset"]]["synthetic"]["samples_per_shard"] = 16
    cfg["segment"]["sources"] = ["felzenszwalb"]
    # gpus: 1 makes train a GPU rule (sbatch --gpus=1) launched by torchrun; torch sees no CUDA (the GPU is
    # fake), so the trainer runs on the CPU. mem_mb stays small for CI machines with little memory.
    cfg["train"].update(samples_per_epoch=32, epochs=1, batch_size=16, gpus=1, mem_mb=2000, runtime=30)
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def profile_default_resources():
    """The profile's default-resources with the SITE SETTINGS pointed at the test cluster.

    On the command line `--default-resources` replaces the profile's whole entry, so the other values
    (runtime, mem_mb) are passed on unchanged to keep testing them.
    """
    resources = {**load_profile()["default-resources"], "slurm_account": ACCOUNT, "slurm_partition": CPU_PARTITION}
    return [f"{k}={v}" for k, v in resources.items()]


def declared_localrules():
    """Rule names in `localrules:` directives, inline (`localrules: a, b`) or one per indented line (snakefmt)."""
    names = set()
    for path in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        for match in re.finditer(r"^localrules:(.*(?:\n[ \t]+\S.*)*)", path.read_text(), flags=re.M):
            names.update(n for n in re.split(r"[\s,]+", match.group(1)) if n)
    return names


def test_download_rules_are_local_rules():
    """Compute nodes usually have no internet: every rule of the download stage runs in the submitting process."""
    download = set(re.findall(r"^rule (\w+):", (REPO / "rules" / "download.smk").read_text(), flags=re.M))
    assert {"fetch_shard", "split_url_list"} <= download
    assert download <= declared_localrules(), f"not declared in localrules: {sorted(download - declared_localrules())}"
    assert "fetch_eval_dataset" in declared_localrules()


def sacct(job_ids):
    fields = ["JobIDRaw", "JobName", "Comment", "State", "Account", "Partition", "AllocTRES"]
    proc = subprocess.run(
        ["sacct", "-X", "-P", "-n", "-j", ",".join(job_ids), "-o", ",".join(fields)],
        env=slurm_env(), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return {row["JobIDRaw"]: row for row in (dict(zip(fields, line.split("|"))) for line in proc.stdout.splitlines())}


# Sourced by every non-interactive bash (BASH_ENV), so by each rule's shell inside the SLURM jobs: records
# the environment the rule's command sees. The workflow is not changed for it.
ENV_PROBE = """printf '%s|%s\\n' "${SLURM_JOB_ID-}" "${CUDA_VISIBLE_DEVICES-unset}" >> "$POWERCLIP_ENV_PROBE_LOG"\n"""


@pytest.mark.slow
@pytest.mark.cluster
def test_workflow_runs_through_slurm_with_a_gpu_for_train(slurm_cluster, tmp_path):
    config = micro_config(tmp_path)
    probe, probe_log = tmp_path / "env_probe.sh", tmp_path / "env_probe.log"
    probe.write_text(ENV_PROBE)
    env = {**slurm_env(), "BASH_ENV": str(probe), "POWERCLIP_ENV_PROBE_LOG": str(probe_log)}
    cmd = [
        "timeout", "-s", "INT", "-k", "30", str(SNAKEMAKE_TIMEOUT),
        str(BIN / "snakemake"), TARGET,
        "--snakefile", str(REPO / "Snakefile"),
        "--profile", "slurm",  # ./slurm/config.yaml: run from the repository root
        # No conda channel is reachable in CI: replace the profile's conda method; the rules then run in this
        # venv (script rules run with Snakemake's own python; the train rule starts torchrun with it too).
        "--software-deployment-method", "env-modules",
        "--configfile", str(config),
        "--directory", str(tmp_path),
        "--slurm-keep-successful-logs",
        "--slurm-init-seconds-before-status-checks", "1",
        "--default-resources", *profile_default_resources(),
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SNAKEMAKE_TIMEOUT + 60)
    elapsed = time.monotonic() - t0
    logs = tmp_path / ".snakemake" / "slurm_logs"
    report = f"snakemake exited {proc.returncode} after {elapsed:.0f} s\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    if proc.returncode != 0:
        for log in sorted(logs.rglob("*.log"))[-6:]:
            report += f"\n----- {log} -----\n{log.read_text()[-3000:]}"
    assert proc.returncode == 0, report
    print(f"snakemake through SLURM: {elapsed:.1f} s")

    # outputs
    checkpoint = tmp_path / TARGET
    assert checkpoint.stat().st_size > 0
    assert (tmp_path / "results/runs/powerclip/metrics.csv").stat().st_size > 0
    for shard in ("00000", "00001"):
        assert (tmp_path / f"results/shapes/phrases/{shard}.tar").exists()
        assert (tmp_path / f"results/shapes/regions/felzenszwalb/{shard}.tar").exists()

    # every job went through sbatch: one SLURM log per job, .snakemake/slurm_logs/rule_<rule>/<wildcards>/<jobid>.log
    job_rule = {log.stem: log.relative_to(logs).parts[0].removeprefix("rule_") for log in logs.glob("rule_*/**/*.log")}
    assert job_rule, f"no SLURM logs under {logs}\n{report}"
    # fetch_shard is a local rule (it may need the internet): it ran in this process, not as a SLURM job
    expected = {"parse_shard": 2, "segment_shard": 2, "train": 1}
    counts = {rule: list(job_rule.values()).count(rule) for rule in set(job_rule.values())}
    assert counts == expected, f"SLURM jobs per rule {counts}, expected {expected}"
    assert len(re.findall(r"^localrule fetch_shard:$", proc.stdout + proc.stderr, flags=re.M)) == 2, report

    # sacct knows them all: completed, charged to the test account, on the profile's partitions
    train_cpus = str(load_profile()["set-resources"]["train"]["cpus_per_gpu"])
    jobs = sacct(list(job_rule))
    assert set(jobs) == set(job_rule), f"sacct lists {sorted(jobs)}, the SLURM logs {sorted(job_rule)}"
    assert len({job["JobName"] for job in jobs.values()}) == 1, "one Snakemake run, one job name (its run id)"
    for job_id, job in jobs.items():
        rule = job_rule[job_id]
        assert re.fullmatch(rf"rule_{rule}(_wildcards_.*)?", job["Comment"]), job  # the plugin's --comment
        assert job["State"] == "COMPLETED" and job["Account"] == ACCOUNT, job
        tres = dict(item.split("=", 1) for item in job["AllocTRES"].split(","))
        if rule == "train":
            # the rule's gpu=1 (train.gpus) became --gpus=1 on the profile's GPU partition, with its cpus_per_gpu
            assert job["Partition"] == GPU_PARTITION and tres.get("gres/gpu") == "1" and tres["cpu"] == train_cpus, job
        else:
            assert job["Partition"] == CPU_PARTITION and "gres/gpu" not in tres, job

    # the train rule's command saw the GPU SLURM gave it (CUDA_VISIBLE_DEVICES from the job step), the CPU
    # rules none; torchrun started one worker, which found no CUDA (the GPU is fake) and trained on the CPU
    seen = {}
    for line in probe_log.read_text().splitlines():
        job_id, visible = line.split("|")
        if job_id:
            seen.setdefault(job_id, set()).add(visible)
    for job_id, rule in job_rule.items():
        assert job_id in seen, f"no rule shell ran inside SLURM job {job_id} ({rule})"
        if rule == "train":
            assert seen[job_id] <= {"0", "1"}, f"train job {job_id}: CUDA_VISIBLE_DEVICES {seen[job_id]}"
        else:
            assert seen[job_id] == {"unset"}, f"{rule} job {job_id}: CUDA_VISIBLE_DEVICES {seen[job_id]}"
    train_log = (tmp_path / "logs/train/powerclip.log").read_text()
    assert re.search(r" on cpu \(.*world size 1\)", train_log), train_log[-3000:]
