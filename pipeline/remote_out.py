"""`dualpm-prep render` / `features` writing OUT to an object store (s3://, gs://) through a local stage.

The stage runs exactly as for a local OUT, in a staging folder (`--stage`, default a folder under the
system temp named by a hash of the URL; on a Ray cluster each node stages under the same path). The
remote store is the truth:

* the driver takes the store's lock object `URL/.writer.lock` (host, pid, time; refused while another
  live writer holds it), empties the stage and pulls every object of the store that is not shard data
  (manifest.json, records, configs, Zarr metadata, the feature basis);
* a shard is complete when its record object `records/<column>/shard-N.json` exists and the sizes of its
  data objects add up to the record's bytes; every other shard of the plan is removed remotely (the
  manifest first, then the record) and redone, so a killed run rerun loses and duplicates nothing;
* the driver uploads the Zarr metadata before any shard runs;
* each shard is uploaded by the process that wrote it (`push_shard`): its data objects (Zarr: `valid`
  last, as the local writer publishes it; WebDataset: the tar, one PUT, so it appears only whole), then
  its record; then its data is deleted from the stage;
* at the end the driver uploads the other small files and manifest.json LAST; then it drops the lock.
  A failed run leaves no manifest.json (a rerun resumes).

Workers find the URL in the stage's `.remote-out.json` (written by the driver), or on another node of
a cluster in the environment variables DUALPM_PREP_OUT_URL and _RUN (forwarded by `cluster.ray_session`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import click

from dualpm.errors import ConfigError, DatasetError
from dualpm.fileio import TMP_PREFIX, atomic_write_text
from dualpm.store import MANIFEST_NAME, ShardRecord, shard_files
from dualpm.store.manifest import RECORDS_NAME, read_record, record_path
from dualpm.store.remote import Remote, RemoteMissing, is_url
from dualpm.store.schema import VALID

ENV_URL = "DUALPM_PREP_OUT_URL"
ENV_RUN = "DUALPM_PREP_OUT_RUN"  # which run the stage on a node belongs to (an older stage there is emptied)
STAGE_META = "dualpm.stage"  # click context meta: the --stage folder
REMOTE_META = "dualpm.remote_out"  # click context meta: the command's RemoteOut
MARKER = ".remote-out.json"  # STAGE/.remote-out.json: {"url": ...} for the workers on the driver's node
LOCK_OBJECT = ".writer.lock"
LOCK_HOURS = 24.0  # a lock object older than this is stale (its writer died on another node)
_TAR = re.compile(r"^([^/]+)/shard-(\d+)\.tar$")
_ZARR = re.compile(r"^([^/]+)/.+?/c/(\d+)(/.*)?$")
_RECORD = re.compile(rf"^{RECORDS_NAME}/([^/]+)/shard-(\d+)\.json$")


def default_stage(url: str) -> Path:
    """The default staging folder of store `url`: <system temp>/dualpm-out-<hash of the URL>."""
    return Path(tempfile.gettempdir()) / f"dualpm-out-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def shard_of(relative: str) -> tuple[str, int] | None:
    """(column, shard index) when `relative` is shard data (a tar, a Zarr chunk file), else None."""
    match = _TAR.match(relative) or _ZARR.match(relative)
    return (match.group(1), int(match.group(2))) if match else None


def _local_only(relative: str) -> bool:
    """Files of the stage that never go to the store: locks, claims, temporaries, the marker."""
    return any(part.startswith((".", TMP_PREFIX)) for part in relative.split("/"))


def _pull_small(remote: Remote, stage: Path, records: bool) -> None:
    """Copy every object of the store that is not shard data (nor a record unless `records`) into `stage`."""
    for relative, size in remote.sizes().items():
        if shard_of(relative) or _local_only(relative) or (not records and _RECORD.match(relative)):
            continue
        path = stage / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(remote.read_bytes(relative) if size else b"")  # an empty object has no range


def _lock_holder_dead(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        since = holder.get("time")
        return not isinstance(since, (int, float)) or time.time() - since > LOCK_HOURS * 3600
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def stage_of(out: str | os.PathLike) -> Path:
    """The folder a stage command writes for OUT `out`: `out` itself, or for a store URL its staging
    folder (--stage, or `default_stage`), the URL's `RemoteOut` kept for `remote_of`."""
    ctx = click.get_current_context()
    chosen = ctx.meta.get(STAGE_META)
    if not is_url(os.fspath(out)):
        if chosen is not None:
            raise ConfigError("--stage applies only to an OUT on object storage (s3://, gs://)")
        return Path(out)
    remote = RemoteOut(os.fspath(out), chosen)
    ctx.meta[REMOTE_META] = remote
    return remote.stage


