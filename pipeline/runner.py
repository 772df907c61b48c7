"""Stage machinery shared by `dualpm-prep render` and `dualpm-prep features`.

A stage writes one column of the store: one Ray task (or actor call) per planned shard, each of which
renders / extracts its samples, publishes the shard atomically (`dualpm.store.ShardWriter`) and
returns its `ShardRecord`. This module does everything around that:

    manifest = open_manifest(out, source, shard_size)       # plan from SRC; same plan on a rerun
    todo = prepare_column(out, manifest, stage, overwrite)   # config check, stale temps, resume
    summary = run_shards(out, manifest, stage, todo, submit, max_failures, max_in_flight)
    click.echo(summary.line())

`submit(plan)` starts the work on one `ShardPlan` and returns its `ray.ObjectRef` (a remote function
with the stage's resources, or a method call on an actor); that is all a stage supplies, besides its
`Stage` (column name, format, config, field specs).

Resume: a shard is done when its sidecar matches its data (size and sha256); everything else is
removed and redone, so a rerun never mixes half-written or corrupt shards with good ones. The driver
is the only writer of manifest.json; the sidecars are the truth after a crash, and failures.jsonl
is rebuilt from the records every run (no duplicated lines).

One writer per store at a time: `lock_store` (taken by render and features before they read the
manifest, held until they end) refuses a second command on the same OUT, naming the holder; every
`ShardWriter` also claims its shard, so a stray worker of a killed run and a new one never publish the
same shard.
"""

from __future__ import annotations

import abc
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import ray

from dualpm.data.source import SKIP_KINDS, SourceDataset, describe_split_rule
from dualpm.cliutils import show_and_save_config
from dualpm.errors import ConfigError, DatasetError, DualPMError
from dualpm.fileio import atomic_write_text, exclusive_lock, refuse_nested
from dualpm.store import (
    FORMATS,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ColumnInfo,
    FieldSpec,
    Manifest,
    ShardPlan,
    ShardRecord,
    check_shard,
    column_dir,
    load_manifest,
    plan_shards,
    publish_layout,
    remove_shard,
    remove_temporaries,
    save_manifest,
    write_failures,
)
from pipeline.remote_out import STAGE_META, RemoteOut, remote_of
from pipeline.cluster import ClusterInfo, Stopwatch, TaskWindow, connect_timeout_option, ray_session

DEFAULT_SHARD_SIZE = 256
STORE_LOCK = ".writer.lock"  # OUT/.writer.lock: held (flock) by the one command writing the store
SKIPPED_NAME = "skipped.jsonl"  # files of SRC's layout folders that no sample took, and why
MANIFEST_SAVE_SECONDS = 10.0  # records are on disk anyway; this only keeps manifest.json fresh


class StageError(DualPMError):
    """A stage run that cannot go on (a shard task failed, too many failed samples)."""


@dataclass(frozen=True)
class Stage:
    """What a stage writes: column `column` in `format`, produced with `config`.

    `volatile` names config keys that may differ between runs of the same column without changing
    its data (e.g. batch size, or the render backend: both backends give the same maps); any other
    difference from the recorded config is an error unless the column is overwritten. `implied`
    gives keys added in later versions the value a column recorded without them was made with.
    """

    column: str
    format: str
    config: dict[str, Any]
    fields: dict[str, FieldSpec]
    volatile: tuple[str, ...] = ()
    implied: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        column_dir(".", self.column)  # validates the name


def lock_store(out: str | os.PathLike, source: SourceDataset, command: str) -> None:
    """Hold the store `out`'s writer lock until the current click command ends (ConfigError if `out`
    is the source or nested with it, `fileio.LockedError` naming the holder if another command writes
    it). Call it before reading the manifest: what another writer is doing would be stale."""
    refuse_nested(source.root, out, "the source dataset SRC")
    out = Path(out)
    ctx = click.get_current_context()
    if not out.exists():  # a command refused before writing anything leaves no empty OUT behind
        out.mkdir(parents=True)
        ctx.call_on_close(lambda: _remove_if_empty(out))  # runs after the lock's release (LIFO)
    what = (f"{out}: another command is writing this store (two writers would replace each other's "
            f"output); wait for it to end or stop it ({command} resumes; a writer that died releases the "
            "lock by itself)")
    ctx.with_resource(exclusive_lock(out / STORE_LOCK, what))


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty: the command wrote there
        pass


