"""Training loop: overfitting, exact resume, non-finite loss, checkpoints, a real 2-process DDP run, and
stopping cleanly on SIGTERM / SIGUSR1 (subprocess trainers, real signals).

(The loss terms against hand-computed values are tested in test_loss.py.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from dualpm.errors import ConfigError, DatasetError
from dualpm.fileio import atomic_write_text
from dualpm.train import NonFiniteLossError, config_from_dict, load_checkpoint, train
from dualpm.train.checkpoint import FORMAT, LATEST, CheckpointError, checkpoint_dir, step_checkpoints
from dualpm.train.cli import main
from dualpm.train.loop import EXIT_STOPPED
from test_reader import write_store

REPO = Path(__file__).parents[1]
TINY_UNET = {
    "base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
    "dropout": 0.0, "num_groups": 8,
}


def tiny_raw(root: Path, out: Path, **train_overrides) -> dict:
    """A tiny CPU config (loader_workers=0, no progress bar); `train_overrides` go into the train section."""
    return {
        "data": {"root": str(root), "batch_size": 4, "loader_workers": 0, "shuffle_buffer": 4},
        "model": {"in_channels": 5, "num_layers": 2, "unet": dict(TINY_UNET)},
        "train": {
            "out_dir": str(out), "steps": 4, "lr": 2e-3, "log_every": 1, "checkpoint_every": 100,
            "validate_every": 0, "progress": False, **train_overrides,
        },
    }


def metrics(run: Path, split: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["split"] == split]


def test_overfitting_8_samples_drops_the_loss_10x(tmp_path):
    root = write_store(tmp_path / "data", n_train=8, n_val=1, shard_size=8, size=12, grid=6)
    raw = tiny_raw(root, tmp_path / "run", steps=60, lr=3e-3, lr_step=1000)
    raw["data"].update(batch_size=8, shuffle_buffer=0)
    raw["model"]["unet"]["attention_levels"] = []
    # Without the -log c regulariser and with hard labels every term is >= 0 with infimum 0, so "10x lower"
    # means 10x closer to a perfect fit (with them the loss goes negative and ratios mean nothing).
    raw["loss"] = {"alpha": 0.0, "label_clamp": [0.0, 1.0]}
    result = train(config_from_dict(raw), verbose=False)
    losses = [row["loss/total"] for row in metrics(tmp_path / "run")]
    assert len(losses) == 60 and result.step == 60
    assert losses[-1] <= losses[0] / 10, losses[::10]


def _params(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("variant", ["reference", "mirror+euclidean"])
def test_stop_at_k_and_resume_equals_an_uninterrupted_run(tmp_path, variant):
    # Shuffled multi-shard stream, 2 loader workers (role rotation), dropout (RNG restore), validation (its
    # loader must not disturb the RNG), and k odd so the resumed DataLoader starts on the other worker.
    # The variant mirrors random samples (drawn per step) and uses the Euclidean point loss.
    root = write_store(tmp_path / "data", n_train=10, n_val=3, shard_size=3)
    k = 3

    def raw(out: str, steps: int) -> dict:
        r = tiny_raw(root, tmp_path / out, steps=steps, checkpoint_every=1, validate_every=2)
        r["data"].update(batch_size=2, loader_workers=2)
        r["model"]["unet"]["dropout"] = 0.2
        if variant != "reference":
            r["data"]["hflip_canonical_axis"] = 0
            r["loss"] = {"distance": "euclidean"}
        return r

    full = train(config_from_dict(raw("full", 2 * k)), verbose=False)
    first = train(config_from_dict(raw("split", k)), verbose=False)
    assert first.step == k
    resumed = train(config_from_dict(raw("split", 2 * k)), resume="auto", verbose=False)
    assert resumed.step == 2 * k
    a, b = _params(full.checkpoint), _params(resumed.checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Same losses at every step, and the metrics log of the resumed run has each step once.
    losses = {run: [r["loss/total"] for r in metrics(tmp_path / run)] for run in ("full", "split")}
    assert losses["full"] == losses["split"] and len(losses["full"]) == 2 * k
    # (the stopped run validated at its end, step 3, without disturbing anything)
    assert [r["step"] for r in metrics(tmp_path / "split", "val")] == [2, 3, 4, 6]


def test_checkpoints_are_loadable_with_weights_only_and_pruned(tmp_path):
    root = write_store(tmp_path / "data")
    run = tmp_path / "run"
    raw = tiny_raw(root, run, steps=5, checkpoint_every=1, keep_checkpoints=2)
    result = train(config_from_dict(raw), verbose=False)
    assert [s for s, _ in step_checkpoints(run)] == [4, 5]
    latest = load_checkpoint(checkpoint_dir(run) / LATEST)  # weights_only=True inside
    assert latest["step"] == 5 and result.checkpoint == checkpoint_dir(run) / "step-00000005.pt"
    assert latest["features"] == {"extractor": "test", "dim": 5, "grid": 8}
    assert latest["config"]["model"]["in_channels"] == 5
    assert latest["config"]["data"]["resolution"] == [16, 16]
    assert latest["data"]["positions"].shape == (1, 1, 2) and latest["data"]["positions"][0, 0, 1] == 20 % 8
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved == latest["config"]
    assert (run / "tb").is_dir() and any((run / "tb").iterdir())


def test_resume_refuses_other_settings_or_data(tmp_path):
    root = write_store(tmp_path / "data")
    run = tmp_path / "run"
    train(config_from_dict(tiny_raw(root, run, steps=2)), verbose=False)
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's in train\.lr"):
        train(config_from_dict(tiny_raw(root, run, steps=4, lr=1e-4)), resume="auto", verbose=False)
    other = write_store(tmp_path / "other", n_train=12)
    with pytest.raises(DatasetError, match="different dataset"):
        train(config_from_dict(tiny_raw(other, run, steps=4)), resume="auto", verbose=False)
    # 'auto' without any checkpoint starts fresh.
    fresh = train(config_from_dict(tiny_raw(root, tmp_path / "new", steps=1)), resume="auto", verbose=False)
    assert fresh.step == 1


def test_resume_with_another_loader_layout_starts_a_fresh_epoch(tmp_path, capsys):
    root = write_store(tmp_path / "data")  # 8 train samples
    run = tmp_path / "run"
    train(config_from_dict(tiny_raw(root, run, steps=3)), verbose=False)  # 12 samples: epoch 1, count 4
    raw = tiny_raw(root, run, steps=4)
    raw["data"]["loader_workers"] = 2
    result = train(config_from_dict(raw), resume="auto", verbose=False)
    assert result.step == 4 and "data restarts at epoch 2, not bit-exact" in capsys.readouterr().out
    positions = load_checkpoint(result.checkpoint)["data"]["positions"]
    assert positions.shape == (1, 2, 2) and positions[0, :, 0].tolist() == [2, 2]  # the step's role moved on
    assert sorted(positions[0, :, 1].tolist()) == [0, 4]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # Unshuffled single shard, batch 1: sample 0003 (targets of 1e30: their squares overflow) is the 4th batch.
    root = write_store(tmp_path / "data", n_train=8, shard_size=8, precision="float32",
                       huge_targets=frozenset({"0003"}))
    raw = tiny_raw(root, tmp_path / "run", steps=10, checkpoint_every=1)
    raw["data"].update(batch_size=1, shuffle_buffer=0)
    with pytest.raises(NonFiniteLossError, match=r"step 4: the loss is not finite.*0003.*step-00000003\.pt"):
        train(config_from_dict(raw), verbose=False)
    assert [s for s, _ in step_checkpoints(tmp_path / "run")] == [1, 2, 3]
    good = load_checkpoint(checkpoint_dir(tmp_path / "run") / LATEST)
    assert good["step"] == 3 and all(torch.isfinite(v).all() for v in good["model"].values())


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    root = write_store(tmp_path / "data")
    run = tmp_path / "run"
    train(config_from_dict(tiny_raw(root, run, steps=3, checkpoint_every=1)), verbose=False)
    before = {p.name: p.stat().st_mtime_ns for p in [*run.iterdir(), *checkpoint_dir(run).iterdir()]}
    with pytest.raises(ConfigError, match=r"run: holds an earlier training run \(checkpoints up to step 3\); "
                       r"continue it with --resume auto, start it over with --overwrite \(deletes its "
                       r"checkpoints, metrics.jsonl, config.yaml, tb\)"):
        train(config_from_dict(tiny_raw(root, run, steps=2)), verbose=False)
    with pytest.raises(ConfigError, match="give only one of them"):
        train(config_from_dict(tiny_raw(root, run, steps=2)), resume="auto", overwrite=True, verbose=False)
    after = {p.name: p.stat().st_mtime_ns for p in [*run.iterdir(), *checkpoint_dir(run).iterdir()]}
    assert after == before  # refused before anything was touched
    # The command line: --overwrite starts clean (no step-3 checkpoint, no old log lines).
    config = _write_config(tmp_path / "c.yaml", tiny_raw(root, run, steps=2, checkpoint_every=1))
    result = CliRunner().invoke(main, [str(config), "--dry-run"])
    assert result.exit_code == 1 and "holds an earlier training run" in result.output
    result = CliRunner().invoke(main, [str(config), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert f"done: step 2, checkpoint {checkpoint_dir(run) / 'step-00000002.pt'}" in result.output
    assert [s for s, _ in step_checkpoints(run)] == [1, 2]
    assert load_checkpoint(checkpoint_dir(run) / LATEST)["step"] == 2
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "tb"]


def test_resume_auto_before_the_first_checkpoint_starts_over_without_duplicate_log_lines(tmp_path):
    # What a run killed before its first checkpoint leaves (or an --overwrite killed part way).
    root = write_store(tmp_path / "data")
    run = tmp_path / "run"
    train(config_from_dict(tiny_raw(root, run, steps=3)), verbose=False)
    for path in checkpoint_dir(run).iterdir():
        path.unlink()
    with pytest.raises(ConfigError, match="no checkpoint, but checkpoints, metrics.jsonl, config.yaml, tb"):
        train(config_from_dict(tiny_raw(root, run, steps=2)), verbose=False)
    result = train(config_from_dict(tiny_raw(root, run, steps=2)), resume="auto", verbose=False)
    assert result.step == 2 and [r["step"] for r in metrics(run)] == [1, 2]


def test_temporaries_of_killed_writes_are_removed_when_a_run_starts(tmp_path):
    root = write_store(tmp_path / "data")
    run = tmp_path / "run"
    train(config_from_dict(tiny_raw(root, run, steps=2)), verbose=False)
    # Names as dualpm.fileio gives them: a checkpoint, latest.pt, the config and the log, and an
    # --overwrite's folder of deleted entries, each killed before its rename.
    leftovers = [tempfile.mkstemp(prefix=f".tmp-{name}.", dir=folder)[1] for folder, name in
                 [(checkpoint_dir(run), "step-00000003.pt"), (checkpoint_dir(run), LATEST),
                  (run, "config.yaml"), (run, "metrics.jsonl")]]
    leftovers.append(tempfile.mkdtemp(prefix=".tmp-overwritten.", dir=run))
    Path(leftovers[-1], "checkpoints").mkdir()
    train(config_from_dict(tiny_raw(root, run, steps=3)), resume="auto", verbose=False)
    assert not [p for p in leftovers if Path(p).exists()]
    assert sorted(p.name for p in checkpoint_dir(run).iterdir()) == [LATEST, "step-00000002.pt",
                                                                       "step-00000003.pt"]


class _Unsafe:
    """Pickles to a call of os.system: what weights-only loading must refuse."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def write_bad_checkpoints(folder: Path) -> dict[str, Path]:
    """Files given as checkpoints by mistake or malice, by kind: text files, empty, a torch file of
    something else, an unsafe pickle, a dualpm checkpoint without the training state."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "passwd": b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n",
        "text": b"hello world\n", "yaml": b"train:\n  lr: 1\n", "empty": b"",
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    paths["other"], paths["unsafe"], paths["partial"] = folder / "o.pt", folder / "u.pt", folder / "p.pt"
    torch.save({"weights": torch.zeros(2)}, paths["other"])
    torch.save({"format": FORMAT, "version": 1, "step": _Unsafe()}, paths["unsafe"])
    torch.save({"format": FORMAT, "version": 1, "step": 3, "model": {}}, paths["partial"])
    return paths


def test_an_unreadable_resume_checkpoint_is_one_clear_line(tmp_path):
    root = write_store(tmp_path / "data")
    config = _write_config(tmp_path / "c.yaml", tiny_raw(root, tmp_path / "run", steps=1))
    reasons = {"passwd": "not a readable dualpm checkpoint", "text": "not a readable dualpm checkpoint",
               "yaml": "not a readable dualpm checkpoint", "empty": "not a readable dualpm checkpoint",
               "other": "not a dualpm training checkpoint",
               "unsafe": "not a readable dualpm checkpoint (refused to load it: it holds objects other than "
                         "tensors and plain values (Trying to load unsupported GLOBAL",
               "partial": "cannot resume from it: it lacks optimizer, scheduler, rng, data, config, dataset"}
    for kind, path in write_bad_checkpoints(tmp_path / "bad").items():
        result = CliRunner().invoke(main, [str(config), "--resume", str(path)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (kind, result)
        line = result.output.strip()
        assert line.startswith(f"Error: {path}: {reasons[kind]}") and "\n" not in line, (kind, line)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_damaged_features_stop_training_naming_shard_and_sample(tmp_path):
    # Issue 18, item 1: flipped bytes in a features chunk were trained on; NaN features gave a NaN loss.
    root = write_store(tmp_path / "data", n_train=8, shard_size=4, nan_features=frozenset({"0006"}))
    raw = tiny_raw(root, tmp_path / "run", steps=6)
    raw["data"].update(batch_size=1, shuffle_buffer=0)
    with pytest.raises(DatasetError, match=r"shard 1 sample '0006': features are damaged \(not finite"):
        train(config_from_dict(raw), verbose=False)
    root = write_store(tmp_path / "data2", n_train=8, shard_size=4)
    chunks = sorted((root / "features" / "features" / "c" / "1").rglob("*"))
    data = bytearray(chunks[-1].read_bytes())
    for k in range(len(data) // 2, len(data) // 2 + 64):  # 64 flipped bytes inside shard 1's features
        data[k] ^= 0x40  # finite but absurd float16 values (up to ~40,000): the old reader trained on them
    chunks[-1].write_bytes(bytes(data))
    raw = tiny_raw(root, tmp_path / "run2", steps=6)
    raw["data"].update(batch_size=1, shuffle_buffer=0)
    with pytest.raises(DatasetError, match=r"features shard 1: data do not match the sha256.*sample '000[4-7]'"):
        train(config_from_dict(raw), verbose=False)


def test_two_process_ddp_reads_every_sample_once_per_epoch(tmp_path):
    # 12 train samples in 3 shards for 2 ranks x 2 workers = 4 consumers (fewer shards than consumers).
    root = write_store(tmp_path / "data", n_train=12, n_val=4, shard_size=4)
    run = tmp_path / "run"
    raw = tiny_raw(root, run, steps=8, checkpoint_every=4, validate_every=8, record_ids=True)
    raw["data"].update(batch_size=2, loader_workers=2)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "dualpm.train.cli", str(config),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Every rank took 8 steps of 2 samples: 32 samples = each consumer's 3 samples of epoch 0 and more.
    by_epoch: dict[int, list[str]] = {}
    for rank in range(2):
        lines = (run / "ids" / f"rank-{rank}.txt").read_text().split()
        rows = [lines[i : i + 4] for i in range(0, len(lines), 4)]  # step, role, epoch, id
        assert len(rows) == 16 and Counter(int(r[0]) for r in rows) == {s: 2 for s in range(1, 9)}
        for _, _, epoch, sample_id in rows:
            by_epoch.setdefault(int(epoch), []).append(sample_id)
    assert sorted(by_epoch[0]) == [f"{i:04d}" for i in range(12)]
    assert sorted(by_epoch[1]) == sorted(by_epoch[0])  # each consumer has 3 samples per epoch: 2 epochs done
    latest = load_checkpoint(checkpoint_dir(run) / LATEST)
    assert latest["step"] == 8 and latest["data"]["world"] == 2
    assert latest["data"]["positions"].shape == (2, 2, 2)  # (ranks, roles, (epoch, count))
    val = metrics(run, "val")
    assert [r["step"] for r in val] == [8] and 0.0 <= val[0]["iou/l1"] <= 1.0


# --- stopping on a signal (preemption, a Slurm time-limit warning) -----------------------------------


def _cli(config: Path, *args: str, torchrun: int = 0) -> subprocess.Popen:
    """`dualpm-train CONFIG ARGS` in a subprocess (under `torchrun --nproc-per-node N` if N > 0), in a
    session of its own: its process group is it and its children, like the processes of a Slurm step."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)]
    cmd = [*launcher, "-m", "dualpm.train.cli", str(config), *args]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _after_first_step(run: Path, proc: subprocess.Popen) -> None:
    """Wait until the trainer has logged step 1 (it is training, its handlers are installed)."""
    log = run / "metrics.jsonl"
    while proc.poll() is None and not (log.exists() and log.read_text().strip()):
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[0]


