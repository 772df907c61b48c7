"""The shared stage runner: plan and manifest, config checks, resume, failures.jsonl, --max-failures.

A tiny stage ("toy": one small array per sample, listed ids fail) runs as real Ray tasks on the
session's local Ray, so these tests exercise the runner, not any renderer.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import replace

import numpy as np
import pytest
import ray
import ray.cloudpickle

from datagen import make_source_dataset
from dualpm.data.source import SPLIT_FILE, SourceDataset
from dualpm.errors import ConfigError
from dualpm.store import (
    FAILURES_NAME,
    FieldSpec,
    ShardWriter,
    data_path,
    load_manifest,
    plan_shards,
    read_shard,
    verify_store,
)
from pipeline.runner import (
    Stage,
    StageError,
    describe_plan,
    open_manifest,
    prepare_column,
    report_skipped,
    run_shards,
)


TOY_FIELDS = {"value": FieldSpec("array", (1,), "int64")}


def toy_shard(folder: str, plan, fmt: str, bad: frozenset[str], crash: bool = False,
              die_once: str | None = None):
    """Publish shard `plan.index`: sample i holds `value` = [index of i in the plan].

    crash: raise instead. die_once: path of a marker file; if it does not exist yet, create it and
    SIGKILL this worker halfway through writing the shard.
    """
    if crash:
        raise ValueError(f"toy task of shard {plan.index} crashed on purpose")
    with ShardWriter(folder, plan, fmt, TOY_FIELDS, overwrite=True) as writer:
        for k, sample_id in enumerate(plan.ids):
            if die_once is not None and k == 1 and not os.path.exists(die_once):
                open(die_once, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            if sample_id in bad:
                writer.fail(sample_id, f"{sample_id} is bad")
            else:
                writer.add(sample_id, {"value": np.array([k], np.int64)})
    return writer.record


# Ray workers cannot import this test module: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
toy_remote = ray.remote(num_cpus=1, max_retries=2)(toy_shard)


def toy_stage(fmt: str = "webdataset", **config) -> Stage:
    return Stage("toy", fmt, {"scale": 1} | config, TOY_FIELDS,
                 volatile=("batch",))


def run_toy(out, source, stage, shard_size=3, overwrite=False, bad=frozenset(), max_failures=None, crash=(),
            die_once=None, max_in_flight=2):
    manifest = open_manifest(out, source, shard_size)
    todo = prepare_column(out, manifest, stage, overwrite)
    folder = str(out / stage.column)

    def submit(plan):
        marker = str(die_once) if die_once is not None and plan.index == 1 else None
        return toy_remote.remote(folder, plan, stage.format, frozenset(bad), plan.index in crash, marker)

    return todo, run_shards(out, manifest, stage, todo, submit, max_failures, max_in_flight)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    ds = make_source_dataset(tmp_path_factory.mktemp("src"), num_samples=10, val=3, rgb=False, masks=False)
    return SourceDataset(ds.root)


def failure_lines(out):
    return [json.loads(line) for line in (out / FAILURES_NAME).read_text().splitlines()]


def test_open_manifest_plans_splits_and_refuses_a_different_source(tmp_path, tmp_path_factory, ray_local,
                                                                     source):
    manifest = open_manifest(tmp_path, source, 4)
    assert manifest.plan == plan_shards(source.splits(), 4)
    assert [(p.split, len(p.ids)) for p in manifest.plan] == [("train", 4), ("train", 3), ("val", 3)]
    assert not (tmp_path / "manifest.json").exists()  # planning alone writes nothing
    run_toy(tmp_path, source, toy_stage(), shard_size=4)
    assert open_manifest(tmp_path, source, None).plan == manifest.plan  # rerun: the recorded size
    assert open_manifest(tmp_path, source, 4).plan == manifest.plan
    with pytest.raises(ConfigError, match="--shard-size 4, not 5"):
        open_manifest(tmp_path, source, 5)
    other = make_source_dataset(tmp_path_factory.mktemp("other"), num_samples=10, val=3, rgb=False,
                                masks=False)
    with pytest.raises(ConfigError, match="was prepared from"):
        open_manifest(tmp_path, SourceDataset(other.root), 4)


def test_the_manifest_records_the_split_rule_and_the_plan_line_says_it(tmp_path, ray_local):
    ds = make_source_dataset(tmp_path / "src", num_samples=6, rgb=False, masks=False)
    (ds.root / SPLIT_FILE).write_text("".join(f"{i}\n" for i in ds.ids[:4]))
    run_toy(tmp_path / "out", SourceDataset(ds.root), toy_stage())
    manifest = load_manifest(tmp_path / "out")
    assert [(p.split, p.ids) for p in manifest.plan] == [
        ("train", tuple(ds.ids[:3])), ("train", (ds.ids[3],)), ("val", tuple(ds.ids[4:]))]
    assert manifest.split_rule == {"rule": SPLIT_FILE, "file": SPLIT_FILE, "listed": 4,
                                   "listed_without_sample": 0, "examples": []}
    line = describe_plan(manifest).split("; ")[-1]
    assert line == f"splits from {SPLIT_FILE}: train = its 4 listed ids, val = all others"
    assert report_skipped(None, SourceDataset(ds.root)).startswith("source: every file")


def test_open_manifest_refuses_a_changed_sample_list(tmp_path, ray_local):
    ds = make_source_dataset(tmp_path / "src", num_samples=5, rgb=False, masks=False)
    run_toy(tmp_path / "out", SourceDataset(ds.root), toy_stage())
    (ds.root / "poses" / "000005_pose.npz").unlink()
    with pytest.raises(ConfigError, match="changed since its shard plan"):
        open_manifest(tmp_path / "out", SourceDataset(ds.root), None)


def test_run_records_shards_failures_and_resumes_nothing_when_complete(tmp_path, ray_local, source):
    bad = {"000002", "000009"}
    todo, summary = run_toy(tmp_path, source, toy_stage(), bad=bad)
    assert [p.index for p in todo] == [0, 1, 2, 3]  # train 7 -> 3 + 3 + 1, val 3
    assert (summary.shards_done, summary.shards_skipped, summary.samples, summary.failures) == (4, 0, 8, 2)
    manifest = load_manifest(tmp_path)
    column = manifest.columns["toy"]
    assert column.config == {"scale": 1} and sorted(column.shards) == [0, 1, 2, 3]
    assert sum(r.count for r in column.shards.values()) == 8
    assert verify_store(tmp_path) == []
    lines = failure_lines(tmp_path)
    assert sorted(line["id"] for line in lines) == sorted(bad)
    assert {line["column"] for line in lines} == {"toy"}
    stored = {i: v["value"][0] for p in manifest.plan
              for i, v in read_shard(tmp_path, manifest.columns["toy"], p.index)}
    assert stored == {i: p.ids.index(i) for p in manifest.plan for i in p.ids if i not in bad}
    assert "8 samples written, 2 failed" in summary.line()

    todo, again = run_toy(tmp_path, source, toy_stage(batch=7), bad=bad)  # a volatile key may change
    assert todo == [] and (again.shards_done, again.shards_skipped, again.failures_total) == (0, 4, 2)
    assert len(failure_lines(tmp_path)) == 2  # rebuilt, not appended


def test_resume_redoes_only_missing_corrupt_or_unrecorded_shards(tmp_path, ray_local, source):
    run_toy(tmp_path, source, toy_stage())
    folder = tmp_path / "toy"
    kept = data_path(folder, 3).stat()
    data_path(folder, 0).unlink()  # deleted data
    raw = bytearray(data_path(folder, 1).read_bytes())
    raw[1000] ^= 0xFF
    data_path(folder, 1).write_bytes(bytes(raw))  # flipped byte: checksum mismatch
    (tmp_path / "records" / "toy" / "shard-000002.json").unlink()  # data without a sidecar: unfinished
    stale = folder / ".tmp-shard-000002.tar.abc123"
    stale.write_bytes(b"left by a killed writer")
    todo, summary = run_toy(tmp_path, source, toy_stage())
    assert [p.index for p in todo] == [0, 1, 2] and summary.shards_skipped == 1
    assert not stale.exists()
    assert data_path(folder, 3).stat().st_mtime_ns == kept.st_mtime_ns  # untouched
    assert verify_store(tmp_path) == []


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_a_worker_killed_mid_shard_is_retried_and_leaves_no_visible_partial_shard(tmp_path, ray_local, source,
                                                                                     fmt):
    marker = tmp_path / "died"
    todo, summary = run_toy(tmp_path / "out", source, toy_stage(fmt), die_once=marker)
    assert marker.exists()  # the first attempt of shard 1 was killed while writing
    assert summary.shards_done == 4 and summary.samples == 10
    assert verify_store(tmp_path / "out") == []
    folder = tmp_path / "out" / "toy"
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    # The killed tar writer's temporary, hidden from readers (a Zarr writer buffers its shard in memory
    # and writes it at the end: killed mid-shard, it leaves nothing) ...
    assert bool(leftovers) == (fmt == "webdataset")
    prepare_column(tmp_path / "out", load_manifest(tmp_path / "out"), toy_stage(fmt), overwrite=False)
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]  # ... and removed by the next run


def test_config_change_needs_overwrite(tmp_path, ray_local, source):
    run_toy(tmp_path, source, toy_stage())
    # A key added in a later version, at the value older columns were made with, is no change.
    run_toy(tmp_path / "old", source, toy_stage())
    with pytest.raises(ConfigError, match=r"different config \(near: 0.1 -> 0.2\)"):
        run_toy(tmp_path / "old", source, replace(toy_stage(near=0.2), implied={"near": 0.1}))
    assert run_toy(tmp_path / "old", source, replace(toy_stage(near=0.1), implied={"near": 0.1}))[0] == []
    with pytest.raises(ConfigError, match=r"different config \(scale: 1 -> 2\)"):
        run_toy(tmp_path, source, toy_stage(scale=2))
    with pytest.raises(ConfigError, match="stored as webdataset, not zarr"):
        run_toy(tmp_path, source, toy_stage("zarr"))
    todo, summary = run_toy(tmp_path, source, toy_stage("zarr", scale=2), overwrite=True)
    assert len(todo) == 4 and summary.shards_done == 4
    assert load_manifest(tmp_path).columns["toy"].config["scale"] == 2
    assert not list((tmp_path / "toy").glob("*.tar"))  # the old format's shards are gone
    assert verify_store(tmp_path) == []


def test_max_failures_is_a_count_over_the_column(tmp_path, ray_local, source):
    bad = {"000001", "000004", "000008"}  # shards 0, 1, 3 (val: 000008-000010)
    with pytest.raises(StageError, match="3 samples failed, more than --max-failures 2"):
        run_toy(tmp_path, source, toy_stage(), bad=bad, max_failures=2)
    # What finished is recorded (the driver stopped once the count was exceeded); a rerun with a
    # higher limit completes the column and keeps the earlier shards.
    manifest = load_manifest(tmp_path)
    assert sum(len(r.failures) for r in manifest.columns["toy"].shards.values()) >= 3
    _, summary = run_toy(tmp_path, source, toy_stage(), bad=bad, max_failures=3)
    assert summary.failures_total == 3 and len(failure_lines(tmp_path)) == 3
    with pytest.raises(StageError, match="more than --max-failures 0"):  # also with nothing left to do
        run_toy(tmp_path, source, toy_stage(), bad=bad, max_failures=0)


def test_a_failing_task_stops_the_run_with_its_error(tmp_path, ray_local, source):
    with pytest.raises(StageError, match=r"crashed on purpose \(3 shards finished; rerun to resume\)"):
        run_toy(tmp_path, source, toy_stage(), crash={2}, max_in_flight=4)
    # All four shards were in flight: the three good ones finished and are recorded, none cancelled.
    records = load_manifest(tmp_path).columns["toy"].shards
    assert sorted(records) == [0, 1, 3]
    todo, summary = run_toy(tmp_path, source, toy_stage())  # the rerun finishes the rest
    assert 2 in [p.index for p in todo] and summary.failures_total == 0
    assert verify_store(tmp_path) == []


def test_all_samples_failing_is_an_error(tmp_path, ray_local, source):
    with pytest.raises(StageError, match="no sample could be produced"):
        run_toy(tmp_path, source, toy_stage(), bad=set(source.ids))
    assert len(failure_lines(tmp_path)) == len(source.ids)


def test_stage_refuses_unknown_format_and_bad_column_name():
    with pytest.raises(ConfigError, match="unknown format"):
        Stage("toy", "parquet", {}, {})
    with pytest.raises(Exception, match="not valid"):
        Stage("a/b", "zarr", {}, {})
    assert os.sep not in Stage("ok-name", "zarr", {}, {}).column
