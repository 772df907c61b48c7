"""Ray connection and task progress, shared by every `dualpm-prep` stage.

The same command runs on a laptop (a local Ray started quietly here and shut down afterwards) and
on a cluster (`--address host:port` of a running head, e.g. one started across a Slurm allocation by
`jobs/prep.sbatch`; we never shut a cluster down).

Joining a cluster: Ray itself retries an address where nothing answers for many minutes, and a
malformed one ends in its traceback. So the address is checked here first (host:port), and its port
must accept a connection within `--connect-timeout` seconds (retried meanwhile, so a head that is
still starting is waited for); otherwise one line says which address and what to check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import click
from tqdm import tqdm

from dualpm.errors import ConfigError, DualPMError

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


DEFAULT_CONNECT_TIMEOUT = 60.0  # seconds; prep.sbatch starts the head before the stage, so this is ample
FORWARDED_ENV = ("DUALPM_PREP_OUT_URL", "DUALPM_PREP_OUT_RUN")  # to workers of a joined cluster (pipeline/remote_out.py)

# The option of every command that takes --address (render, features, synth), defined once.
connect_timeout_option = click.option(
    "--connect-timeout", type=click.FloatRange(min=1, max=86400), default=DEFAULT_CONNECT_TIMEOUT,
    show_default=True, help="With --address: seconds to wait for the Ray cluster to answer before giving up.",
)


class ClusterError(DualPMError):
    """A Ray cluster (--address) that does not answer or cannot be joined."""


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of 'host:port', '[ipv6]:port' or 'ray://host:port'; `ConfigError` otherwise."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--address {address!r}: expected host:port of the Ray head, e.g. 10.0.0.5:6379 "
            "(what `ray start --head` printed), or 'auto' for the cluster started on this node"
        )
    return host, int(port)


def wait_for_cluster(address: str, timeout: float) -> None:
    """Return once `address`'s port accepts a TCP connection, trying for up to `timeout` seconds.

    Raises `ConfigError` for a malformed address and `ClusterError` for an unknown host or a port
    that did not answer in time, each one line naming the address and what to check.
    """
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, remaining))):
                return
        except socket.gaierror as err:
            if err.errno != socket.EAI_AGAIN:  # a name that does not exist will not appear by waiting
                raise ClusterError(f"--address {address}: unknown host {host!r} ({err.strerror}); "
                                   "check the head node's name or IP address") from err
            reason = err.strerror
        except OSError as err:
            reason = err.strerror or type(err).__name__
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ClusterError(
                f"--address {address}: no Ray cluster answered within {timeout:g} s ({reason}); check that "
                "its head is running (`ray status` there), that the address is the head's IP and GCS port "
                "(6379 unless `ray start --port` said otherwise) and reachable from here, or raise "
                "--connect-timeout"
            )
        time.sleep(min(1.0, remaining))


@contextlib.contextmanager
def ray_session(
    address: str | None = None, num_cpus: int | None = None, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> Iterator[ClusterInfo]:
    """Connect to Ray for the duration of a stage.

    Args:
        address: 'host:port' of an existing cluster, or None to start a local Ray (quiet, no
            dashboard) that is shut down on exit. 'auto' joins a cluster started on this node.
        num_cpus: local Ray only: CPUs to offer (default: all).
        connect_timeout: with `address`: seconds its head has to answer (`wait_for_cluster`).
    Raises:
        ConfigError, ClusterError: a malformed address, or a cluster that cannot be joined.
    """
    if address and address != "auto":
        wait_for_cluster(address, connect_timeout)
    started = False
    if not ray.is_initialized():
        if address:
            try:
                forwarded = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}  # no credentials
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True,
                         runtime_env={"env_vars": forwarded} if forwarded else None)
            except (ConnectionError, RuntimeError, ValueError) as err:  # no cluster for 'auto', versions...
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ClusterError(f"--address {address}: cannot join the Ray cluster ({first})") from err
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