def _write_config(path: Path, raw: dict) -> Path:
    atomic_write_text(path, yaml.safe_dump(raw))
    return path


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_is_bitwise(tmp_path):
    root = write_store(tmp_path / "data", n_train=8, n_val=2, shard_size=4)
    steps = 40  # ~2 s of training: the signal lands long before the end

    def config(name: str) -> Path:
        raw = tiny_raw(root, tmp_path / name, steps=steps, checkpoint_every=1000)  # no periodic checkpoints
        raw["data"].update(batch_size=2, loader_workers=2)
        raw["model"]["unet"]["dropout"] = 0.2  # the RNG state must survive the stop too
        return _write_config(tmp_path / f"{name}.yaml", raw)

    full = _cli(config("full"))  # the uninterrupted reference, at the same time on the other core
    stopped = _cli(config("split"))
    _after_first_step(tmp_path / "split", stopped)
    # As Slurm does: SIGTERM to every process, the trainer and its DataLoader workers (which must not die).
    os.killpg(stopped.pid, signal.SIGTERM)
    out = stopped.communicate(timeout=120)[0]
    assert stopped.returncode == EXIT_STOPPED, out
    found = re.search(r"stopping at step (\d+) on SIGTERM: checkpoint written to (\S+);", out)
    assert found, out
    k = int(found.group(1))
    assert 1 <= k < steps, out
    # It finished the step in progress, wrote a checkpoint of exactly that step and took no further step.
    assert Path(found.group(2)) == checkpoint_dir(tmp_path / "split") / f"step-{k:08d}.pt"
    assert load_checkpoint(checkpoint_dir(tmp_path / "split") / LATEST)["step"] == k
    assert [r["step"] for r in metrics(tmp_path / "split")] == list(range(1, k + 1))

    resumed = _cli(tmp_path / "split.yaml", "--resume", "auto")
    out = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0 and f"resuming at step {k}" in out, out
    assert full.wait(timeout=120) == 0, full.communicate()[0]
    a = _params(checkpoint_dir(tmp_path / "full") / LATEST)
    b = _params(checkpoint_dir(tmp_path / "split") / LATEST)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [r["loss/total"] for r in metrics(tmp_path / "split")] == [
        r["loss/total"] for r in metrics(tmp_path / "full")
    ]


