"""Shared fixtures. Markers: gpu (needs CUDA), slurm (real Slurm), slow (minutes)."""

from __future__ import annotations

import os

import pytest
import torch

# Ray 2.60 requires auth tokens by default when drivers join clusters started by `ray start`.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        # The marker itself: `"gpu" in item.keywords` also matches a checkout folder named gpu.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


# A real Slurm cluster (two nodes on this machine) for the `slurm` tests (tests/slurm.py).
from slurm import slurm_cluster  # noqa: E402,F401
