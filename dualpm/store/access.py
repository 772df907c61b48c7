"""A prepared store wherever it lives: a local folder, or a URL (object storage, HTTP; see `remote.py`).

`open_store(location, cache)` gives a `Store`; readers (training, inference, evaluation, `dualpm-prep
verify`/`show`) go through it, so a URL reads like a folder:

* Local: `read_shard` is `shards.read_shard` on the folder (sha256 checked before reading).
* Remote: each process keeps a private staging folder laid out like the store. A shard is read by
  fetching its whole objects (one tar, or the Zarr shard file of each array: a few requests per shard,
  not per chunk) into it while its sha256 is computed on the stream, checking that against the record in
  manifest.json, then reading the staged files with the local code; they are deleted when the shard has
  been read. `prefetch` names the shards a reader will want, in order: up to `RemoteOptions.inflight`
  of them are fetched ahead by a thread pool, overlapping with decoding and training. Zarr metadata is
  staged once per process.
* `cache` (a folder, `--cache`): fetched shards are kept there (`<cache>/<sha256 of the URL>/`, published
  whole, then marked complete) up to `cache_bytes`, least recently used evicted first; a process links
  them into its staging folder (so an eviction never pulls files from under a reader) and checks their
  sha256 again before reading. Several processes may share one cache folder.
* Staging folders are named after their process (`dualpm-stage-<pid>-*` in the temp folder, or
  `<cache>/<...>/.stage-<pid>-*`) and removed at its exit; those of killed processes by the next reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing.util
import os
import shutil
import tempfile
import threading
from collections import OrderedDict, deque
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dualpm.errors import DatasetError
from dualpm.fileio import atomic_output, atomic_write_text
from dualpm.store import shards
from dualpm.store.fields import StoredSample
from dualpm.store.manifest import MANIFEST_NAME, ColumnInfo, Manifest, load_manifest, record_path, shard_name
from dualpm.store.remote import Remote, RemoteMissing, RemoteOptions, is_url, local_path
from dualpm.store.schema import IDS
from dualpm.store.zarr_layout import array_specs, shard_keys

CACHE_BYTES = 50 << 30  # default bound of a --cache folder
Key = tuple[str, int]  # (column name, shard index)


def open_store(location: str | os.PathLike | Store, cache: str | os.PathLike | None = None,
               cache_bytes: int = CACHE_BYTES, options: RemoteOptions | None = None) -> Store:
    """The store at `location`: a folder, a file:// URL, or an s3:// gs:// http(s):// URL.

    Args:
        cache: folder keeping fetched shards of a remote store between runs (None: none; ignored for a
            local store). cache_bytes: its bound in bytes.
        options: retry/timeout settings (None: `RemoteOptions.from_env()`).
    Raises DatasetError for a URL with credentials or a query, or when the 'cloud' extra is missing.
    """
    if isinstance(location, Store):  # opened already (with its cache)
        return location
    if is_url(location):
        return Store(None, Remote(str(location), options), None if cache is None else Path(cache), cache_bytes)
    return Store(local_path(location), None, None, cache_bytes)


class Store:
    """See the module docstring. `where` names the store in messages (the folder or the URL)."""

    def __init__(self, root: Path | None, remote: Remote | None, cache: Path | None, cache_bytes: int):
        self.root, self.remote, self.cache_bytes = root, remote, cache_bytes
        self.where = remote.url if remote is not None else str(root)
        self.pool = None if cache is None or remote is None else (
            Path(cache) / hashlib.sha256(remote.url.encode()).hexdigest()[:16])
        self._rt: _Runtime | None = None
        self._manifest: Manifest | None = None

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers: runtime state is per process
        return {**self.__dict__, "_rt": None}

    @property
    def is_remote(self) -> bool:
        return self.remote is not None

    def __str__(self) -> str:
        return self.where

    def load_manifest(self) -> Manifest:
        """manifest.json, read once (DatasetError naming the store when missing or invalid)."""
        if self.root is not None:
            return load_manifest(self.root)
        if self._manifest is None:
            stage = self._runtime().stage
            self._stage_object(MANIFEST_NAME)
            with self.named():
                self._manifest = load_manifest(stage)
        return self._manifest

    def column_where(self, column: str) -> str:
        """The column folder or URL prefix, for messages."""
        return f"{self.where}/{column}"

    # -- reading -------------------------------------------------------------------------------------

    def read_shard(
        self, column: ColumnInfo, index: int, verify: bool = True
    ) -> Iterator[tuple[str, StoredSample]]:
        """`shards.read_shard` of this store: (sample id, fields) of shard `index` of `column`, its sha256
        checked first when `verify` (a remote shard: while it is fetched). Fields decode lazily; a remote
        shard's staged files stay while any of its samples does (shuffle buffers hold them a while)."""
        if self.root is not None:
            yield from shards.read_shard(self.root, column, index, verify)
            return
        key, keeper = (column.name, index), _Staged()
        try:
            self._await(column, index, verify)
            with self.named():
                for sample_id, sample in shards.read_shard(self._runtime().stage, column, index, verify=False):
                    sample.where = self.name(sample.where)
                    sample.staged = keeper  # the staged files live while any sample of the shard does
                    yield sample_id, sample
        finally:
            self._release(key, keeper, verify)

    def shard_problem(self, column: ColumnInfo, index: int) -> str | None:
        """Why shard `index` of `column` cannot be read (None: it can): unfinished, data missing. The
        checksum is checked by `read_shard`."""
        if self.root is not None:
            return shards.check_shard(self.root / column.name, index, column.format, check_checksum=False)[1]
        if index not in column.shards:
            return f"{self.column_where(column.name)} shard {index}: no record in manifest.json (shard unfinished)"
        return None

    def prefetch(self, wanted: Sequence[tuple[ColumnInfo, int]], verify: bool = True) -> None:
        """The shards the caller will read next, in order: a remote store fetches up to `inflight` of them
        ahead of `read_shard` (or `staged`), checking their sha256 when `verify`. Replaces the previous
        list; no-op for a local store."""
        if self.remote is None:
            return
        rt = self._runtime()
        with rt.lock:
            for key, future in list(rt.futures.items()):
                if key not in {(c.name, i) for c, i in wanted} and future.cancel():
                    del rt.futures[key]
            rt.schedule = [(c, i) for c, i in wanted]
            rt.verify_ahead = verify
            rt.furthest = -1
            rt.position = {(c.name, i): n for n, (c, i) in enumerate(rt.schedule)}

    @contextlib.contextmanager
    def staged(self, column: str, indices: Sequence[int], records: bool = True) -> Iterator[Path]:
        """A local folder holding the manifest, Zarr metadata, the shard records (`records`) and the data of
        shards `indices` of `column` (fetched without a checksum check: the caller checks). The local
        store's own folder for a local store."""
        if self.root is not None:
            yield self.root
            return
        manifest = self.load_manifest()
        info = manifest.columns.get(column)
        rt = self._runtime()
        for index in indices:
            if records:
                self._stage_object(record_path(Path(column), index).as_posix(), missing_ok=True)
            if info is not None:
                self._await(info, index, verify=False)
        try:
            yield rt.stage
        finally:
            for index in indices:
                self._release((column, index), None)

    def stage_for_verify(self, columns: Sequence[str]) -> Path:
        """Stage what `verify_store` reads besides shard data: manifest, Zarr metadata and every `ids`
        chunk, every plan shard's record and the records beyond the plan (where the scheme lists)."""
        manifest = self.load_manifest()
        rt = self._runtime()
        if any(c.format == "zarr" for c in manifest.columns.values()):
            self._stage_metadata()
        objects = [f"{IDS}/c/{p.index}" for p in manifest.plan] if (rt.stage / "zarr.json").exists() else []
        for name in columns:
            listed = self.remote.find(f"records/{name}/")
            planned = {record_path(Path(name), p.index).as_posix() for p in manifest.plan}
            objects += sorted(planned | {p for p in (listed or []) if p.endswith(".json")})
        list(rt.executor.map(lambda rel: self._stage_object(rel, missing_ok=True), objects))
        return rt.stage

    def name(self, text: str) -> str:
        """`text` with the staging folder replaced by the store's URL."""
        return text if self._rt is None else text.replace(str(self._rt.stage), self.where)

    # -- remote internals ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def named(self) -> Iterator[None]:
        """DatasetErrors raised in the block name the store's URL instead of the staging folder."""
        try:
            yield
        except DatasetError as err:
            raise type(err)(self.name(str(err))) from err

    def _runtime(self) -> _Runtime:
        if self._rt is None or self._rt.pid != os.getpid():
            self._rt = _Runtime(self.pool, self.remote.options.inflight)
        return self._rt

    def _stage_object(self, relative: str, missing_ok: bool = False) -> None:
        stage = self._runtime().stage
        try:
            data = self.remote.read_bytes(relative)
        except RemoteMissing:
            if missing_ok:
                return
            raise
        dest = stage / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(dest) as tmp:
            tmp.write_bytes(data)

    def _stage_metadata(self) -> None:
        rt = self._runtime()
        with rt.lock:
            if rt.metadata:
                return
            rt.metadata = True
        self._stage_object("zarr.json")
        root = json.loads((rt.stage / "zarr.json").read_text(encoding="utf-8"))
        nodes = (root.get("consolidated_metadata") or {}).get("metadata") or {}
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda key: self._stage_object(f"{key}/zarr.json", missing_ok=True), sorted(nodes)))

    def _objects(self, column: ColumnInfo, index: int) -> list[str]:
        """Store-relative paths of a shard's data objects, in the order its sha256 covers them."""
        if column.format == "webdataset":
            return [f"{column.name}/{shard_name(index)}.tar"]
        return sorted(f"{column.name}/{spec.path}/{shard_keys(spec, index)}" for spec in array_specs(column.fields))

    def _await(self, column: ColumnInfo, index: int, verify: bool) -> None:
        rt = self._runtime()
        _drain_retired(rt)
        key = (column.name, index)
        if column.format == "zarr":
            self._stage_metadata()  # here, not in a fetch thread: every fetch after it has it
        with rt.lock:
            ahead = []
            if key in rt.position:  # up to `inflight` shards beyond the furthest one a reader has opened
                rt.furthest = max(rt.furthest, rt.position[key])
                ahead = rt.schedule[rt.position[key]: rt.furthest + 1 + rt.inflight]
            for c, i in ahead or [(column, index)]:
                if (c.name, i) in rt.futures:
                    continue
                kept = rt.retired.pop((c.name, i), None)  # read a moment ago, checked, still staged
                if kept is not None and all(_inode(path) == inode for path, inode in kept):
                    rt.futures[(c.name, i)] = done = Future()
                    done.set_result(None)
                    continue
                check = rt.verify_ahead if ahead else verify
                rt.futures[(c.name, i)] = rt.executor.submit(self._fetch_shard, c, i, check)
            future = rt.futures[key]
        future.result()

    def _release(self, key: Key, keeper: _Staged | None, verified: bool = False) -> None:
        """Forget a read shard. Once `keeper` (held by its samples) is gone, its staged files join the
        `inflight` most recently read shards kept for a reader that wants them again (the dataset probe's
        shard), if `verified`, else are deleted (now when `keeper` is None); files a later fetch replaced
        (another inode) are never touched."""
        rt = self._runtime()
        with rt.lock:
            future = rt.futures.pop(key, None)
        if future is not None and not future.cancel():
            with contextlib.suppress(Exception):  # its failure was raised to the reader already
                future.result()
        column = next((c for c, i in rt.schedule if (c.name, i) == key), None)
        if column is None and self._manifest is not None:
            column = self._manifest.columns.get(key[0])
        if column is None:
            return
        files = []
        for relative in self._objects(column, key[1]):
            with contextlib.suppress(FileNotFoundError):
                files.append((rt.stage / relative, (rt.stage / relative).stat().st_ino))
        if keeper is None:
            _unlink_staged(files)
        elif verified:
            weakref.finalize(keeper, _retire, rt, key, files)
        else:
            weakref.finalize(keeper, _unlink_staged, files)

    def _fetch_shard(self, column: ColumnInfo, index: int, verify: bool) -> None:
        """Fetch a shard's objects into the staging folder (from the cache when it holds them), its sha256
        computed on the stream; with `verify`, DatasetError naming the URL unless it matches the record."""
        if column.format == "zarr":
            self._stage_object(f"{IDS}/c/{index}", missing_ok=True)
        record = column.shards.get(index)
        where = f"{self.column_where(column.name)} shard {index}"
        if verify and record is None:
            raise DatasetError(f"{where}: no record in manifest.json (shard unfinished)")
        objects = self._objects(column, index)
        rt = self._runtime()
        if self.pool is not None and record is not None and self._from_cache(column, index, record.sha256):
            return
        cached = self.pool is not None and record is not None and verify
        target = self.pool if cached else rt.stage
        digest, total, missing = hashlib.sha256(), 0, []
        try:
            for relative in objects:
                try:
                    size, blocks = self.remote.fetch(relative)
                except RemoteMissing:
                    missing.append(self.remote.url_of(relative))
                    continue
                if column.format == "zarr":
                    name = relative[len(column.name) + 1:]
                    digest.update(name.encode() + b"\0" + size.to_bytes(8, "little"))
                dest = target / relative
                dest.parent.mkdir(parents=True, exist_ok=True)
                with atomic_output(dest) as tmp, open(tmp, "wb") as fh:
                    for block in blocks:
                        fh.write(block)
                        digest.update(block)
                        total += len(block)
        except BaseException:
            self._discard(target, objects)
            raise
        if column.format == "webdataset" and missing and verify:
            self._discard(target, objects)
            raise DatasetError(f"{missing[0]}: shard {index} of column {column.name!r}: shard data missing "
                               "(not found on the server)")
        if verify and (digest.hexdigest(), total) != (record.sha256, record.bytes):
            self._discard(target, objects)
            gone = f"; missing objects: {', '.join(missing[:3])}" if missing else ""
            raise DatasetError(
                f"{where}: data do not match the sha256 of its record ({total} bytes, record says {record.bytes}; "
                f"corrupt, changed or incomplete{gone}). Nothing of this shard was read: rerun the stage that "
                f"wrote column {column.name!r}")
        if cached:
            present = [r for r in objects if self.remote.url_of(r) not in missing]
            if not self._link(present):  # before evicting: a bound below one shard still reads it
                raise DatasetError(f"{where}: a file of the shard vanished from the cache {self.pool} while "
                                   "it was written")
            _mark(self.pool, column.name, index, record.sha256, present, total)
            self._evict()

    def _discard(self, folder: Path, objects: list[str]) -> None:
        for relative in objects:
            (folder / relative).unlink(missing_ok=True)

    def _link(self, objects: list[str]) -> bool:
        """Hard-link cached files into the staging folder (False when one is gone)."""
        stage = self._runtime().stage
        for relative in objects:
            source, dest = self.pool / relative, stage / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)
            try:
                os.link(source, dest)
            except FileNotFoundError:
                return False
        return True

    def _from_cache(self, column: ColumnInfo, index: int, sha256: str) -> bool:
        marker = _marker(self.pool, column.name, index, sha256)
        try:
            objects = json.loads(marker.read_text(encoding="utf-8"))["objects"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return False
        if not self._link(objects):
            return False
        found = shards.shard_digest(self._runtime().stage / column.name, index, column.format)
        if found != (sha256, column.shards[index].bytes):
            marker.unlink(missing_ok=True)
            self._discard(self._runtime().stage, self._objects(column, index))
            return False
        with contextlib.suppress(FileNotFoundError):
            os.utime(marker)  # recently used
        return True

    def _evict(self) -> None:
        """Remove least recently used cached shards until the cache holds at most `cache_bytes`."""
        done = self.pool / ".done"
        entries = []
        for marker in done.glob("*.json"):
            with contextlib.suppress(FileNotFoundError, ValueError, OSError):
                entries.append((marker.stat().st_mtime, marker, json.loads(marker.read_text(encoding="utf-8"))))
        total = sum(e[2]["bytes"] for e in entries)
        for _, marker, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.cache_bytes:
                break
            marker.unlink(missing_ok=True)
            for relative in entry["objects"]:
                (self.pool / relative).unlink(missing_ok=True)
            total -= entry["bytes"]


class _Staged:
    """Held by every sample of a staged shard (see `Store._release`)."""


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _retire(rt: _Runtime, key: Key, files: list[tuple[Path, int]]) -> None:
    """A weakref finalizer: the garbage collector may run it at any allocation, also in the middle of a
    `with rt.lock:` block of this very thread, so it takes no lock (that deadlocked) and only queues the
    shard; `_drain_retired` files it at the next safe point."""
    rt.to_retire.append((key, files))


def _drain_retired(rt: _Runtime) -> None:
    """Move the queued shards into `rt.retired` (at most `inflight` kept), deleting the staged files of
    those pushed out. Called without `rt.lock` held."""
    stale = []
    with rt.lock:
        while rt.to_retire:
            key, files = rt.to_retire.popleft()
            old = rt.retired.pop(key, None)
            rt.retired[key] = files
            if old is not None and old != files:
                stale.append(old)
            stale += [rt.retired.popitem(last=False)[1] for _ in range(len(rt.retired) - rt.inflight)]
    for files in stale:
        _unlink_staged(files)


def _unlink_staged(files: list[tuple[Path, int]]) -> None:
    for path, inode in files:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino == inode:
                path.unlink()


def _marker(pool: Path, column: str, index: int, sha256: str) -> Path:
    return pool / ".done" / f"{column}-{shard_name(index)}-{sha256[:16]}.json"


def _mark(pool: Path, column: str, index: int, sha256: str, objects: list[str], total: int) -> None:
    atomic_write_text(_marker(pool, column, index, sha256), json.dumps({"objects": objects, "bytes": total}))


class _Runtime:
    """One process's staging folder (removed at exit), fetch threads and scheduled/fetched shards."""

    def __init__(self, pool: Path | None, inflight: int):
        self.pid = os.getpid()
        if pool is not None:
            pool.mkdir(parents=True, exist_ok=True)
        prefix = ".stage-" if pool else "dualpm-stage-"
        parent = pool if pool is not None else Path(tempfile.gettempdir())
        remove_dead_stages(parent, prefix)
        self.stage = Path(tempfile.mkdtemp(prefix=f"{prefix}{self.pid}-", dir=parent))
        self.inflight = inflight
        self.executor = ThreadPoolExecutor(max_workers=inflight, thread_name_prefix="dualpm-fetch")
        self.lock = threading.Lock()
        self.futures: dict[Key, Future] = {}
        self.schedule: list[tuple[ColumnInfo, int]] = []
        self.position: dict[Key, int] = {}
        self.metadata = False
        self.verify_ahead = True
        self.furthest = -1  # schedule position of the furthest shard read so far
        self.retired: OrderedDict[Key, list[tuple[Path, int]]] = OrderedDict()
        self.to_retire: deque[tuple[Key, list[tuple[Path, int]]]] = deque()  # see `_retire`
        # multiprocessing's finalizers also run in DataLoader workers (atexit does not).
        multiprocessing.util.Finalize(self, _cleanup, args=(self.executor, self.stage), exitpriority=10)


def remove_dead_stages(parent: Path, prefix: str) -> int:
    """Remove the staging folders `<parent>/<prefix><pid>-*` of processes no longer alive (killed ones
    never cleaned up); returns how many."""
    removed = 0
    for folder in parent.glob(f"{prefix}*-*"):
        pid = folder.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or not folder.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        except PermissionError:  # alive, another user's
            pass
    return removed


def _cleanup(executor: ThreadPoolExecutor, stage: Path) -> None:
    executor.shutdown(wait=False, cancel_futures=True)
    shutil.rmtree(stage, ignore_errors=True)
