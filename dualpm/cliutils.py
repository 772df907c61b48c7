"""Small helpers shared by every command line (dualpm-prep, dualpm-train, dualpm-infer, dualpm-eval).

Conventions (EDM-style): every option has a type, a range where one applies, and a shown default;
user errors (`DualPMError`) become one-line `click.ClickException`s; the resolved configuration is
printed, saved beside the outputs, and `--dry-run` stops right after that.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from dualpm.errors import DualPMError
from dualpm.fileio import atomic_write_text

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn user-facing `DualPMError`s into `click.ClickException` (message only, no traceback)."""
    try:
        yield
    except DualPMError as err:
        raise click.ClickException(str(err)) from err


def handles_user_errors(fn: F) -> F:
    """Decorator form of `user_errors` for click command functions."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with user_errors():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def show_and_save_config(config: dict[str, Any], path: str | os.PathLike | None, title: str) -> str:
    """Print the resolved configuration as YAML and save it atomically to `path` (if given)."""
    text = yaml.safe_dump(config, sort_keys=False)
    click.echo(f"{title}:\n" + "".join(f"  {line}\n" for line in text.splitlines()))
    if path is not None:
        atomic_write_text(Path(path), text)
    return text


def describe_machine() -> str:
    """'<CPU model>, <N> cores[, <GPU name>]': how benchmarks and reports say where they ran."""
    cpu = platform.processor() or platform.machine() or "unknown CPU"
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass  # not Linux: what the platform module knows
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import torch  # here, not at the top: cliutils stays light for CLIs that never need torch

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {cores} cores{gpu}"
