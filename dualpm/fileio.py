"""Atomic writes and safe paths: the one place the project publishes files.

Every output appears atomically: it is written under a temporary name in the destination folder
(same filesystem) and renamed into place, so a killed process never leaves a half-written file
under a final name. Untrusted relative paths (glTF buffer URIs, tar member names) are resolved with
`safe_join`, which refuses anything that would leave its folder; `refuse_nested` keeps a command's
output out of its input. `exclusive_lock` lets one writer at a time into a store or a shard.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dualpm.errors import ConfigError, DualPMError

TMP_PREFIX = ".tmp-"


def _temp_name(path: Path) -> Path:
    # Unique per process and call; hidden and prefixed so readers and listings skip it.
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed.

    Use with libraries that write to a path themselves (PIL, numpy, trimesh, tar writers)::

        with atomic_output(out / "a.png") as tmp:
            image.save(tmp, format="PNG")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it is renamed to `path`.

    If `path` exists it is replaced only when `overwrite` is true (the old folder is moved aside
    first, then deleted, so the final name never points at a partial folder). On error the
    temporary folder is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists")
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-{path.name}.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete leftovers of killed writers (names starting with `TMP_PREFIX`) in `folder`.

    Only call this where no other writer can be active (e.g. before a run starts).
    Returns the number of entries removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in folder.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


class UnsafePathError(DualPMError):
    """A relative path from untrusted input that would escape its folder."""


def safe_join(root: str | os.PathLike, relative: str) -> Path:
    """Resolve untrusted `relative` inside `root`, refusing absolute paths and escapes.

    Raises `UnsafePathError` for absolute paths, drive letters, `..` segments that leave `root`,
    and symlinks that resolve outside it.
    """
    if not relative or relative.startswith(("/", "\\")) or (len(relative) > 1 and relative[1] == ":"):
        raise UnsafePathError(f"path {relative!r} is absolute or empty; only paths inside {root} are allowed")
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"path {relative!r} escapes its folder {base}")
    return target


def refuse_nested(source: str | os.PathLike, out: str | os.PathLike, source_name: str) -> None:
    """`ConfigError` when the output folder `out` is `source`, is inside it, or holds it.

    A command writing there would put its output into its own input (a store inside the source
    dataset) or delete and rewrite its input. Paths are compared resolved (symlinks followed);
    `source_name` says what `source` is in the message, e.g. "the source dataset SRC".
    """
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src:
        raise ConfigError(f"{out}: OUT is {source_name} itself; give OUT a folder of its own")
    if dst.is_relative_to(src):
        raise ConfigError(f"{out}: OUT is inside {source_name} ({source}); give OUT a folder outside it")
    if src.is_relative_to(dst):
        raise ConfigError(f"{source}: {source_name} is inside OUT ({out}); give OUT a folder of its own")


class LockedError(DualPMError):
    """Another process holds the exclusive lock of a store or shard."""


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return (f"pid {info['pid']} on host {info['host']} since {info['started']}, "
                f"command: {info['command']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is just starting (it has not written its name yet)"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created, then removed on release) while the block runs.

    The lock is a `flock` on the file, which the kernel releases when its holder dies however it dies
    (kill -9, a lost node's processes end with it): a crashed holder never leaves a lock behind, and a
    lock file left by one is taken over by the next writer. The holder writes its host, pid, start
    time (UTC) and command line into the file. Raises `LockedError` ("<what>: ... held by pid P on
    host H since T, command: C") when another process holds it, and `DualPMError` where the filesystem
    has no locks (some NFS setups without a lock daemon). The file descriptor is not inherited by
    child processes.
    """
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockedError(f"{what}: held by {holder} ({path})") from None
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise DualPMError(f"{path}: this filesystem does not support file locks ({err.strerror})") from err
            raise
        # The previous holder removes the file as it releases it: a lock on a removed (or replaced) file
        # guards nothing, so take it again on what the path names now.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)
    try:
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it (see above)
        os.close(fd)
