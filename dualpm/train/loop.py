"""The training loop: one code path for 2 CPU cores and for many GPUs under torchrun (DDP).

Per step (global steps: every rank takes every step, on its own infinite data stream):
forward (bf16 autocast on CUDA) -> loss -> backward (DDP averages gradients) -> the loss terms averaged
over ranks -> stop if not finite (before the optimizer touches the weights) -> clip gradient values ->
Adam -> StepLR. Rank 0 logs (TensorBoard, `metrics.jsonl`, tqdm), validates every `validate_every`
steps (the val split spread over all ranks, metrics nanmean-ed over batches) and writes checkpoints.

A checkpoint holds everything needed to continue bit for bit on the same hardware: model, optimizer,
scheduler, step, every rank's RNG states and data positions, the resolved config, the features
column's config and the dataset identity. Run folder:

```
<out_dir>/config.yaml   resolved config            <out_dir>/metrics.jsonl   one JSON object per log line
<out_dir>/tb/           TensorBoard events          <out_dir>/checkpoints/    see checkpoint.py
```

Stopping early (preemption, a job's time limit): with `stop_signals` (the CLI passes SIGUSR1 and SIGTERM)
the first such signal only sets a flag; after the step in progress every rank learns whether any rank
got one (a one-number all-reduce per step), so all stop after the same step; rank 0 writes a checkpoint
and the result says which signal stopped the run (the CLI then exits with EXIT_STOPPED).

`Trainer.run` is the loop, read top to bottom: a step, then its log line, validation, checkpoint and stop
check when each is due. Ranks and stop signals live in `distributed.py`, the run's outputs in `runlog.py`.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

from dualpm.cliutils import show_and_save_config
from dualpm.data.augment import mirror_left_right
from dualpm.data.reader import DatasetInfo, ShardStream, make_loader, open_dataset
from dualpm.errors import ConfigError, DatasetError, DualPMError
from dualpm.fileio import atomic_write_text
from dualpm.loss import dualpm_loss, dualpm_metrics
from dualpm.model import DualPMNet, describe
from dualpm.train.checkpoint import (
    RESUME_KEYS,
    CheckpointError,
    capture_rng,
    load_resume_checkpoint,
    load_weights,
    prepare_run_dir,
    restore_rng,
    save_checkpoint,
)
from dualpm.train.config import RESUMABLE_CHANGES, Config, config_diff, config_to_dict, resolve_config
from dualpm.train.distributed import Distributed, StopSignals, gather, setup_distributed
from dualpm.train.runlog import Meter, RunLog

LOSS_NAMES = ("loss/total", "loss/canonical", "loss/posed", "loss/occupancy")
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; rerun with --resume auto to continue


class NonFiniteLossError(DualPMError):
    """The loss became NaN or infinite; training stopped before the weights were updated."""


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    step: int
    run_dir: Path
    checkpoint: Path | None  # the last checkpoint written (or resumed from)
    train: dict[str, float] = field(default_factory=dict)  # last logged train losses
    val: dict[str, float] = field(default_factory=dict)  # last validation metrics
    stopped_by: str | None = None  # the signal that stopped the run before config.train.steps, e.g. "SIGTERM"


def _nanmean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for row in rows for k in row})
    out = {}
    for k in keys:
        values = [row[k] for row in rows if k in row and not math.isnan(row[k])]
        out[k] = sum(values) / len(values) if values else float("nan")
    return out


class Trainer:
    """One rank's training state (model, optimizer, scheduler, step, data positions) and `run`, the loop."""

    def __init__(
        self, config: Config, info: DatasetInfo, d: Distributed, resume: str | None, stop: StopSignals
    ):
        self.config, self.info, self.d, self.stop = config, info, d, stop
        tc = config.train
        self.run_dir = Path(tc.out_dir)
        self.device = d.device
        cuda = d.device.type == "cuda"
        self.bf16 = tc.precision == "bf16" or (tc.precision == "auto" and cuda)
        self.channels_last = tc.channels_last and cuda
        self.roles = max(config.data.loader_workers, 1)  # data consumers per rank

        checkpoint_path, state, note = load_resume_checkpoint(self.run_dir, resume) if resume else (None, None, None)
        if note is not None and d.main:
            print(note, flush=True)
        if state is not None:
            self._check_resumable(state, checkpoint_path)

        _seed_all(tc.seed)  # identical initial weights on every rank
        self.raw_model = DualPMNet(config.model).to(self.device)
        if self.channels_last:
            self.raw_model = self.raw_model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.raw_model.parameters(), lr=tc.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=tc.lr_step, gamma=tc.lr_gamma
        )
        self.step = 0
        self.positions = np.zeros((self.roles, 2), np.int64)  # (epoch, samples yielded) per role
        self.checkpoint = checkpoint_path
        if state is None:
            _seed_all(tc.seed + d.rank)  # ranks differ in dropout
        else:
            self._restore(state)

        model: torch.nn.Module = self.raw_model
        if d.world > 1:
            model = DistributedDataParallel(model, device_ids=[self.device.index] if cuda else None)
        self.model = torch.compile(model) if tc.compile else model

    # --- resume -------------------------------------------------------------------------------------

    def _check_resumable(self, state: dict[str, Any], path: Path) -> None:
        missing = [key for key in RESUME_KEYS if key not in state]
        if missing:
            raise CheckpointError(f"{path}: cannot resume from it: it lacks {', '.join(missing)}")
        if state["dataset"].get("identity") != self.info.identity:
            raise DatasetError(
                f"{path}: was trained on a different dataset (shard plan or data changed in "
                f"{self.info.root}); start a new run instead of resuming"
            )
        diff = config_diff(state["config"], config_to_dict(self.config))
        changed = [k for k in diff if k not in RESUMABLE_CHANGES]
        if changed:
            raise ConfigError(
                f"{path}: the config differs from the checkpoint's in {', '.join(changed)}; only "
                f"{', '.join(sorted(RESUMABLE_CHANGES))} may change on resume (start a new run otherwise)"
            )

    def _restore(self, state: dict[str, Any]) -> None:
        load_weights(self.raw_model, state["model"], self.checkpoint)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"{self.checkpoint}: its optimizer or scheduler state does not fit the model "
                                  f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from err
        self.step = int(state["step"])
        data = state["data"]
        same_layout = data["world"] == self.d.world and data["roles"] == self.roles
        if same_layout:
            restore_rng(state["rng"][self.d.rank])
            self.positions = data["positions"][self.d.rank].numpy().astype(np.int64)
        else:
            # Another layout cannot replay the same stream: start every consumer on a fresh epoch.
            next_epoch = int(data["positions"][..., 0].max()) + 1
            self.positions[:, 0] = next_epoch
            _seed_all(self.config.train.seed + 1000 * self.step + self.d.rank)
            if self.d.main:
                print(
                    f"note: resuming with {self.d.world} ranks x {self.roles} loader roles instead of "
                    f"{data['world']} x {data['roles']}: data restarts at epoch {next_epoch}, not bit-exact"
                )

    # --- data ---------------------------------------------------------------------------------------

    def _stream(self, split: str, train: bool) -> ShardStream:
        dc = self.config.data
        return ShardStream(
            self.info, split, dc.layers, dc.resolution, self.config.train.seed, self.d.rank, self.d.world,
            shuffle=train, buffer_size=dc.shuffle_buffer, open_shards=dc.open_shards, infinite=train,
            positions=self.positions if train else None,
            # A fresh DataLoader starts its round robin at worker 0; the batch after `step` batches
            # comes from role step % roles in an uninterrupted run.
            role_offset=self.step % self.roles if train else 0,
        )

    def batches(self, split: str, train: bool) -> Iterator[dict[str, Any]]:
        dc = self.config.data
        loader = make_loader(
            self._stream(split, train), dc.batch_size, dc.loader_workers, dc.prefetch, self.device.type == "cuda"
        )
        with self.stop.blocked():  # the workers start here
            return iter(loader)

    def _inputs(
        self, batch: dict[str, Any], augment: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = batch["features"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        mask = batch["mask"].to(self.device, non_blocking=True)
        axis = self.config.data.hflip_canonical_axis
        if augment and axis is not None:
            # Drawn from (seed, rank, step) alone: a resumed run mirrors exactly the same samples.
            rng = np.random.default_rng((self.config.train.seed, self.d.rank, self.step))
            select = torch.from_numpy(rng.random(feats.shape[0]) < 0.5)
            feats, target, mask = mirror_left_right(feats, target, mask, select, axis)
        if self.channels_last:
            feats = feats.contiguous(memory_format=torch.channels_last)
        return feats, target, mask

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # --- one step -----------------------------------------------------------------------------------

    def step_on(self, batch: dict[str, Any]) -> torch.Tensor:
        """One optimizer step on `batch`; returns the (4,) loss terms averaged over ranks."""
        feats, target, mask = self._inputs(batch, augment=True)
        with self._autocast():
            pred = self.model(feats)
        terms = dualpm_loss(pred, target, mask, self.config.loss)  # float32 NetworkOutput: outside autocast
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        local = torch.stack([terms.total, terms.canonical, terms.posed, terms.occupancy]).detach()
        values = local
        if self.d.world > 1:  # every rank sees the same values, so all ranks stop together
            values = local.clone()
            dist.all_reduce(values)
            values /= self.d.world
        if not torch.isfinite(values).all():
            self._stop_non_finite(values, batch, bool(torch.isfinite(local).all()))
        if self.config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_value_(self.raw_model.parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        role, epoch, count = (int(v) for v in batch["position"][-1])  # a batch comes from one role
        self.positions[role] = (epoch, count)
        return values

    def _stop_non_finite(self, values: torch.Tensor, batch: dict[str, Any], local_finite: bool) -> None:
        ids = gather([] if local_finite else list(batch["id"]), self.d)
        culprits = [f"rank {r}: {', '.join(i)}" for r, i in enumerate(ids) if i]
        pairs = zip(LOSS_NAMES, values.tolist(), strict=True)
        terms = ", ".join(f"{n.split('/')[1]} {v:.4g}" for n, v in pairs)
        last = f"the last good checkpoint is {self.checkpoint}" if self.checkpoint else "no checkpoint exists"
        raise NonFiniteLossError(
            f"step {self.step + 1}: the loss is not finite ({terms}); batch samples: {'; '.join(culprits)}. "
            f"The weights were not updated and {last}. Lower train.lr or check these samples."
        )

    # --- validation, logging, checkpoints -------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        dc, tc = self.config.data, self.config.train
        if dc.val_split not in self.info.shards:
            return {}
        rows = []
        self.raw_model.eval()
        for i, batch in enumerate(self.batches(dc.val_split, train=False)):
            if tc.val_batches and i >= tc.val_batches:
                break
            feats, target, mask = self._inputs(batch)
            with self._autocast():
                pred = self.raw_model(feats)  # not the DDP wrapper: ranks may run different batch counts
            rows.append(dualpm_metrics(pred, target, mask, config=self.config.loss))
        self.raw_model.train()
        return _nanmean([row for rank_rows in gather(rows, self.d) for row in rank_rows])

    def save(self) -> Path | None:
        rng = gather(capture_rng(), self.d)
        positions = gather(torch.from_numpy(self.positions.copy()), self.d)
        if not self.d.main:
            return None
        state = {
            "step": self.step,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "data": {"positions": torch.stack(positions), "world": self.d.world, "roles": self.roles},
            "config": config_to_dict(self.config),
            "features": self.info.feature_config,
            "dataset": {
                "identity": self.info.identity,
                "root": str(self.info.root),
                "resolution": list(self.info.resolution),
                "feature_channels": self.info.feature_channels,
            },
        }
        self.checkpoint = save_checkpoint(self.run_dir, state, self.step, self.config.train.keep_checkpoints)
        return self.checkpoint

    # --- the loop -----------------------------------------------------------------------------------

    def run(self, continued: bool) -> TrainResult:
        """Train until `train.steps` or a stop signal: each step is followed by its log line, validation,
        checkpoint and stop check when they are due. `continued`: this run continues the folder's run
        (also from step 0), so its log drops what lies beyond the step it starts from."""
        tc = self.config.train
        log = RunLog(self.run_dir, self.d.main, tc.progress, self.step, tc.steps, continued=continued)
        ids_file = self._open_ids_file()
        result = TrainResult(self.step, self.run_dir, self.checkpoint)
        meter = Meter()
        try:
            batches = self.batches(self.config.data.train_split, train=True)
            while self.step < tc.steps:
                t0 = time.perf_counter()
                batch = next(batches)
                values = self.step_on(batch)
                meter.add(values, len(batch["id"]) * self.d.world, time.perf_counter() - t0)
                log.bar.update(1)
                self._record_ids(ids_file, batch)
                if self._due(tc.log_every):
                    result.train = self._log_train(log, meter)
                if self._due(tc.validate_every):
                    result.val = self._validate_and_log(log)
                saved = self._due(tc.checkpoint_every)
                if saved:
                    result.checkpoint = self.save() or result.checkpoint
                if signum := self._stop_requested():
                    self._stop(result, signal.Signals(signum).name, saved)
                    break
            result.step = self.step
            return result
        finally:
            log.close()
            if ids_file is not None:
                ids_file.close()

    def _due(self, every: int) -> bool:
        """Whether a task done every `every` steps (0: never) is due after this step; the last step
        always logs, validates and checkpoints."""
        return bool(every) and (self.step % every == 0 or self.step == self.config.train.steps)

    def _open_ids_file(self):
        if not self.config.train.record_ids:
            return None
        (self.run_dir / "ids").mkdir(parents=True, exist_ok=True)
        return open(self.run_dir / "ids" / f"rank-{self.d.rank}.txt", "a", encoding="utf-8")

    def _record_ids(self, ids_file, batch: dict[str, Any]) -> None:
        if ids_file is not None:  # "<step> <epoch> <count> <id>" per sample: what each step trained on
            rows = zip(batch["id"], batch["position"].tolist(), strict=True)
            ids_file.writelines(f"{self.step} {p[0]} {p[1]} {i}\n" for i, p in rows)

    def _log_train(self, log: RunLog, meter: Meter) -> dict[str, float]:
        losses = dict(zip(LOSS_NAMES, meter.mean().tolist(), strict=True))
        extra = {"lr": self.scheduler.get_last_lr()[0], "samples_per_s": meter.rate()}
        log.record(self.step, "train", {**losses, **extra})
        log.bar.set_postfix(loss=f"{losses['loss/total']:.4g}", sps=f"{extra['samples_per_s']:.1f}")
        meter.reset()
        return losses

    def _validate_and_log(self, log: RunLog) -> dict[str, float]:
        val = self.validate()
        if val:
            log.record(self.step, "val", val)
        return val

    def _stop_requested(self) -> int:
        """The stop signal any rank received (0: none). Every rank asks after the same step (the same
        `self.step`), so the collective inside matches; never after the last step."""
        return self.agree_to_stop(self.stop.received) if self.step < self.config.train.steps else 0

    def _stop(self, result: TrainResult, name: str, saved: bool) -> None:
        result.stopped_by = name
        if not saved:
            result.checkpoint = self.save() or result.checkpoint
        if self.d.main:
            print(f"stopping at step {self.step} on {result.stopped_by}: checkpoint written to "
                  f"{result.checkpoint}; continue with --resume auto",
                  flush=True)  # a log file is block-buffered and the job may be killed soon
        if self.d.world > 1:
            # No rank exits before rank 0 has written: under srun --kill-on-bad-exit one rank's exit can
            # end the others.
            dist.barrier()

    def agree_to_stop(self, signum: int) -> int:
        """The largest signal number any rank received (0: none); a collective, called after every step."""
        if self.d.world == 1:
            return signum
        flag = torch.tensor([signum], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def train(
    config: Config,
    info: DatasetInfo | None = None,
    resume: str | None = None,
    verbose: bool = True,
    stop_signals: tuple[signal.Signals, ...] = (),
    overwrite: bool = False,
    allow_incomplete: bool = False,
) -> TrainResult:
    """Train as `config` says; under torchrun every rank calls this.

    Args:
        config: the run's configuration; with `info`, resolved against it (`resolve_config`), else its
            dataset-dependent values are filled in or checked here.
        info: the opened dataset (None: open `config.data.root`).
        resume: None (start fresh), 'auto' (continue from <out_dir>/checkpoints/latest.pt if it exists)
            or a checkpoint path.
        verbose: rank 0 prints the resolved config and the model size.
        stop_signals: signals that stop the run cleanly (e.g. STOP_SIGNALS; call from the main thread):
            the step in progress finishes, every rank stops after that same step, rank 0 writes a
            checkpoint and prints where, and the result's `stopped_by` names the signal. Their previous
            handlers are restored on return.
        overwrite: start over in a run folder that holds an earlier run, deleting it; without this
            or `resume`, such a folder is refused (`prepare_run_dir`).
        allow_incomplete: train on a store whose plan has shards unfinished in a column (rank 0 prints
            the counts); without it such a store is refused (`DatasetInfo.incomplete_refusal`).
    Raises:
        NonFiniteLossError: the loss became NaN/inf (checkpoints written before are intact).
        ConfigError, DatasetError: bad config, dataset, or a checkpoint that does not fit.
    """
    if config.data.root is None and info is None:
        raise ConfigError(
            "data.root is not set: give the prepared dataset folder (--data PATH or --set data.root=PATH)"
        )
    stop = StopSignals(stop_signals)  # before anything slow: a signal during setup stops after step 1
    try:
        if info is None:  # a caller that opened the dataset resolved the config against it already
            info = open_dataset(config.data.root, config.data.cache, int(config.data.cache_gib * 2**30))
            config = resolve_config(config, info, explicit_in_channels=True)
        check_complete(info, config, allow_incomplete)
        d = setup_distributed()
        try:
            return _train(config, info, d, resume, overwrite, verbose, stop)
        finally:
            if d.owns_group:
                dist.destroy_process_group()
    finally:
        stop.restore()


def check_complete(info: DatasetInfo, config: Config, allow_incomplete: bool) -> None:
    """Refuse an incomplete store (DatasetError with the counts and the commands that complete it), or
    with `allow_incomplete` print the counts (rank 0) and go on."""
    splits = [config.data.train_split, config.data.val_split]
    if not allow_incomplete:
        refusal = info.incomplete_refusal(splits)
        if refusal is not None:
            raise DatasetError(refusal)
    elif (what := info.incomplete(splits)) is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: training on an incomplete store (--allow-incomplete): {what}", flush=True)


def _train(
    config: Config, info: DatasetInfo, d: Distributed, resume: str | None, overwrite: bool, verbose: bool,
    stop: StopSignals,
) -> TrainResult:
    tc = config.train
    refused = None
    if d.main:  # before any rank reads a checkpoint or writes in the run folder
        try:
            prepare_run_dir(tc.out_dir, resume, overwrite, info.root)
        except ConfigError as err:
            refused = str(err)
    refused = gather(refused, d)[0]  # every rank stops when rank 0 refused the folder
    if refused is not None:
        raise ConfigError(refused)
    trainer = Trainer(config, info, d, resume, stop)
    run_dir = trainer.run_dir
    resumed = trainer.step > 0
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = config_to_dict(config)
        if verbose:
            show_and_save_config(resolved, run_dir / "config.yaml", "resolved config")
            print(describe(trainer.raw_model))
            print(
                f"data: {info.count(config.data.train_split)} train samples, "
                f"{info.count(config.data.val_split)} val; "
                f"{d.world} rank(s) x batch {config.data.batch_size}; "
                f"device {d.device}, {'bf16 autocast' if trainer.bf16 else 'fp32'}"
                + (f"; resuming at step {trainer.step}" if resumed else "")
            )
            if tc.validate_every and config.data.val_split not in info.shards:
                print(f"note: the dataset has no {config.data.val_split!r} shards: validation is skipped")
        else:
            atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    return trainer.run(continued=resume is not None)