def open_manifest(out: str | os.PathLike, source: SourceDataset, shard_size: int | None) -> Manifest:
    """The manifest of `out`, or a new one planned from `source` (not saved yet).

    The plan cuts `source.split_info()` into shards of `shard_size` (None: as recorded in `out`, else
    `DEFAULT_SHARD_SIZE`) and records the split rule. An existing `out` must have been planned from
    the same source folder, shard size and sample list, and `out` must be apart from the source
    (neither inside the other): anything else is a `ConfigError` (use a new OUT folder).
    """
    refuse_nested(source.root, out, "the source dataset SRC")
    out = Path(out)
    src = str(source.root.resolve())
    if not (out / MANIFEST_NAME).exists():
        size = DEFAULT_SHARD_SIZE if shard_size is None else shard_size
        splits = source.split_info()
        return Manifest.create(src, size, plan_shards(splits.as_dict(), size), split_rule=splits.rule)
    manifest = load_manifest(out)
    if manifest.source != src:
        raise ConfigError(f"{out}: was prepared from {manifest.source}, not {src}; use a new OUT folder")
    if shard_size is not None and shard_size != manifest.shard_size:
        raise ConfigError(
            f"{out}: was planned with --shard-size {manifest.shard_size}, not {shard_size}; "
            "omit --shard-size or use a new OUT folder"
        )
    if plan_shards(source.splits(), manifest.shard_size) != manifest.plan:
        raise ConfigError(
            f"{out}: the samples or splits of {src} changed since its shard plan was made; "
            "use a new OUT folder"
        )
    return manifest


def _config_differences(old: dict[str, Any], new: dict[str, Any], volatile: tuple[str, ...],
                        implied: dict[str, Any]) -> list[str]:
    old = implied | old
    keys = sorted((set(old) | set(new)) - set(volatile))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_column(out: str | os.PathLike, manifest: Manifest, stage: Stage, overwrite: bool) -> None:
    """ConfigError if `manifest` holds `stage`'s column in another format or config (unless `overwrite`).

    Config keys in `stage.volatile` may differ. Call it before starting anything expensive.
    """
    old = manifest.columns.get(stage.column)
    if old is None or overwrite:
        return
    if old.format != stage.format:
        raise ConfigError(
            f"{out}: column {stage.column!r} is stored as {old.format}, not {stage.format}; "
            "pass the same --format, or --overwrite to redo it"
        )
    diff = _config_differences(old.config, stage.config, stage.volatile, stage.implied)
    if diff:
        raise ConfigError(
            f"{out}: column {stage.column!r} was written with a different config ({'; '.join(diff)}); "
            "use the same options, or --overwrite to redo it"
        )


def prepare_column(
    out: str | os.PathLike, manifest: Manifest, stage: Stage, overwrite: bool,
    check: Callable[[Path, int, str], tuple[ShardRecord | None, str | None]] = check_shard,
) -> list[ShardPlan]:
    """Register `stage`'s column in `manifest`, save it, and return the shards to (re)do.

    Checks the recorded config (`check_column`), removes temporaries of killed writers, keeps the
    shards whose sidecar matches their data (sha256) and removes every other shard of the plan (all
    of them with `overwrite`), then writes the store's Zarr metadata (`publish_layout`). Only call this
    while no other writer of the column runs. `check` judges a shard (an object-store OUT: on the store).
    """
    check_column(out, manifest, stage, overwrite)
    folder = column_dir(out, stage.column)
    old = manifest.columns.get(stage.column)
    if old is not None and overwrite and old.format != stage.format:
        for plan in manifest.plan:  # the other format's files would linger otherwise
            remove_shard(folder, plan.index, old.format)
    remove_temporaries(folder)
    records: dict[int, ShardRecord] = {}
    todo = []
    for plan in manifest.plan:
        record, problem = (None, "overwrite") if overwrite else check(folder, plan.index, stage.format)
        if problem is None and set(record.ids) | {f.sample_id for f in record.failures} != set(plan.ids):
            problem = "does not hold the planned samples"
        if problem is None:
            records[plan.index] = record
        else:
            remove_shard(folder, plan.index, stage.format)
            todo.append(plan)
    manifest.columns[stage.column] = ColumnInfo(
        stage.column, stage.format, SCHEMA_VERSION, stage.config, dict(stage.fields), records
    )
    folder.mkdir(parents=True, exist_ok=True)
    _save_column(out, manifest, stage.column)
    publish_layout(out, manifest)  # the Zarr root, arrays and consolidated metadata: before any writer
    return todo