def test_a_signal_to_one_ddp_rank_stops_every_rank_after_the_same_step(tmp_path):
    root = write_store(tmp_path / "data", n_train=8, n_val=2, shard_size=2)
    run = tmp_path / "run"
    raw = tiny_raw(root, run, steps=200, checkpoint_every=1000, record_ids=True)
    raw["data"]["batch_size"] = 2
    proc = _cli(_write_config(tmp_path / "c.yaml", raw), torchrun=2)
    _after_first_step(run, proc)
    # The ranks are torchrun's children; only rank 1 gets the signal.
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    ranks = {
        int(env.split(b"=")[1]): int(pid)
        for pid in children
        for env in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if env.startswith(b"RANK=")
    }
    assert sorted(ranks) == [0, 1], children
    os.kill(ranks[1], signal.SIGUSR1)
    out = proc.communicate(timeout=120)[0]
    # torchrun fails itself (a job script cannot tell 75 through it) and reports the ranks' status: 75,
    # no crash. A rank still tearing down when the first one exits gets torchrun's SIGTERM (-15): on a
    # loaded machine that happens, and it has stopped at the same step all the same (checked below).
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", out)
    assert proc.returncode != 0 and "75" in codes and set(codes) <= {"75", "-15"}, out
    found = re.search(r"stopping at step (\d+) on SIGUSR1: checkpoint written to", out)  # rank 0's line
    assert found and out.count("stopping at step") == 1, out
    k = int(found.group(1))
    assert 1 <= k < 200
    latest = load_checkpoint(checkpoint_dir(run) / LATEST)
    assert latest["step"] == k and latest["data"]["world"] == 2
    for rank in range(2):  # both ranks took steps 1..k, two samples each, and no more
        taken = [int(line.split()[0]) for line in (run / "ids" / f"rank-{rank}.txt").read_text().splitlines()]
        assert taken == [s for s in range(1, k + 1) for _ in range(2)], rank


