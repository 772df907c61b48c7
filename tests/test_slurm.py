"""The Slurm scripts in jobs/, submitted unchanged to a real Slurm cluster of two nodes on this machine
(tests/slurm.py).

Only command-line sbatch options (which override the scripts' #SBATCH headers) shrink the jobs to it:
one or two nodes, one CPU per node, no GPUs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from datagen import make_source_dataset
from dualpm.fileio import atomic_write_text
from dualpm.train import load_checkpoint
from dualpm.train.checkpoint import LATEST, checkpoint_dir
from slurm import REPO, SlurmCluster
from test_reader import write_store

pytestmark = pytest.mark.slurm

JOBS = REPO / "jobs"
SMALL = ["--ntasks-per-node=1", "--cpus-per-task=1", "--time=10"]  # one CPU per node, 10 minutes
ONE_NODE = [*SMALL, "--nodes=1"]
NO_GPU = ["--gpus-per-node=0"]  # train.sbatch's header asks for GPUs
RENDER = ["--resolution", "32", "--layers", "2", "--shard-size", "3"]
TINY_MODEL = {
    "num_layers": 2,
    "unet": {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
             "dropout": 0.0, "num_groups": 8},
}


def prep(*args: str) -> subprocess.CompletedProcess:
    """`dualpm-prep ARGS` run here, on this checkout."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)


def tiny_config(path: Path, **train) -> Path:
    raw = {"data": {"batch_size": 2, "loader_workers": 0, "shuffle_buffer": 4}, "model": TINY_MODEL,
           "train": {"log_every": 1, "validate_every": 0, "progress": False, **train}}
    atomic_write_text(path, yaml.safe_dump(raw))
    return path


def ray_leftovers(job_id: str) -> list[str]:
    """Command lines of live processes that belong to the Ray cluster of job `job_id`."""
    tag = f"dualpm-ray-{job_id}".encode()
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
        except OSError:  # the process ended meanwhile
            continue
        if tag in text:
            found.append(text.replace(b"\0", b" ").decode(errors="replace"))
    return found


def test_prep_across_two_nodes_and_a_second_job_on_the_same_node(slurm_cluster: SlurmCluster, tmp_path):
    ds = make_source_dataset(tmp_path / "src", num_samples=6, models=2, val=2)
    # Job 0: a Ray head on node1 and a worker on node2. Job 1, at the same time: a head on node1 too.
    node_options = [["--nodes=2"], ["--nodes=1", f"--nodelist={slurm_cluster.nodes[0]}"]]
    jobs = [
        slurm_cluster.submit(JOBS / "prep.sbatch", "render", str(ds.root), str(tmp_path / f"out{k}"), *RENDER,
                             "::", "verify", str(tmp_path / f"out{k}"), options=[*SMALL, *nodes],
                             log=tmp_path / f"prep{k}.log")
        for k, nodes in enumerate(node_options)
    ]
    both_running = False
    deadline = time.monotonic() + 120
    ids = ",".join(job.id for job in jobs)
    while not both_running and time.monotonic() < deadline and any(j.process.poll() is None for j in jobs):
        states = slurm_cluster.run("squeue", "--noheader", "--format=%T", "--jobs", ids)
        both_running = states.stdout.split() == ["RUNNING", "RUNNING"]
        time.sleep(0.5)
    codes = [job.wait(timeout=240) for job in jobs]
    assert codes == [0, 0], "\n\n".join(job.output() for job in jobs)
    assert both_running  # they shared node1 (it has room for both)

    heads = set()
    for k, job in enumerate(jobs):
        log = job.output()
        assert f"Ray cluster up: {2 - k} node(s)" in log, log
        assert f"dualpm-prep verify {tmp_path / f'out{k}'}" in log and ": OK" in log, log
        heads.update(line.split("(")[1].split(")")[0] for line in log.splitlines() if "Ray head on" in line)
        verified = prep("verify", str(tmp_path / f"out{k}"))
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "6 samples, 0 failed" in verified.stdout
        # Torn down: no process of the job's Ray left, its temp dir gone.
        assert ray_leftovers(job.id) == []
        assert not (Path(os.environ.get("TMPDIR", "/tmp")) / f"dualpm-ray-{job.id}").exists()
    assert len(heads) == 2, heads  # job-specific Ray ports


@pytest.mark.parametrize(
    ("script", "reason"), [("prep.sbatch", "does not exist"), ("train.sbatch", "not found")]
)
def test_a_bad_dataset_path_fails_the_job_with_the_reason_in_its_log(
    slurm_cluster: SlurmCluster, tmp_path, script, reason
):
    missing = tmp_path / "no-such-dataset"
    if script == "prep.sbatch":
        args, options = ["render", str(missing), str(tmp_path / "out")], ONE_NODE
    else:
        args = [str(tiny_config(tmp_path / "c.yaml", steps=2)), str(missing), str(tmp_path / "run")]
        options = [*ONE_NODE, *NO_GPU]
    job = slurm_cluster.submit(JOBS / script, *args, options=options, log=tmp_path / "job.log")
    code = job.wait(timeout=180)
    log = job.output()
    assert code != 0, log
    assert any(str(missing) in line and reason in line for line in log.splitlines()), log


