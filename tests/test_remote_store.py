"""Prepared stores on object storage and HTTP, against real servers on 127.0.0.1 (tests/remote_servers.py):
moto's S3 server, a plain HTTP server with ranges, and a fault-injecting proxy in front of them.

Reference results come from the local copy of the same store read by the local reader (a code path that
does not fetch anything), so "identical" means bit for bit the same tensors, ids and positions.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from dualpm.data.reader import ShardStream, make_loader, open_dataset  # noqa: E402
from dualpm.errors import DatasetError  # noqa: E402
from dualpm.store.access import open_store  # noqa: E402
from dualpm.store.remote import Remote, check_url, is_transient  # noqa: E402
from dualpm.train import load_checkpoint  # noqa: E402
from remote_servers import FaultProxy, RangeHTTPServer, moto_s3, upload_folder  # noqa: E402
from test_reader import write_store  # noqa: E402

REPO = Path(__file__).parents[1]
BUCKET = "dualpm-test"
FAST = {"DUALPM_REMOTE_BACKOFF": "0.01", "DUALPM_REMOTE_MAX_DELAY": "0.05", "DUALPM_REMOTE_TIMEOUT": "2"}


@pytest.fixture(scope="module")
def s3():
    with moto_s3(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)


def _stores(tmp: Path, s3: str, formats: tuple[str, str], prefix: str) -> tuple[Path, str]:
    root = write_store(tmp / prefix, n_train=12, n_val=4, shard_size=4, formats=formats)
    upload_folder(root, BUCKET, prefix, s3)
    return root, f"s3://{BUCKET}/{prefix}"


def _batches(location, k: int, workers: int = 0, **stream) -> list[dict]:
    info = open_dataset(location)
    loader = make_loader(ShardStream(info, "train", 2, (16, 16), seed=3, **stream), 3, workers, 2, False)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == k:
            break
    return out


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x["id"] == y["id"]
        for name in ("features", "target", "mask", "position"):
            assert torch.equal(x[name], y[name]), name


# --- pure parts --------------------------------------------------------------------------------------


def test_urls_with_credentials_or_queries_are_refused_without_repeating_the_secret():
    with pytest.raises(DatasetError, match="carries credentials") as err:
        check_url("https://alice:hunter2@example.org/store")
    assert "hunter2" not in str(err.value) and "alice" not in str(err.value)
    with pytest.raises(DatasetError, match="no query") as err:
        check_url("https://example.org/store?X-Amz-Signature=abc123")
    assert "abc123" not in str(err.value)
    assert check_url("S3://bucket/a/b/") == "s3://bucket/a/b"


def test_transience_is_judged_over_the_whole_exception_chain():
    import aiohttp
    import botocore.exceptions as bx

    def chained(outer: BaseException, inner: BaseException, cause: bool = True) -> BaseException:
        if cause:
            outer.__cause__ = inner
        else:
            outer.__context__ = inner
        return outer

    throttled = bx.ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    denied = bx.ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")
    assert is_transient(chained(OSError(errno.EIO, "wrapped"), throttled))  # s3fs wraps: the cause tells
    assert is_transient(chained(RuntimeError("x"), chained(ValueError("y"), ConnectionResetError()), cause=False))
    assert is_transient(aiohttp.ClientPayloadError("Response payload is not completed"))
    assert is_transient(TimeoutError())
    assert is_transient(OSError(errno.ECONNRESET, "reset"))
    assert not is_transient(chained(OSError(errno.EIO, "wrapped"), denied))
    assert not is_transient(chained(FileNotFoundError("gone"), ConnectionResetError()))  # missing stays missing
    assert not is_transient(ValueError("bad"))


def test_a_url_without_the_cloud_extra_is_one_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs now raises ImportError
    with pytest.raises(DatasetError, match=r"s3fs missing\): pip install 'dualpm\[cloud\]'"):
        Remote("s3://bucket/store")


# --- reading through the servers ----------------------------------------------------------------------


@pytest.mark.parametrize("formats", [("webdataset", "zarr"), ("zarr", "webdataset")])
def test_training_batches_through_a_faulty_proxy_equal_the_local_copy(tmp_path, s3, monkeypatch, formats):
    root, url = _stores(tmp_path, s3, formats, f"faulty-{formats[0]}")
    local = _batches(root, 4)
    # 503 to the first 3 GETs, two bodies cut halfway, one GET stalled past the 1 s timeout.
    with FaultProxy(s3, fail_first=3, drop={4, 8}, stall={11: 3.0}) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("DUALPM_REMOTE_TIMEOUT", "1")
        remote = _batches(url, 4)
    _same(local, remote)
    assert proxy.counts["503"] == 3 and proxy.counts["drop"] == 2 and proxy.counts["stall"] == 1


def test_loader_workers_read_a_remote_store_like_the_local_one(tmp_path, s3, monkeypatch):
    root, url = _stores(tmp_path, s3, ("zarr", "zarr"), "workers")
    with FaultProxy(s3, fail_rate=0.2, seed=5) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        remote = _batches(url, 6, workers=2)
    _same(_batches(root, 6, workers=2), remote)
    assert proxy.counts["ok"] < proxy.counts["requests"]  # faults were injected and survived


def test_an_http_store_with_ranges_reads_like_the_local_one(tmp_path):
    root = write_store(tmp_path / "http", n_train=8, n_val=4, shard_size=4, formats=("webdataset", "zarr"))
    with RangeHTTPServer(root) as server, FaultProxy(server.url, fail_first=2, drop={3}) as proxy:
        remote = _batches(proxy.url + "/", 3)
    _same(_batches(root, 3), remote)
    assert proxy.counts["503"] == 2 and proxy.counts["drop"] == 1


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_a_permanently_missing_shard_is_one_error_naming_its_url(tmp_path, s3, fmt):
    import boto3

    root, url = _stores(tmp_path, s3, (fmt, fmt), f"missing-{fmt}")
    key = "render/shard-000001.tar" if fmt == "webdataset" else "render/dpm/values/c/1/0/0"
    boto3.client("s3", endpoint_url=s3).delete_object(Bucket=BUCKET, Key=f"missing-{fmt}/{key}")
    info = open_dataset(url)
    stream = ShardStream(info, "train", 2, (16, 16), seed=0, shuffle=False, infinite=False)
    seen = []
    with pytest.raises(DatasetError) as err:
        seen.extend(s["id"] for s in stream)
    message = str(err.value)
    assert f"{url}/{key}" in message and "\n" not in message, message
    assert seen == ["0000", "0001", "0002", "0003"]  # shard 0, then the error: nothing skipped silently


def test_a_server_failing_every_time_is_tried_a_bounded_number_of_times(tmp_path, s3, monkeypatch):
    root, url = _stores(tmp_path, s3, ("webdataset", "webdataset"), "down")
    monkeypatch.setenv("DUALPM_REMOTE_ATTEMPTS", "3")
    with FaultProxy(s3, fail_first=10**6) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with pytest.raises(DatasetError, match=rf"{url}/manifest.json: still failing after 3 attempts"):
            open_dataset(url)
    assert proxy.counts["503"] == 3


def test_a_changed_object_fails_its_sha256_naming_the_shard(tmp_path, s3):
    import boto3

    root, url = _stores(tmp_path, s3, ("webdataset", "zarr"), "changed")
    data = (root / "render/shard-000002.tar").read_bytes()
    flipped = data[:700] + bytes([data[700] ^ 1]) + data[701:]
    boto3.client("s3", endpoint_url=s3).put_object(Bucket=BUCKET, Key="changed/render/shard-000002.tar", Body=flipped)
    store = open_store(url)
    column = store.load_manifest().columns["render"]
    assert len(list(store.read_shard(column, 1))) == 4
    with pytest.raises(DatasetError, match=rf"{url}/render shard 2: data do not match the sha256"):
        next(store.read_shard(column, 2))
    assert store.remote.counters.requests == 3  # manifest, shard 1, shard 2: one GET each, none twice


def test_cache_serves_later_epochs_and_runs_without_fetching_and_stays_bounded(tmp_path, s3):
    root, url = _stores(tmp_path, s3, ("zarr", "webdataset"), "cached")
    cache = tmp_path / "cache"
    first = open_dataset(url, cache=cache)
    one = _read_all(first)
    fetched = first.store.remote.counters.requests
    again = open_dataset(url, cache=cache)  # a later run (another Store, as another process has)
    assert _read_all(again) == one
    # Only the manifest and the Zarr metadata were fetched again, no shard data.
    metadata = 1 + 1 + len(json.loads((root / "zarr.json").read_text())["consolidated_metadata"]["metadata"])
    assert again.store.remote.counters.requests <= metadata + 4 < fetched  # + ids chunks (probe and 3 shards)
    sizes = sorted(r.bytes for c in first.manifest.columns.values() for r in c.shards.values())
    bound = sizes[-1] + sizes[-2]
    small = open_dataset(url, cache=tmp_path / "small", cache_bytes=bound)
    assert _read_all(small) == one
    pool = small.store.pool
    held = sum(p.stat().st_size for p in pool.rglob("*") if p.is_file()
               and not any(part.startswith((".stage", ".done")) for part in p.relative_to(pool).parts))
    assert 0 < held <= bound


def _read_all(info) -> list[tuple[str, bytes]]:
    stream = ShardStream(info, "train", 2, (16, 16), seed=0, shuffle=False, infinite=False)
    return [(s["id"], s["target"].numpy().tobytes()) for s in stream]


# --- commands -----------------------------------------------------------------------------------------


def test_verify_and_show_read_an_s3_store(tmp_path, s3):
    import boto3

    from pipeline.store_commands import show, verify

    root, url = _stores(tmp_path, s3, ("zarr", "webdataset"), "verified")
    result = CliRunner().invoke(verify, [url])
    assert result.exit_code == 0, result.output
    assert f"{url}: OK" in result.output and "render: 4 shards, 16 samples, 0 failed" in result.output
    result = CliRunner().invoke(show, [url, "--sample", "0005", "-o", str(tmp_path / "s.png")])
    assert result.exit_code == 0 and (tmp_path / "s.png").stat().st_size > 0, result.output
    boto3.client("s3", endpoint_url=s3).delete_object(Bucket=BUCKET, Key="verified/features/shard-000003.tar")
    result = CliRunner().invoke(verify, [url])
    assert result.exit_code != 0
    assert f"PROBLEM column features, shard 3: {url}/features shard 3: shard data missing" in result.output, result.output


# --- training from a remote store: kill -9 and --resume ------------------------------------------------


def _train_cli(config: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "dualpm.train.cli", str(config), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _config(path: Path, data: str, run: Path, steps: int) -> Path:
    raw = {
        "data": {"root": data, "batch_size": 2, "loader_workers": 2, "shuffle_buffer": 4},
        "model": {"in_channels": 5, "num_layers": 2, "unet": {"base_channels": 16, "channel_mult": [1, 2],
                  "num_res_blocks": 1, "attention_levels": [], "dropout": 0.0, "num_groups": 8}},
        "train": {"out_dir": str(run), "steps": steps, "lr": 2e-3, "log_every": 1, "checkpoint_every": 3,
                  "validate_every": 0, "progress": False, "record_ids": True},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def _ids_by_step(run: Path) -> dict[int, list[str]]:
    """Step -> the ids it trained on; a step recorded twice (redone after a kill) keeps its last record."""
    by_step: dict[int, list[str]] = {}
    last = None
    for line in (run / "ids" / "rank-0.txt").read_text().splitlines():
        step, _, _, sample_id = line.split()
        if int(step) != last:
            by_step[int(step)] = []
            last = int(step)
        by_step[int(step)].append(sample_id)
    return by_step


def test_kill9_while_training_from_s3_then_resume_loses_and_duplicates_nothing(tmp_path, s3, monkeypatch):
    root, url = _stores(tmp_path, s3, ("zarr", "webdataset"), "kill9")
    steps = 12  # 2 epochs of 12 samples in batches of 2
    full = _train_cli(_config(tmp_path / "full.yaml", str(root), tmp_path / "full", steps))
    with FaultProxy(s3, fail_rate=0.1, seed=7) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        config = _config(tmp_path / "remote.yaml", url, tmp_path / "remote", steps)
        killed = _train_cli(config)
        latest = tmp_path / "remote" / "checkpoints" / "step-00000003.pt"
        deadline = time.monotonic() + 120
        while killed.poll() is None and not latest.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert killed.poll() is None, killed.communicate()[0]
        os.killpg(killed.pid, signal.SIGKILL)  # the trainer and its loader workers, mid-epoch
        killed.wait(timeout=30)
        resumed = _train_cli(config, "--resume", "auto")
        out = resumed.communicate(timeout=180)[0]
    assert resumed.returncode == 0 and "resuming at step" in out, out
    assert full.wait(timeout=180) == 0, full.communicate()[0]
    k = int(re.search(r"resuming at step (\d+)", out).group(1))
    assert 3 <= k < steps
    # The killed run's buffered id records died with it; from the checkpoint on, every step trained on what
    # the uninterrupted local run trained on, and the final weights are bitwise the same (so were the
    # batches before the kill).
    remote, reference = _ids_by_step(tmp_path / "remote"), _ids_by_step(tmp_path / "full")
    assert {s: remote[s] for s in range(k + 1, steps + 1)} == {s: reference[s] for s in range(k + 1, steps + 1)}
    epochs = [sum((reference[s] for s in range(e * 6 + 1, e * 6 + 7)), []) for e in range(2)]
    assert all(sorted(e) == [f"{i:04d}" for i in range(12)] for e in epochs)  # each sample once per epoch
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "latest.pt")["model"]
    b = load_checkpoint(tmp_path / "remote" / "checkpoints" / "latest.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # Nothing secret reached the run folder or the output.
    for path in (tmp_path / "remote").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"dualpm-secret-0451" not in data and b"AKIADUALPMTEST0451" not in data, path
    assert "dualpm-secret-0451" not in out and "AKIADUALPMTEST0451" not in out
    saved = yaml.safe_load((tmp_path / "remote" / "config.yaml").read_text())
    assert saved["data"]["root"] == url


def test_a_url_with_credentials_is_refused_by_the_trainer_and_written_nowhere(tmp_path):
    from dualpm.train.cli import main

    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["--data", "s3://AKIAX:sEcReT99@bucket/store", "--out", str(run)])
    assert result.exit_code != 0 and "carries credentials" in result.output, result.output
    assert "sEcReT99" not in result.output
    assert not run.exists() or not any(b"sEcReT99" in p.read_bytes() for p in run.rglob("*") if p.is_file())


def test_file_urls_are_local_folders(tmp_path):
    root = write_store(tmp_path / "f", n_train=4, n_val=4, shard_size=4)
    info = open_dataset(f"file://{root}")
    assert info.store.root == root and not info.store.is_remote
    assert _read_all(info) == _read_all(open_dataset(root))


def test_infer_and_eval_read_the_ground_truth_from_s3_as_from_the_folder(tmp_path, s3):
    from dualpm.eval.cli import main as eval_main
    from dualpm.infer.cli import main as infer_main

    root, url = _stores(tmp_path, s3, ("zarr", "webdataset"), "infer")
    rows = {}
    for name, data in (("local", str(root)), ("s3", url)):
        pred = tmp_path / f"pred-{name}"
        result = CliRunner().invoke(infer_main, ["--oracle", "--oracle-noise", "0.01", "--data", data, "--out",
                                                 str(pred), "--no-sheets", "--no-ply"])
        assert result.exit_code == 0, result.output
        cached = ["--cache", str(tmp_path / "cache")] if name == "s3" else []
        result = CliRunner().invoke(eval_main, ["--pred", str(pred), "--surface-points", "0", "--baseline", *cached])
        assert result.exit_code == 0, result.output
        rows[name] = (pred / "metrics.csv").read_text()
    assert rows["s3"] == rows["local"] and rows["local"].count("\n") == 5  # header + 4 val samples
    assert list((tmp_path / "cache").glob("*/.done/render-shard-*.json"))  # eval --cache kept the render shards


def test_synth_refuses_an_object_store_out_in_one_line(tmp_path, monkeypatch):
    from pipeline.cli import main as prep_main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(prep_main, ["synth", "s3://bucket/prepared"])
    assert result.exit_code == 2, result.output
    assert "writes to a local folder only" in result.output and "render and features" in result.output
    assert list(tmp_path.iterdir()) == []  # no local "s3:" folder


def test_staging_folders_of_killed_processes_are_removed_by_the_next_reader(tmp_path, s3):
    root, url = _stores(tmp_path, s3, ("webdataset", "webdataset"), "stages")
    cache = tmp_path / "cache"
    first = open_store(url, cache=cache)
    first.load_manifest()
    pool = first.pool
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now
    stale, live = pool / f".stage-{dead.pid}-x1", pool / f".stage-{os.getppid()}-x2"
    for folder in (stale, live):
        (folder / "render").mkdir(parents=True)
        (folder / "render" / "shard-000000.tar").write_bytes(b"left by a killed reader")
    open_store(url, cache=cache).load_manifest()  # a new process's reader (another Store)
    assert not stale.exists() and live.exists()
    assert first._runtime().stage.exists()  # the living reader's own folder stays


def test_a_finalizer_run_inside_the_runtime_lock_does_not_deadlock(tmp_path):
    """The garbage collector may run `_retire` (a weakref finalizer) at any allocation, also while the same
    thread holds the runtime's lock (inside ThreadPoolExecutor.submit in `_await`): it once deadlocked there."""
    import threading

    from dualpm.store import access

    rt = access._Runtime(tmp_path / "pool", 2)
    staged = []
    for i in range(3):
        path = tmp_path / f"shard{i}"
        path.write_bytes(b"x")
        staged.append([(path, path.stat().st_ino)])

    def inside_the_lock():
        with rt.lock:
            for i, files in enumerate(staged):
                access._retire(rt, ("col", i), files)

    worker = threading.Thread(target=inside_the_lock, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the finalizer blocked on the lock its own thread holds"
    access._drain_retired(rt)
    assert list(rt.retired) == [("col", 1), ("col", 2)]  # the `inflight` most recent kept
    assert not (tmp_path / "shard0").exists() and (tmp_path / "shard2").exists()  # the pushed-out one deleted