def test_a_run_folder_never_equals_holds_or_lies_in_a_store_and_overwrite_deletes_only_run_entries(tmp_path):
    # Issue 22, item 1: `--data STORE --out STORE --overwrite` deleted the store's `ids/` array (a run
    # folder also has an entry `ids`), and `--out STORE/run` was accepted.
    root = write_store(tmp_path / "data")
    snapshot = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    cases = {root: "is the dataset", root / "run": "is inside the dataset", tmp_path: "holds the dataset"}
    for out, what in cases.items():
        config = _write_config(tmp_path / "c.yaml", tiny_raw(root, out, steps=1))
        for extra in ([], ["--overwrite"], ["--dry-run"], ["--overwrite", "--dry-run"]):
            result = CliRunner().invoke(main, [str(config), *extra])
            assert result.exit_code == 1, (out, extra, result.output)
            assert f"the run folder {what}" in result.output and "--overwrite (deletes" not in result.output
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == snapshot
    assert not (root / "run").exists()
    # Another store (not the one trained on) given as the run folder: never deleted either.
    other = write_store(tmp_path / "other")
    other_snapshot = sorted(str(p.relative_to(other)) for p in other.rglob("*"))
    with pytest.raises(ConfigError, match=r"other: holds a prepared dataset \(manifest.json\)"):
        train(config_from_dict(tiny_raw(root, other, steps=1)), overwrite=True, verbose=False)
    assert sorted(str(p.relative_to(other)) for p in other.rglob("*")) == other_snapshot
    # A folder whose `ids` (or any run entry) is not what a run writes: --overwrite refuses to delete it.
    run = tmp_path / "runs" / "a"
    (run / "ids" / "c").mkdir(parents=True)
    (run / "ids" / "zarr.json").write_text("{}")
    (run / "config.yaml").write_text("x: 1\n")
    with pytest.raises(ConfigError, match=r"a[/\\]ids: not what a training run writes \(holds zarr.json\); "
                       r"--overwrite deletes only a run's own entries"):
        train(config_from_dict(tiny_raw(root, run, steps=1)), overwrite=True, verbose=False)
    assert (run / "ids" / "zarr.json").is_file() and (run / "config.yaml").is_file()
    with pytest.raises(ConfigError) as refused:
        train(config_from_dict(tiny_raw(root, run, steps=1)), verbose=False)
    assert "not what a training run writes" in str(refused.value) and "--overwrite (deletes" not in str(
        refused.value)


