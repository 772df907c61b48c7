"""pipeline.cluster: joining a cluster (--address), the task window every stage runs its Ray tasks through,
and task counting."""

from __future__ import annotations

import socket
import sys
import threading
import time

import pytest
import ray
import ray.cloudpickle
from click.testing import CliRunner

from datagen import make_source_dataset
from dualpm.errors import ConfigError
from pipeline.cli import main
from pipeline.cluster import (
    ClusterError,
    ClusterInfo,
    TaskWindow,
    concurrent_tasks,
    parse_address,
    wait_for_cluster,
)


def timed_task(folder: str, job: int, seconds: float, fail: bool = False) -> int:
    """Sleep `seconds`, leaving `<job>.txt` = "start end" (perf_counter, shared by the processes of a host)."""
    start = time.perf_counter()
    time.sleep(seconds)
    with open(f"{folder}/{job}.txt", "w") as f:
        f.write(f"{start} {time.perf_counter()}")
    if fail:
        raise ValueError(f"job {job} failed on purpose")
    return job * 10


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
timed_remote = ray.remote(num_cpus=1, max_retries=0)(timed_task)


def intervals(folder) -> dict[int, tuple[float, float]]:
    return {int(p.stem): tuple(map(float, p.read_text().split())) for p in folder.glob("*.txt")}


def test_window_runs_at_most_limit_tasks_at_once_and_yields_every_result(tmp_path, ray_local):
    window = TaskWindow(range(4), lambda job: timed_remote.remote(str(tmp_path), job, 0.3), 1, "test", "job")
    results = {job: ray.get(ref) for job, ref in window}
    assert results == {0: 0, 1: 10, 2: 20, 3: 30}
    spans = sorted(intervals(tmp_path).values())
    assert len(spans) == 4
    # The local Ray has 2 CPUs, so only the window keeps the tasks one after another.
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:], strict=False))


def test_stop_submits_nothing_more_and_drains_what_is_in_flight(tmp_path, ray_local):
    # Job 0 fails at once; job 1, started with it, is still running then.
    window = TaskWindow(range(6), lambda job: timed_remote.remote(str(tmp_path), job, 0.0 if job == 0 else 1.0,
                                                                  fail=job == 0), 2, "test", "job")
    seen, errors = [], []
    for job, ref in window:
        seen.append(job)
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            errors.append(str(err.cause))
            window.stop()
    assert sorted(seen) == [0, 1]  # job 1 was in flight when job 0 failed: it finished and was yielded
    assert errors == ["job 0 failed on purpose"]
    assert sorted(intervals(tmp_path)) == [0, 1]  # jobs 2-5 never started


def test_window_limit_must_be_positive():
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        TaskWindow([], lambda job: None, 0, "test")


@pytest.mark.parametrize("cpus, gpus, resources, expected", [
    (16, 0, {"num_cpus": 1}, 16),
    (16, 2, {"num_gpus": 1, "num_cpus": 8}, 2),
    (16, 2, {"num_gpus": 1, "num_cpus": 4}, 2),   # GPUs are the limit
    (6, 4, {"num_gpus": 1, "num_cpus": 4}, 1),    # CPUs are the limit
    (16, 1, {"num_gpus": 0.25, "num_cpus": 1}, 4),
    (0, 0, {"num_cpus": 1}, 1),                   # never zero: the window needs one
])
def test_concurrent_tasks(cpus, gpus, resources, expected):
    assert concurrent_tasks(ClusterInfo(None, cpus, gpus, 1), resources) == expected


def unused_port() -> int:
    """A loopback port nothing listens on (bound once by the OS, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["nohost:notaport", "1.2.3.4", ":6379", "head:0", "head:70000", "head:"])
def test_malformed_addresses_are_one_clear_line(address):
    with pytest.raises(ConfigError, match=f"--address '{address}': expected host:port of the Ray head"):
        parse_address(address)


def test_addresses_parse():
    assert parse_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert parse_address("[::1]:6379") == ("::1", 6379) and parse_address("ray://head:10001") == ("head", 10001)


def test_wait_for_cluster_waits_for_a_late_head_and_gives_up_on_none():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        threading.Timer(0.5, server.listen).start()  # the head comes up while we wait
        wait_for_cluster(f"127.0.0.1:{port}", timeout=10)
    port = unused_port()
    start = time.monotonic()
    with pytest.raises(ClusterError, match=rf"--address 127.0.0.1:{port}: no Ray cluster answered within 1.5 s "
                       r"\(Connection refused\); check that its head is running"):
        wait_for_cluster(f"127.0.0.1:{port}", timeout=1.5)
    assert 1.5 <= time.monotonic() - start < 10
    with pytest.raises(ClusterError, match="--address nohost.invalid:6379: unknown host 'nohost.invalid'"):
        wait_for_cluster("nohost.invalid:6379", timeout=60)  # at once: waiting would not make it exist


@pytest.mark.parametrize("command", ["render", "features", "synth"])
def test_stages_give_up_on_an_absent_cluster_with_one_line(tmp_path, command):
    ds = make_source_dataset(tmp_path / "src", num_samples=1, rgb=False, masks=False)
    port = unused_port()
    inputs = [str(tmp_path / "out")] if command == "synth" else [str(ds.root), str(tmp_path / "out")]
    extra = ["--extractor", "rgb"] if command == "features" else []
    for address, message in [(f"127.0.0.1:{port}", "no Ray cluster answered within 1 s"),
                             ("nohost:notaport", "expected host:port of the Ray head")]:
        args = [command, *inputs, *extra, "--address", address, "--connect-timeout", "1"]
        result = CliRunner().invoke(main, args)
        last = result.output.strip().splitlines()[-1]
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert last.startswith("Error: --address ") and address in last and message in last, result.output
