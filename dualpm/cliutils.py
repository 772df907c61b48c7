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
from dualpm.store.remote import check_url, is_url, local_path
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


class FloatOrAuto(click.ParamType):
    """A click option value: the word `auto`, or a float greater than `minimum` (shown as such in --help)."""

    name = "float|auto"

    def __init__(self, minimum: float = 0.0):
        self.minimum = minimum

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return f"FLOAT>{self.minimum:g}|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | str:
        if isinstance(value, float) or str(value).strip().lower() == "auto":
            return value if isinstance(value, float) else "auto"
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither 'auto' nor a number", param, ctx)
        if not number > self.minimum or number != number or number == float("inf"):
            self.fail(f"{value!r} must be 'auto' or a finite number above {self.minimum:g}", param, ctx)
        return number


class StoreLocation(click.ParamType):
    """A prepared store: an existing folder (or file:// URL), or an s3:// gs:// http(s):// URL (kept as a
    string; `dualpm.store.access.open_store` reads it)."""

    name = "store"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "FOLDER|URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        if isinstance(value, Path) or (isinstance(value, str) and is_url(value)):
            return value
        folder = click.Path(exists=True, file_okay=False, path_type=Path)
        return folder.convert(str(local_path(value)), param, ctx)


class OutputFolder(click.Path):
    """A local folder a command writes (file:// URLs too). A store URL (s3://, gs://, http(s)://) is
    refused in one line, unless `urls` (then s3:// and gs:// URLs are kept as checked strings, for the
    stages that write through `pipeline.remote_out`; http(s):// cannot be written)."""

    def __init__(self, urls: bool = False) -> None:
        super().__init__(file_okay=False, path_type=Path)
        self.urls = urls

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and is_url(value) and self.urls:
            if value.split("://", 1)[0].lower() in ("http", "https"):
                self.fail(f"{value}: an HTTP server cannot be written; use an s3:// or gs:// URL", param, ctx)
            try:
                return check_url(value)
            except DualPMError as err:
                self.fail(str(err), param, ctx)
        if isinstance(value, str) and is_url(value):
            self.fail(f"{value}: this command writes to a local folder only (its output is a source dataset; "
                      "render and features may write to s3:// or gs://)", param, ctx)
        return super().convert(str(local_path(value)) if isinstance(value, str) else value, param, ctx)


def cache_option(fn: F) -> F:
    """`--cache DIR` and `--cache-gib`: keep a remote store's fetched shards in DIR for later epochs/runs."""
    fn = click.option("--cache-gib", type=click.FloatRange(min=0.001), default=50.0, show_default=True,
                      help="--cache: the most it holds (GiB); least recently used shards go first.")(fn)
    return click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Folder keeping the shards of a remote --data store (s3://, gs://, https://) "
                        "for later epochs and runs (shareable between processes). Default: none.")(fn)


def renamed_option(*old: str, new: str, meaning: str, takes_value: bool = True) -> Callable[[F], F]:
    """A hidden option `old` that only refuses itself in one line naming `new`: for spellings renamed so
    that one word means one thing across the commands (README, "Words that mean one thing")."""

    def refuse(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value not in (None, False):
            raise click.UsageError(f"{'/'.join(old)} is now {new} ({meaning})", ctx)

    # Its own parameter name: the new option may keep the old one's (e.g. --store-dtype stores `precision`).
    name = "renamed_" + old[0].lstrip("-").replace("-", "_")
    return click.option(*old, name, is_flag=not takes_value, default=None, hidden=True, expose_value=False,
                        callback=refuse, is_eager=True)


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


def record_benchmark(path: str | os.PathLike, heading: str, entry: str, intro: str = "") -> None:
    """Append `entry` to section `## heading` of the markdown benchmark log `path` (atomically).

    The file and the section (with `intro` under its heading: a sentence, a table header) are created
    when missing. Earlier entries are never touched, so the log stays append-only. A list item after a
    list item, or a table row after a table row, continues it; anything else gets a blank line first.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    title = f"## {heading}"
    if title not in text.splitlines():
        text = text.rstrip("\n") + f"\n\n{title}\n\n" + (intro.strip("\n") + "\n" if intro else "")
    head, _, tail = text.partition(title + "\n")
    body, following, rest = tail.partition("\n## ")
    body, entry = body.rstrip("\n"), entry.strip("\n")
    last = body.splitlines()[-1] if body.strip() else ""
    continues = last[:1] in ("-", "|") and last[:1] == entry[:1]
    body = (body + ("\n" if continues else "\n\n") if body.strip() else "\n") + entry + "\n"
    atomic_write_text(path, head + title + "\n" + body + ("\n## " + rest if following else ""))