def test_train_on_two_nodes_writes_a_loadable_checkpoint(slurm_cluster: SlurmCluster, tmp_path):
    data = write_store(tmp_path / "data", n_train=8, n_val=2, shard_size=4)
    run = tmp_path / "run"
    config = tiny_config(tmp_path / "tiny.yaml", steps=6, checkpoint_every=3)
    job = slurm_cluster.submit(JOBS / "train.sbatch", str(config), str(data), str(run),
                               "--set", "train.seed=7",
                               options=[*SMALL, *NO_GPU, "--nodes=2"], log=tmp_path / "train.log")
    assert job.wait(timeout=180) == 0, job.output()
    assert "2 node(s) x 1 process(es)" in job.output()
    ckpt = load_checkpoint(checkpoint_dir(run) / LATEST)
    assert ckpt["step"] == 6 and ckpt["data"]["world"] == 2  # one DDP rank per node
    # The options after RUN_DIR reach the trainer.
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 7
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_time_limit_warning_checkpoints_requeues_and_the_job_resumes(slurm_cluster: SlurmCluster, tmp_path):
    data = write_store(tmp_path / "data", n_train=8, n_val=2, shard_size=4)
    run, steps = tmp_path / "run", 150  # ~5 s of training: the warning lands long before the end
    config = tiny_config(tmp_path / "tiny.yaml", steps=steps, checkpoint_every=1000)  # no periodic ones
    job = slurm_cluster.submit(JOBS / "train.sbatch", str(config), str(data), str(run),
                               options=[*ONE_NODE, *NO_GPU], log=tmp_path / "train.log")
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while job.process.poll() is None and time.monotonic() < deadline and not (
        metrics.exists() and metrics.read_text().strip()
    ):
        time.sleep(0.1)
    assert metrics.exists(), job.output()  # training has started
    # What Slurm does `--signal=B:USR1@300` before the time limit: USR1 to the batch script only.
    sent = slurm_cluster.run("scancel", "--batch", "--signal=USR1", job.id)
    assert sent.returncode == 0, sent.stderr
    assert job.wait(timeout=240) == 0, job.output()  # sbatch --wait follows the job through its requeue

    log = job.output()
    # The trainer finished its step, wrote a checkpoint there, and the script requeued the job ...
    stopped = re.search(r"stopping at step (\d+) on SIGTERM: checkpoint written to", log)
    assert stopped and 1 <= (k := int(stopped.group(1))) < steps, log
    assert re.search(rf"training stopped \(exit code \d+\): requeueing job {job.id}\n", log), log
    assert f"job {job.id} (restart 1)" in log, log
    # ... which resumed from exactly that checkpoint (the only one before the end) and finished.
    assert f"resuming at step {k}" in log, log
    assert load_checkpoint(checkpoint_dir(run) / LATEST)["step"] == steps
    assert sorted(p.name for p in checkpoint_dir(run).glob("step-*.pt")) == [
        f"step-{k:08d}.pt", f"step-{steps:08d}.pt"
    ]
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # every step trained once


def test_pipeline_submits_dependent_jobs_that_prepare_and_train(slurm_cluster: SlurmCluster, tmp_path):
    ds = make_source_dataset(tmp_path / "src", num_samples=6, models=2, val=2)
    out, run = tmp_path / "out", tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    common = f"--output={logs}/%x-%j.out"
    env = {
        "DUALPM_RENDER_ARGS": " ".join(RENDER),
        "DUALPM_FEATURES_ARGS": "--extractor rgb --grid 16",
        "DUALPM_TRAIN_ARGS": "--set train.steps=4 --set train.checkpoint_every=2",
        "DUALPM_SBATCH_ARGS": common,
        "DUALPM_PREP_SBATCH_ARGS": " ".join(ONE_NODE),
        "DUALPM_TRAIN_SBATCH_ARGS": " ".join([*ONE_NODE, *NO_GPU]),
    }
    config = tiny_config(tmp_path / "tiny.yaml", steps=2)
    pipeline = str(JOBS / "pipeline.sh")
    proc = slurm_cluster.run(pipeline, str(ds.root), str(out), str(config), str(run), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = dict(line.split() for line in proc.stdout.splitlines())
    assert list(ids) == ["render", "features", "train"], proc.stdout
    assert all(i.isdigit() for i in ids.values()), proc.stdout
    # The later jobs wait for the earlier ones to succeed.
    later = f"{ids['features']},{ids['train']}"
    deps = slurm_cluster.run("squeue", "--noheader", "--format=%i %E", "--jobs", later)
    assert f"{ids['features']} afterok:{ids['render']}" in deps.stdout, deps.stdout
    assert f"{ids['train']} afterok:{ids['features']}" in deps.stdout, deps.stdout

    deadline = time.monotonic() + 300
    while set(slurm_cluster.queued()) & set(ids.values()) and time.monotonic() < deadline:
        time.sleep(1)
    job_logs = "\n\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(logs.iterdir()))
    assert not set(slurm_cluster.queued()) & set(ids.values()), "still queued after 300 s\n" + job_logs
    verified = prep("verify", str(out))
    assert verified.returncode == 0, verified.stdout + verified.stderr + job_logs
    assert "render:" in verified.stdout and "features:" in verified.stdout, verified.stdout
    assert load_checkpoint(checkpoint_dir(run) / LATEST)["step"] == 4, job_logs
