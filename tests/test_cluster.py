"""pipeline.cluster: the task window every stage runs its Ray tasks through, and task counting."""

from __future__ import annotations

import sys
import time

import pytest
import ray
import ray.cloudpickle

from pipeline.cluster import ClusterInfo, TaskWindow, concurrent_tasks


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
