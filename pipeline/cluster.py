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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

# Ray >= 2.5x refuses drivers that join a head started by `ray start` unless auth is configured or
# explicitly disabled. Users who configure Ray auth set RAY_AUTH_MODE themselves.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# No usage-stats prompt/collection from a tool running unattended on clusters.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402  (after the environment above)

log = logging.getLogger(__name__)


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


def as_completed(refs: Iterable[ray.ObjectRef], total_items: int, desc: str, unit: str = "sample",
                 weights: dict[ray.ObjectRef, int] | None = None) -> Iterator[tuple[ray.ObjectRef, Any]]:
    """Yield (ref, result) as Ray tasks finish, with a progress bar in `unit`s/s and an ETA.

    Args:
        refs: object refs of running tasks.
        total_items: total units of work (e.g. samples) the bar counts to.
        weights: units each ref accounts for (default 1 each).
    A task that raised re-raises here (as `ray.exceptions.RayTaskError`) for the caller to handle.
    """
    pending = list(refs)
    with tqdm(total=total_items, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                result = ray.get(ref)
                bar.update(weights[ref] if weights else 1)
                yield ref, result


class Stopwatch:
    """Wall-clock seconds since construction (for run summaries)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