def _save_column(out: str | os.PathLike, manifest: Manifest, name: str) -> None:
    """Save `manifest` with column `name` replaced in the copy on disk (another stage may own others)."""
    out = Path(out)
    if (out / MANIFEST_NAME).exists():
        on_disk = load_manifest(out)
        if on_disk.plan == manifest.plan:
            manifest.columns.update({k: v for k, v in on_disk.columns.items() if k != name})
    out.mkdir(parents=True, exist_ok=True)
    save_manifest(out, manifest)


@dataclass(frozen=True)
class RunSummary:
    """What one run of a stage did. `failures_total` counts every shard of the column."""

    column: str
    shards_done: int
    shards_skipped: int
    samples: int  # stored in the shards done by this run
    failures: int  # failed in the shards done by this run
    failures_total: int
    bytes: int  # data bytes of the shards done by this run
    seconds: float

    def line(self) -> str:
        done = self.samples + self.failures
        rate = done / self.seconds if self.seconds > 0 else 0.0
        per_sample = self.bytes / self.samples / 1024 if self.samples else 0.0
        return (
            f"{self.column}: {self.samples} samples written, {self.failures} failed "
            f"({self.failures_total} in the column) in {self.seconds:.1f} s, {rate:.1f} samples/s, "
            f"{per_sample:.1f} KiB/sample; {self.shards_done} shards done, "
            f"{self.shards_skipped} already complete"
        )


def _task_error(err: Exception) -> str:
    cause = getattr(err, "cause", None)
    return str(cause) if isinstance(cause, BaseException) else f"{type(err).__name__}: {err}"


def run_shards(
    out: str | os.PathLike,
    manifest: Manifest,
    stage: Stage,
    todo: list[ShardPlan],
    submit: Callable[[ShardPlan], ray.ObjectRef],
    max_failures: int | None,
    max_in_flight: int,
) -> RunSummary:
    """Run one task per shard of `todo` and record the results in manifest.json and failures.jsonl.

    Args:
        submit: starts the work on one shard (publishing it) and returns the ref of its `ShardRecord`.
        max_failures: the most failed samples (a count, over the whole column) the run accepts; None
            for no limit. When exceeded, no further shards are started and `StageError` is raised.
        max_in_flight: shards submitted to Ray at a time (about what the cluster runs at once). When
            the run must stop, the shards in flight finish and are recorded; none is cancelled.
    Raises:
        StageError: a task failed (after Ray's retries), too many samples failed, or none at all
            could be produced. manifest.json and failures.jsonl hold every finished shard anyway.
    """
    column = manifest.columns[stage.column]
    clock = Stopwatch()
    skipped = len(manifest.plan) - len(todo)
    window = TaskWindow(todo, submit, max_in_flight, stage.column, weight=lambda plan: len(plan.ids))
    done: list[ShardRecord] = []
    errors: list[str] = []
    last_save = time.monotonic()

    def total_failures() -> int:
        return sum(len(r.failures) for r in column.shards.values())

    try:
        for _, ref in window:
            try:
                record = ray.get(ref)
            except ray.exceptions.RayError as err:  # a task raised, or its worker died past its retries
                errors.append(_task_error(err))
                window.stop()
                continue
            if not isinstance(record, ShardRecord):
                raise TypeError(f"a shard task returned {type(record).__name__}, not a ShardRecord")
            column.shards[record.index] = record
            done.append(record)
            if max_failures is not None and total_failures() > max_failures:
                window.stop()
            if time.monotonic() - last_save > MANIFEST_SAVE_SECONDS:
                _save_column(out, manifest, stage.column)
                last_save = time.monotonic()
    finally:
        _save_column(out, manifest, stage.column)
        write_failures(out, manifest)
    error = None
    if errors:
        error = f"a shard task failed: {errors[0]}"
        if len(errors) > 1:
            error += f" (and {len(errors) - 1} more shard tasks failed)"
    elif max_failures is not None and total_failures() > max_failures:
        error = (
            f"{total_failures()} samples failed, more than --max-failures {max_failures}; "
            f"see {Path(out) / 'failures.jsonl'}"
        )
    summary = RunSummary(
        column=stage.column,
        shards_done=len(done),
        shards_skipped=skipped,
        samples=sum(r.count for r in done),
        failures=sum(len(r.failures) for r in done),
        failures_total=total_failures(),
        bytes=sum(r.bytes for r in done),
        seconds=clock.seconds,
    )
    if error is not None:
        raise StageError(f"{stage.column}: {error} ({summary.shards_done} shards finished; rerun to resume)")
    if todo and summary.samples == 0 and sum(r.count for r in column.shards.values()) == 0:
        raise StageError(f"{stage.column}: no sample could be produced; see {Path(out) / 'failures.jsonl'}")
    return summary