def test_an_incomplete_store_is_refused_with_the_counts_unless_allowed(tmp_path, capsys):
    # Issue 22, item 2: a store whose features stage stopped part way trained on what was there, silently.
    # 12 train samples in shards 0-2, 4 val in shard 3; features of shard 1 and render of shard 3 missing.
    root = write_store(tmp_path / "data", n_train=12, n_val=4, shard_size=4,
                       skip_shards={"features": {1}, "render": {3}})
    raw = tiny_raw(root, tmp_path / "run", steps=1)
    expected = (r"data: the store is incomplete: column 'render' lacks 1 of 4 shards \(3\), column 'features' "
                r"lacks 1 of 4 shards \(1\); training would see 8 of 12 'train' samples and 0 of 4 'val' "
                r"samples\. Complete it by rerunning the stage that stopped \(it resumes\): dualpm-prep render "
                r"SRC .*data and dualpm-prep features SRC .*data \(SRC: synthetic spheres\), or train on what "
                r"is there with --allow-incomplete")
    with pytest.raises(DatasetError, match=expected):
        train(config_from_dict(raw), verbose=False)
    assert not (tmp_path / "run").exists()
    config = _write_config(tmp_path / "c.yaml", raw)
    for extra in ([], ["--dry-run"]):
        result = CliRunner().invoke(main, [str(config), *extra])
        assert result.exit_code == 1 and re.search(expected, result.output), result.output
    result = CliRunner().invoke(main, [str(config), "--allow-incomplete"])
    assert result.exit_code == 0, result.output
    assert re.search(r"note: training on an incomplete store \(--allow-incomplete\): column 'render' lacks "
                     r"1 of 4 shards \(3\), column 'features' lacks 1 of 4 shards \(1\); training would see 8 "
                     r"of 12 'train' samples and 0 of 4 'val' samples", result.output), result.output
    # Failed samples are not missing data: recorded failures of a finished store train without a flag.
    full = write_store(tmp_path / "full", fail={"features": {"0001"}})
    assert train(config_from_dict(tiny_raw(full, tmp_path / "run2", steps=1)), verbose=False).step == 1


