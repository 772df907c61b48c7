"""Ray connection and task progress, shared by every `dualpm-prep` stage.

The same command runs on a laptop (a local Ray started quietly here and shut down afterwards) and
on a cluster (`--address host:port` of a running head, e.g. one started across a Slurm allocation by
`jobs/prep.sbatch`; we never shut a cluster down).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from tqdm import tqdm

# Ray >= 2.5x refuses drivers that join a head started by `ray start` unless auth is configured or
# explicitly disabled. Users who configure Ray auth set RAY_AUTH_MODE themselves.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# No usage-stats prompt/collection from a tool running unattended on clusters.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402  (after the environment above)

log = logging.getLogger(__name__)

Job = TypeVar("Job")


@dataclass(frozen=True)
class ClusterInfo:
    """Resources of the Ray cluster this process is connected to."""

    address: str | None  # None for a local Ray started by us
    cpus: int
    gpus: int
    nodes: int


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[ClusterInfo]:
    """Connect to Ray for the duration of a stage.

    Args:
        address: 'host:port' of an existing cluster, or None to start a local Ray (quiet, no
            dashboard) that is shut down on exit. 'auto' joins a cluster started on this node.
        num_cpus: local Ray only: CPUs to offer (default: all).
    """
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
        started = True
    try:
        resources = ray.cluster_resources()
        info = ClusterInfo(
            address=address,
            cpus=int(resources.get("CPU", 0)),
            gpus=int(resources.get("GPU", 0)),
            nodes=sum(1 for n in ray.nodes() if n.get("Alive")),
        )
        yield info
    finally:
        if started:
            ray.shutdown()


def concurrent_tasks(cluster: ClusterInfo, resources: dict[str, float]) -> int:
    """How many tasks asking for `resources` ({"num_cpus": c, "num_gpus": g}) the cluster runs at once."""
    fits = [cluster.cpus / resources.get("num_cpus", 1)]
    if resources.get("num_gpus"):
        fits.append(cluster.gpus / resources["num_gpus"])
    return max(1, int(min(fits)))


class TaskWindow(Generic[Job]):
    """Ray tasks run at most `limit` at a time; iterate to get each `(job, ref)` as its task finishes.

    Iteration submits `submit(job)` for the jobs in order while fewer than `limit` are in flight and
    yields finished ones (call `ray.get(ref)`: it returns the result or raises the task's error), with
    a progress bar counting `weight(job)` units per finished task.

    Nothing is ever cancelled: in Ray 2.60 `ray.cancel` races with a task that is just finishing and
    aborts the driver ("Check failed: ... Tried to complete task that was not pending"). `stop()`
    instead ends submission; iteration then drains the tasks in flight, so finished work is kept.
    Keep `limit` near the number of tasks the cluster runs at once, so little waits in Ray's queue.
    """

    def __init__(self, jobs: Iterable[Job], submit: Callable[[Job], ray.ObjectRef], limit: int, desc: str,
                 unit: str = "sample", weight: Callable[[Job], int] = lambda job: 1):
        if limit < 1:
            raise ValueError(f"TaskWindow limit must be >= 1, got {limit}")
        self.queue = list(jobs)[::-1]  # popped from the end: submission in job order
        self.submit, self.limit, self.weight = submit, limit, weight
        self.desc, self.unit = desc, unit
        self.in_flight: dict[ray.ObjectRef, Job] = {}

    def stop(self) -> None:
        """Submit nothing more; iteration still yields the tasks already in flight."""
        self.queue.clear()

    def __iter__(self) -> Iterator[tuple[Job, ray.ObjectRef]]:
        total = sum(self.weight(job) for job in self.queue)
        with tqdm(total=total, desc=self.desc, unit=self.unit, dynamic_ncols=True, smoothing=0.1) as bar:
            while self.queue or self.in_flight:
                while self.queue and len(self.in_flight) < self.limit:
                    job = self.queue.pop()
                    self.in_flight[self.submit(job)] = job
                done, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=1.0)
                for ref in done:
                    job = self.in_flight.pop(ref)
                    bar.update(self.weight(job))
                    yield job, ref


class Stopwatch:
    """Wall-clock seconds since construction (for run summaries)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