def remote_of(ctx: click.Context) -> RemoteOut | None:
    """The `RemoteOut` of the command in `ctx` when its OUT is a store URL (see `stage_of`)."""
    return ctx.meta.get(REMOTE_META)


class RemoteOut:
    """The driver's side of one stage command writing to store `url` through folder `stage`."""

    def __init__(self, url: str, stage: Path | None):
        self.remote = Remote(url)
        self.url = self.remote.url
        self.stage = Path(stage) if stage is not None else default_stage(self.url)
        self.token = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        self.sizes: dict[str, int] = {}
        self.locked = False

    def open(self, command: str, lock: bool = True) -> Path:
        """Take the store's lock object (only check it unless `lock`), empty the stage (a folder holding
        anything else than an earlier stage is refused) and pull the store's small files; returns the
        stage. The lock object is dropped when the click command ends."""
        try:
            holder = json.loads(self.remote.read_bytes(LOCK_OBJECT))
        except RemoteMissing:
            holder = None
        except ValueError:
            holder = {}
        holder = holder if holder is None or isinstance(holder, dict) else {}  # unreadable: a stale lock
        if holder is not None and not _lock_holder_dead(holder):
            raise DatasetError(
                f"{self.url}: another command is writing this store ({holder.get('host', '?')} pid "
                f"{holder.get('pid', '?')}); wait for it to end, or if it died on another node remove "
                f"{self.remote.url_of(LOCK_OBJECT)} ({command} resumes; locks older than {LOCK_HOURS:.0f} h "
                "are ignored)")
        if lock:
            self.remote.put_bytes(LOCK_OBJECT, json.dumps(self.token).encode())
            self.locked = True
            click.get_current_context().call_on_close(self.close)
        if self.stage.exists() and any(self.stage.iterdir()):
            if not (self.stage / MARKER).is_file():  # never empty a folder that is not ours
                raise ConfigError(f"--stage {self.stage}: not empty and not a staging folder of dualpm-prep; "
                                  "give an empty or new folder")
            shutil.rmtree(self.stage)
        self.stage.mkdir(parents=True)
        run = f"{self.token['host']}:{self.token['pid']}:{self.token['time']}"
        atomic_write_text(self.stage / MARKER, json.dumps({"url": self.url, "run": run}))
        saved = {k: os.environ.get(k) for k in (ENV_URL, ENV_RUN)}
        os.environ[ENV_URL], os.environ[ENV_RUN] = self.url, run  # for the workers of a joined cluster
        ctx = click.get_current_context(silent=True)
        if ctx is not None:  # a later command of this process (tests) must not inherit them
            ctx.call_on_close(lambda: _restore_env(saved))
        self.sizes = self.remote.sizes()
        _pull_small(self.remote, self.stage, records=True)
        return self.stage

    def check_shard(self, folder: str | os.PathLike, index: int, format: str
                    ) -> tuple[ShardRecord | None, str | None]:
        """(record, None) when shard `index` of the column in stage folder `folder` is complete in the
        store, else (None, what is wrong); like `store.check_shard`, judged on the store's objects."""
        record = read_record(folder, index)
        if record is None:
            return None, "no record"
        if record.format != format:
            return None, f"stored as {record.format}"
        column = Path(folder).name
        stored = sum(size for rel, size in self.sizes.items() if shard_of(rel) == (column, index))
        if stored != record.bytes:
            return None, f"{stored} bytes in the store, the record says {record.bytes}"
        return record, None

    def prepared(self, column: str, todo_indices: list[int]) -> None:
        """Remove from the store what exists of the shards to redo (manifest.json first, then per shard
        the record first), then upload the stage's small files (Zarr metadata, configs) before any shard
        is written."""
        todo = set(todo_indices)
        if todo and MANIFEST_NAME in self.sizes:  # the store changes: readers must not trust the old manifest
            self.remote.delete(MANIFEST_NAME)
        for relative in sorted(self.sizes, key=lambda rel: not _RECORD.match(rel)):
            match = _RECORD.match(relative)
            where = (match.group(1), int(match.group(2))) if match else shard_of(relative)
            if where is not None and where[0] == column and where[1] in todo:
                self.remote.delete(relative)
        self._push_small()

    def _push_small(self) -> None:
        for path in sorted(p for p in self.stage.rglob("*") if p.is_file()):
            relative = path.relative_to(self.stage).as_posix()
            if relative != MANIFEST_NAME and not (_local_only(relative) or shard_of(relative)
                                                  or _RECORD.match(relative)):
                self.remote.put_bytes(relative, path.read_bytes())

    def finish(self) -> None:
        """Upload the small files of the finished run, manifest.json last."""
        self._push_small()
        self.remote.put_bytes(MANIFEST_NAME, (self.stage / MANIFEST_NAME).read_bytes())

    def close(self) -> None:
        """Drop the lock object if it is still this command's."""
        if not self.locked:
            return
        self.locked = False
        try:
            if json.loads(self.remote.read_bytes(LOCK_OBJECT)) == self.token:
                self.remote.delete(LOCK_OBJECT)
        except (RemoteMissing, ValueError):
            pass