def describe_plan(manifest: Manifest) -> str:
    """One line about a shard plan: shards and samples per split."""
    splits: dict[str, tuple[int, int]] = {}
    for plan in manifest.plan:
        shards, samples = splits.get(plan.split, (0, 0))
        splits[plan.split] = (shards + 1, samples + len(plan.ids))
    parts = [f"{name} {samples} samples in {shards} shards" for name, (shards, samples) in splits.items()]
    line = f"shard plan ({manifest.shard_size} samples per shard): " + (", ".join(parts) or "no samples")
    return line if manifest.split_rule is None else f"{line}; {describe_split_rule(manifest.split_rule)}"


def report_skipped(out: str | os.PathLike | None, source: SourceDataset) -> str:
    """Write `out/skipped.jsonl` (one line per file of SRC that no sample took; None: write nothing)
    and return a line that counts them by kind."""
    skipped = source.skipped
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(s.to_json(), ensure_ascii=False) + "\n" for s in skipped)
        atomic_write_text(Path(out) / SKIPPED_NAME, lines)
    if not skipped:
        return f"source: every file of {source.root}'s layout folders belongs to a sample"
    counts = {kind: sum(s.kind == kind for s in skipped) for kind in SKIP_KINDS}
    parts = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
    where = f"see {Path(out) / SKIPPED_NAME}" if out is not None else "listed on a real run"
    return f"source: {len(skipped)} files not taken ({parts}); {where}"


def require_samples(manifest: Manifest, source: SourceDataset) -> None:
    """DatasetError when the plan holds no sample (an empty or wrong SRC folder)."""
    if not manifest.plan:
        raise DatasetError(f"{source.root}: no samples found (expected poses/<id>_pose.npz files)")


# The options every shard stage (render, features) shares, defined once so they read the same everywhere.
@dataclass(frozen=True)
class PlannedStage:
    """A stage command's settings before Ray starts: its config object, the column description to check
    against OUT (nothing written yet), and what --dry-run prints."""

    config: Any
    stage: Stage
    dry_config: dict[str, Any]


class StageLaunch(abc.ABC):
    """What a stage does on the cluster once Ray runs: resolve its resources (and models), describe its
    final column, start its workers for the shards to do, and free them afterwards."""

    @abc.abstractmethod
    def stage(self) -> Stage:
        """The column description as written (backend, device, basis resolved)."""

    @abc.abstractmethod
    def start(self, todo: list[ShardPlan]) -> tuple[Callable[[ShardPlan], Any], int]:
        """(submit: shard plan -> Ray object ref of its ShardRecord, how many shards in flight at once)."""

    def stop(self) -> None:
        """Free what `start` took (actors); tasks need nothing."""