def test_resume_from_weights_that_do_not_fit_the_config_is_one_line(tmp_path):
    # Issue 22, item 6: `--resume` with a checkpoint whose weights do not fit its config died with a
    # load_state_dict traceback.
    root = write_store(tmp_path / "data")
    run = tmp_path / "run"
    train(config_from_dict(tiny_raw(root, run, steps=1)), verbose=False)
    state = load_checkpoint(checkpoint_dir(run) / LATEST)
    name = next(k for k, v in state["model"].items() if v.ndim == 4)
    shape = tuple(state["model"][name].shape)
    state["model"][name] = torch.zeros(shape[0] + 1, *shape[1:])
    extra = dict(state, model={**state["model"], "head.extra": torch.zeros(2)})
    torch.save(extra, tmp_path / "edited.pt")
    config = _write_config(tmp_path / "c.yaml", tiny_raw(root, run, steps=2))
    result = CliRunner().invoke(main, [str(config), "--resume", str(tmp_path / "edited.pt")])
    wrong = (shape[0] + 1, *shape[1:])
    assert result.exit_code == 1 and result.output == (
        f"Error: {tmp_path / 'edited.pt'}: its model weights do not fit the model its config describes (1 of "
        f"another shape, e.g. {name}: {wrong} in the file, {shape} in the model; 1 unexpected, e.g. "
        "head.extra): the file was changed or written by other code\n"), result.output


