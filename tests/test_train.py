"""Training loop: overfitting, exact resume, non-finite loss, checkpoints, and a real 2-process DDP run.

(The loss terms against hand-computed values are tested in test_loss.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from dualpm.errors import ConfigError, DatasetError
from dualpm.train import NonFiniteLossError, config_from_dict, load_checkpoint, train
from dualpm.train.checkpoint import LATEST, checkpoint_dir, step_checkpoints
from test_reader import write_store

REPO = Path(__file__).parents[1]
TINY_UNET = {
    "base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
    "dropout": 0.0, "num_groups": 8,
}


def tiny_raw(root: Path, out: Path, **train_overrides) -> dict:
    """A tiny CPU config (workers=0, no progress bar); `train_overrides` go into the train section."""
    return {
        "data": {"root": str(root), "batch_size": 4, "workers": 0, "shuffle_buffer": 4},
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


def test_stop_at_k_and_resume_equals_an_uninterrupted_run(tmp_path):
    # Shuffled multi-shard stream, 2 loader workers (role rotation), dropout (RNG restore), validation (its
    # loader must not disturb the RNG), and k odd so the resumed DataLoader starts on the other worker.
    root = write_store(tmp_path / "data", n_train=10, n_val=3, shard_size=3)
    k = 3

    def raw(out: str, steps: int) -> dict:
        r = tiny_raw(root, tmp_path / out, steps=steps, checkpoint_every=1, validate_every=2)
        r["data"].update(batch_size=2, workers=2)
        r["model"]["unet"]["dropout"] = 0.2
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
    raw["data"]["workers"] = 2
    result = train(config_from_dict(raw), resume="auto", verbose=False)
    assert result.step == 4 and "data restarts at epoch 2, not bit-exact" in capsys.readouterr().out
    positions = load_checkpoint(result.checkpoint)["data"]["positions"]
    assert positions.shape == (1, 2, 2) and positions[0, :, 0].tolist() == [2, 2]  # the step's role moved on
    assert sorted(positions[0, :, 1].tolist()) == [0, 4]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # Unshuffled single shard, batch 1: sample 0003 (NaN features) is the 4th batch.
    root = write_store(tmp_path / "data", n_train=8, shard_size=8, nan_features=frozenset({"0003"}))
    raw = tiny_raw(root, tmp_path / "run", steps=10, checkpoint_every=1)
    raw["data"].update(batch_size=1, shuffle_buffer=0)
    with pytest.raises(NonFiniteLossError, match=r"step 4: the loss is not finite.*0003.*step-00000003\.pt"):
        train(config_from_dict(raw), verbose=False)
    assert [s for s, _ in step_checkpoints(tmp_path / "run")] == [1, 2, 3]
    good = load_checkpoint(checkpoint_dir(tmp_path / "run") / LATEST)
    assert good["step"] == 3 and all(torch.isfinite(v).all() for v in good["model"].values())


def test_two_process_ddp_reads_every_sample_once_per_epoch(tmp_path):
    # 12 train samples in 3 shards for 2 ranks x 2 workers = 4 consumers (fewer shards than consumers).
    root = write_store(tmp_path / "data", n_train=12, n_val=4, shard_size=4)
    run = tmp_path / "run"
    raw = tiny_raw(root, run, steps=8, checkpoint_every=4, validate_every=8, record_ids=True)
    raw["data"].update(batch_size=2, workers=2)
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