@dataclass(frozen=True)
class StageRun:
    """The options every stage command shares (`shard_stage_options`, --workers, --overwrite)."""

    name: str  # the column, also in "dualpm-prep NAME" and NAME.config.yaml
    src: Path
    out: Path
    shard_size: int | None
    workers: int | None
    address: str | None
    connect_timeout: float
    overwrite: bool
    max_failures: int | None
    dry_run: bool


def drive_stage(run: StageRun, plan: Callable[[SourceDataset, Manifest], PlannedStage],
                launch: Callable[[ClusterInfo, PlannedStage, Manifest], StageLaunch]) -> None:
    """One stage command from start to end, the same for every stage: lock OUT, open the plan, check the
    column before anything starts, dry run, then on Ray: save the config, prepare the column and run the
    unfinished shards; print the summary and the source files no sample took."""
    source = SourceDataset(run.src)
    remote: RemoteOut | None = remote_of(click.get_current_context())  # OUT is a store URL: run.out stages
    if remote is not None:
        refuse_nested(source.root, run.out, "the source dataset SRC")
        remote.open(f"dualpm-prep {run.name}", lock=not run.dry_run)  # the lock object, dropped at the end
    if not run.dry_run:
        lock_store(run.out, source, f"dualpm-prep {run.name}")
    manifest = open_manifest(run.out, source, run.shard_size)
    require_samples(manifest, source)
    planned = plan(source, manifest)
    check_column(run.out, manifest, planned.stage, run.overwrite)  # before Ray starts or anything is written
    if run.dry_run:
        show_and_save_config(planned.dry_config, None, f"{run.name} config (dry run)")
        click.echo(f"{describe_plan(manifest)}\n{report_skipped(None, source)}")
        return
    with ray_session(run.address, None if run.address else run.workers, run.connect_timeout) as cluster:
        click.echo(f"{describe_plan(manifest)}; Ray: {cluster.nodes} nodes, {cluster.cpus} CPUs, "
                   f"{cluster.gpus} GPUs")
        launched = launch(cluster, planned, manifest)
        try:
            stage = launched.stage()
            run.out.mkdir(parents=True, exist_ok=True)
            show_and_save_config(stage.config, run.out / f"{run.name}.config.yaml", f"{run.name} config")
            skipped = report_skipped(run.out, source)
            todo = prepare_column(run.out, manifest, stage, run.overwrite,
                                  check_shard if remote is None else remote.check_shard)
            if remote is not None:
                remote.prepared(stage.column, [p.index for p in todo])
            submit, in_flight = launched.start(todo)
            summary = run_shards(run.out, manifest, stage, todo, submit, run.max_failures, in_flight)
        finally:
            launched.stop()  # free the GPUs / CPUs now (a cluster outlives this command)
    if remote is not None:
        remote.finish()  # manifest.json last
    click.echo(f"{summary.line()}\n{skipped}")


_SHARED_OPTIONS = (
    click.option("--shard-size", type=click.IntRange(min=1), default=None, show_default="as in OUT, else 256",
                 help="Samples per shard (fixed by the first stage run on OUT)."),
    click.option("--address", type=str, default=None, show_default="start a local Ray",
                 help="host:port of a running Ray cluster ('auto': the one on this node)."),
    connect_timeout_option,
    click.option("--max-failures", type=click.IntRange(min=0), default=None, show_default="no limit",
                 help="Most failed samples (a count, over the whole column) before the run stops with an error."),
    click.option("--dry-run", is_flag=True, help="Print the config and the shard plan, write nothing."),
    click.option("--stage", type=click.Path(file_okay=False, path_type=Path), default=None, expose_value=False,
                 show_default="<temp>/dualpm-out-<hash of OUT>",
                 callback=lambda ctx, _, value: ctx.meta.__setitem__(STAGE_META, value),
                 help="OUT is an s3:// or gs:// URL: the local folder shards are written in before upload "
                      "(the same path on every node of a cluster)."),
)


def shard_stage_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --shard-size, --address, --connect-timeout, --max-failures, --dry-run and --stage to a stage
    command."""
    for option in reversed(_SHARED_OPTIONS):
        fn = option(fn)
    return fn