def test_resume_auto_falls_back_to_the_newest_intact_checkpoint_and_says_so(tmp_path, capsys):
    # Issue 22: `--resume auto` with a truncated latest checkpoint (a full disk) refused to go on. latest.pt
    # is a hard link to step 3's file: truncating it truncates both, so step 2 is the newest that reads.
    root = write_store(tmp_path / "data")
    full = train(config_from_dict(tiny_raw(root, tmp_path / "full", steps=4, checkpoint_every=1)), verbose=False)
    run = tmp_path / "run"
    train(config_from_dict(tiny_raw(root, run, steps=3, checkpoint_every=1)), verbose=False)
    latest = checkpoint_dir(run) / LATEST
    data = latest.read_bytes()
    with open(latest, "r+b") as fh:
        fh.truncate(len(data) // 2)
    capsys.readouterr()
    resumed = train(config_from_dict(tiny_raw(root, run, steps=4, checkpoint_every=1)), resume="auto", verbose=False)
    out = capsys.readouterr().out
    assert re.search(rf"note: {re.escape(str(latest))}: not a readable dualpm checkpoint \(.*\); resuming from "
                     rf"{re.escape(str(checkpoint_dir(run) / 'step-00000002.pt'))} \(step 2\), the newest checkpoint "
                     r"that reads", out), out
    a, b = _params(full.checkpoint), _params(resumed.checkpoint)
    assert all(torch.equal(a[name], b[name]) for name in a)  # steps 3 and 4 redone, bit for bit
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    # A named checkpoint never falls back.
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"t.pt: not a readable dualpm checkpoint"):
        train(config_from_dict(tiny_raw(root, run, steps=5)), resume=str(tmp_path / "t.pt"), verbose=False)