# ---- worker side ----------------------------------------------------------------------------------


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _target(out_column: str | os.PathLike) -> Remote | None:
    """The store a shard written in `out_column` goes to: the one its stage's marker names (written by the
    driver, or by `pull_layout` on another node), None for a local OUT."""
    marker = Path(out_column).parent / MARKER
    return Remote(json.loads(marker.read_text())["url"]) if marker.exists() else None


def pull_layout(out_column: str | os.PathLike) -> None:
    """Before writing a shard: on a node that is not the driver's (no stage marker of this run there) but
    runs for a store URL, empty the stage (a stage of an earlier run only) and pull the store's small
    files (Zarr metadata, the feature basis) into it; the node's workers do that once, one at a time."""
    stage = Path(out_column).parent
    url, run = os.environ.get(ENV_URL), os.environ.get(ENV_RUN)
    if not url:
        return
    stage.parent.mkdir(parents=True, exist_ok=True)
    with open(stage.parent / f".{stage.name}.pull-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        marker = stage / MARKER
        if marker.exists() and (run is None or json.loads(marker.read_text()).get("run") == run):
            return
        if stage.exists() and any(stage.iterdir()):
            if not marker.exists():
                raise ConfigError(f"--stage {stage}: not empty and not a staging folder of dualpm-prep on "
                                  f"{socket.gethostname()}; give an empty or new folder")
            shutil.rmtree(stage)
        remote = Remote(url)
        stage.mkdir(parents=True, exist_ok=True)
        _pull_small(remote, stage, records=False)
        atomic_write_text(marker, json.dumps({"url": remote.url, "run": run}))


def push_shard(out_column: str | os.PathLike, record: ShardRecord) -> ShardRecord:
    """After a shard is published in the stage: upload it when OUT is a store URL (its data objects,
    Zarr's `valid` last, then its record); returns `record`. Nothing happens for a local OUT."""
    remote = _target(out_column)
    if remote is None:
        return record
    column = Path(out_column).name
    files = sorted(shard_files(out_column, record.index, record.format),
                   key=lambda item: (item[0].split("/")[0] == VALID, item[0]))
    for name, path in files:
        remote.put_bytes(f"{column}/{name}", path.read_bytes())
    remote.put_bytes(f"{RECORDS_NAME}/{column}/{record_path(out_column, record.index).name}",
                     record_path(out_column, record.index).read_bytes())
    for _, path in files:  # the store holds it now: the stage keeps no copy (its disk may be small)
        path.unlink()
    return record
