"""Training throughput vs reader throughput (samples/s), side by side.

    .venv/bin/python bench/train.py                                  # configs/demo.yaml on this machine
    .venv/bin/python bench/train.py --config configs/paper.yaml      # on CUDA: bf16 vs fp32, peak memory
    .venv/bin/python bench/train.py --data out/demo --append ''      # a prepared dataset; don't record

Without `--data` a synthetic store of the config's shape is written to a temp folder (analytic spheres from
tests/test_reader.py: 8 stored layers, float16 features on a coarser grid). Measured:

* reader: the training `ShardStream` + DataLoader with the config's workers, batch and shuffle buffer
  (decode, join, feature upsampling), after warm-up batches;
* step: forward + loss + backward + clip + Adam on one fixed batch of that data (no data wait), fp32 on
  CPU; on CUDA bf16 autocast + channels_last and fp32, with peak memory;
* end to end: `dualpm.train.train` for `--e2e-steps` steps (bf16 autocast on CUDA, as the config's
  precision `auto` says), the loop's own samples/s over the second half of them (steady state).

The ratio reader / step says how much headroom the reader has: >= 1 and the reader is never the
bottleneck (the target); on CUDA, bf16 steps should be >= 2x fp32 ones. A dated line with the
machine is appended to docs/benchmarks.md; `--json PATH` writes the measures against their targets as
metric rows (bench/gpu_check.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import click
import torch
from gpu_check import Metric, write_metrics  # bench/gpu_check.py, beside this script

from dualpm.cliutils import describe_machine, record_benchmark
from dualpm.data.reader import ShardStream, make_loader, open_dataset
from dualpm.loss import dualpm_loss
from dualpm.model import DualPMNet, describe
from dualpm.train import config_from_dict, read_config, resolve_config, train

REPO = Path(__file__).resolve().parents[1]
HEADING = "Training: reader vs step samples/s (`bench/train.py`)"
TARGET_BF16, TARGET_READER = 2.0, 1.0  # bf16 / fp32 step samples/s on CUDA; reader / step


def _synthetic(folder: Path, samples: int, size: int, channels: int, grid: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from test_reader import write_store  # the tests' analytic store builder

    return write_store(
        folder, n_train=samples, n_val=8, shard_size=32, size=size, channels=channels, grid=grid
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reader_rate(stream: ShardStream, batch: int, workers: int, prefetch: int, batches: int) -> float:
    it = iter(make_loader(stream, batch, workers, prefetch, False))
    for _ in range(max(2, workers)):  # warm-up: worker start, first shard opened
        next(it)
    start = time.perf_counter()
    n = sum(len(b["id"]) for b in itertools.islice(it, batches))
    return n / (time.perf_counter() - start)


def step_rate(
    config, batch: dict, device: torch.device, bf16: bool, steps: int, warmup: int
) -> tuple[float, float]:
    """(samples/s, peak GiB) of full optimizer steps on one fixed batch (no data wait)."""
    torch.manual_seed(0)
    cl = device.type == "cuda" and config.train.channels_last
    model = DualPMNet(config.model).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=config.train.lr)
    feats = batch["features"].to(device)
    feats = feats.contiguous(memory_format=torch.channels_last) if cl else feats
    target, mask = batch["target"].to(device), batch["mask"].to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = model(feats)
        loss = dualpm_loss(pred, target, mask, config.loss).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), config.train.grad_clip)
        opt.step()

    for _ in range(warmup):
        one()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return steps * feats.shape[0] / seconds, peak


def end_to_end_rate(config, info, steps: int, folder: Path) -> float:
    """samples/s that `dualpm.train.train` itself logs over the last half of `steps` steps (reader in the
    loop; the first half holds the start: loader workers, CUDA kernels' first launches)."""
    tc = dataclasses.replace(
        config.train, out_dir=str(folder), steps=steps, log_every=max(1, steps // 2), checkpoint_every=steps,
        validate_every=0, progress=False,
    )
    train(dataclasses.replace(config, train=tc), info, verbose=False)
    last = (folder / "metrics.jsonl").read_text().splitlines()[-1]
    return json.loads(last)["samples_per_s"]


@click.command()
@click.option("--config", "config_path", default=str(REPO / "configs" / "demo.yaml"), show_default=True)
@click.option("--data", "data_root", type=click.Path(file_okay=False), help="Dataset (default: synthetic).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override (repeatable).")
@click.option("--samples", default=96, show_default=True, help="Synthetic: training samples.")
@click.option("--size", default=None, type=int, help="Synthetic: render side (default: 64 CPU, 160 CUDA).")
@click.option("--channels", default=64, show_default=True, help="Synthetic: feature channels.")
@click.option("--grid", default=None, type=int, help="Synthetic: feature grid (default: size / 2).")
@click.option("--steps", default=10, show_default=True, help="Timed optimizer steps.")
@click.option("--reader-batches", default=20, show_default=True)
@click.option("--e2e-steps", default=30, show_default=True, help="End-to-end train() steps (0: skip).")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--append", "append_to", default=str(REPO / "docs" / "benchmarks.md"), show_default=True,
              help="Markdown file to append the result line to ('': don't).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the measures against their targets to this JSON file.")
def main(
    config_path, data_root, overrides, samples, size, channels, grid, steps, reader_batches, e2e_steps,
    device, append_to, json_path,
):
    device = torch.device(device)
    cuda = device.type == "cuda"
    size = size or (160 if cuda else 64)
    grid = grid or size // 2
    config = config_from_dict(read_config(config_path, overrides))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(data_root) if data_root else _synthetic(Path(tmp) / "data", samples, size, channels, grid)
        info = open_dataset(root)
        config = resolve_config(config, info, explicit_in_channels=False)
        dc = config.data
        stream = ShardStream(info, dc.train_split, dc.layers, dc.resolution, 0, buffer_size=dc.shuffle_buffer,
                             open_shards=dc.open_shards)
        read = reader_rate(stream, dc.batch_size, dc.loader_workers, dc.prefetch, reader_batches)
        batch = next(iter(make_loader(stream, dc.batch_size, 0, 1, False)))
        model = describe(DualPMNet(config.model))
        (h, w), (gh, gw) = dc.resolution, info.feature_grid
        shape = (
            f"{h}x{w}, {dc.layers} of {info.stored_layers} layers, "
            f"features {info.feature_channels}x{gh}x{gw}, batch {dc.batch_size}, {dc.loader_workers} loader workers"
        )
        print(f"{model}\ndata: {info.root if data_root else 'synthetic'} {shape}")
        print(f"reader:           {read:8.1f} samples/s")
        rows = []
        for name, bf16 in [("bf16", True), ("fp32", False)] if cuda else [("fp32", False)]:
            rate, peak = step_rate(config, batch, device, bf16, steps, warmup=3)
            rows.append((name, rate, peak))
            mem = f", peak {peak:.1f} GiB" if cuda else ""
            print(f"train step {name}: {rate:8.1f} samples/s{mem}   reader / step = {read / rate:.1f}x")
        e2e = None
        if e2e_steps:
            e2e = end_to_end_rate(config, info, e2e_steps, Path(tmp) / "run")
            print(f"end to end:       {e2e:8.1f} samples/s  ({e2e_steps} train() steps, reader in the loop)")
    if json_path:
        step = rows[0][1]  # bf16 on CUDA: what training runs
        metrics = [Metric(f"reader samples/s ({dc.loader_workers} workers)", f"{read:.4g}"),
                   *(Metric(f"train step {n} samples/s", f"{r:.4g}") for n, r, _ in rows),
                   Metric(f"reader / {rows[0][0]} step", f"{read / step:.1f}x", f">= {TARGET_READER:.0f}x",
                          read / step >= TARGET_READER)]
        if cuda:
            ratio = rows[0][1] / rows[1][1]
            metrics.append(Metric("bf16 / fp32 step samples/s", f"{ratio:.2f}x", f">= {TARGET_BF16:.0f}x",
                                  ratio >= TARGET_BF16))
        if e2e is not None:
            share = f"{e2e / step:.0%} of the step"
            metrics.append(Metric(f"train() end to end samples/s ({share})", f"{e2e:.4g}"))
        write_metrics(json_path, metrics)
    if append_to:
        steps_txt = ", ".join(
            f"step {n} {r:.1f}/s" + (f" (peak {p:.1f} GiB)" if cuda else "") for n, r, p in rows
        )
        line = (
            f"- {datetime.date.today().isoformat()} `bench/train.py` {Path(config_path).name} on "
            f"{describe_machine()}: {model.split(': ', 1)[1]}; {shape}; reader {read:.1f}/s, {steps_txt}"
            + (f", end to end {e2e:.1f}/s" if e2e is not None else "")
            + f"; reader / step {read / rows[0][1]:.1f}x; load avg {os.getloadavg()[0]:.1f}\n"
        )
        record_benchmark(append_to, HEADING, line)
        print(f"appended to {append_to}")


if __name__ == "__main__":
    main()
