"""Column shards: written by exactly one worker, published atomically, then described by a sidecar.

A sample is a sample id plus named fields of the kinds in `fields.py` (a column's `FieldSpec`s say which);
`read_shard` gives every consumer the same decoded fields whatever the container (docs/format.md):

* WebDataset, `OUT/<column>/shard-000042.tar` (streaming): members `<key>.<field>.<ext>` in sample order,
  key = the sample id with '%' and '.' percent-escaped (`wds_key`), written with `webdataset.TarWriter`
  under a temporary name and renamed. Readers refuse member names that are not `<valid key>.<field>.<ext>`
  (absolute, "/", "..").
* Zarr, the column's typed arrays (`zarr_layout.py`): plan shard k is the Zarr shard files
  `OUT/<column>/<array>/c/k...`, one per array, each written whole from memory and renamed into place.

Both: the data is published first, the sidecar (`manifest.ShardRecord`, OUT/records/<column>/) last, so a
shard is complete iff its sidecar exists and matches the data; `check_shard` checks that. The record's
sha256 covers exactly what the writer wrote: the tar file's bytes, or for Zarr the shard's files in sorted
order of their paths (`shard_digest`). `read_shard` checks it before it yields anything.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset

from dualpm.errors import DatasetError
from dualpm.fileio import TMP_PREFIX, atomic_output, atomic_write_bytes, LockedError, exclusive_lock, remove_stale_temporaries
from dualpm.store import zarr_layout
from dualpm.store.fields import EXTENSIONS, StoredSample, prepare_field
from dualpm.store.manifest import (
    FORMATS,
    NAME_RE,
    SCHEMA_VERSION,
    ColumnInfo,
    Failure,
    FieldSpec,
    ShardPlan,
    ShardRecord,
    check_sample_id,
    read_record,
    record_path,
    records_dir,
    shard_name,
    write_record,
)
from dualpm.store.schema import VALID

FieldValue = bytes | np.ndarray | dict
ZARR_READ_ROWS = 32  # rows read per zarr call when streaming a Zarr shard (see `_read_zarr`)
CLAIM_PREFIX = ".claim-"  # <column>/.claim-shard-000042: the lock of the shard's one writer
_KEY_ESCAPES = {"%": "%25", ".": "%2E"}
_KEY_RE = re.compile(r"%(25|2E)")


def wds_key(sample_id: str) -> str:
    """The WebDataset key of a sample id: '%' -> '%25', '.' -> '%2E' (WebDataset cuts names at the first
    dot)."""
    return "".join(_KEY_ESCAPES.get(c, c) for c in sample_id)


def sample_id_from_key(key: str) -> str:
    """The sample id of a WebDataset key (inverse of `wds_key`)."""
    return _KEY_RE.sub(lambda m: "%" if m.group(1) == "25" else ".", key)


def _check_format(format: str) -> str:
    if format not in FORMATS:
        raise DatasetError(f"unknown shard format {format!r}; expected one of {FORMATS}")
    return format


def data_path(column_dir: str | os.PathLike, index: int) -> Path:
    """Path of shard `index`'s WebDataset tar file."""
    return Path(column_dir) / f"{shard_name(index)}.tar"


def shard_files(column_dir: str | os.PathLike, index: int, format: str) -> list[tuple[str, Path]]:
    """(name relative to the column folder, path) of the data files of shard `index` that exist, sorted.

    WebDataset: the tar file. Zarr: `<array>/c/<index>...` of every array in the column folder.
    """
    folder = Path(column_dir)
    if _check_format(format) == "webdataset":
        path = data_path(folder, index)
        return [(path.name, path)] if path.is_file() or path.is_symlink() else []
    found = []
    for meta in sorted(folder.rglob("zarr.json")):
        shard = meta.parent / "c" / str(index)
        paths = [shard] if shard.is_file() or shard.is_symlink() else sorted(p for p in shard.rglob("*"))
        found += [(p.relative_to(folder).as_posix(), p) for p in paths if not p.name.startswith(TMP_PREFIX)
                  and not p.is_dir()]
    return sorted(found)


def _digest_update(digest: Any, name: str, data: bytes) -> None:
    digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)


def shard_digest(column_dir: str | os.PathLike, index: int, format: str) -> tuple[str, int]:
    """(sha256 hex, total bytes) of shard `index`'s data, as recorded by its writer.

    WebDataset: the sha256 of the tar file (what `sha256sum` prints). Zarr: the sha256 over the shard's
    files in sorted relative-path order of (posix path, NUL, 8-byte little-endian size, contents).
    Symlinks and other non-regular files raise DatasetError.
    """
    digest, total = hashlib.sha256(), 0
    for name, path in shard_files(column_dir, index, format):
        if path.is_symlink() or not path.is_file():
            raise DatasetError(f"{path}: unexpected link or special file in shard data")
        if format == "webdataset":
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
                    total += len(block)
        else:
            data = path.read_bytes()
            _digest_update(digest, name, data)
            total += len(data)
    return digest.hexdigest(), total


@dataclass(frozen=True)
class PreparedSample:
    """A sample's fields checked and converted for one container (`prepare_sample`)."""

    format: str
    values: dict[str, Any]


def prepare_sample(
    fields: Mapping[str, FieldSpec], format: str, values: Mapping[str, FieldValue], where: str
) -> PreparedSample:
    """Check a sample's field values against the column's `fields` and convert them for `format`.

    Pure and thread-safe: stages run it in worker threads (it compresses) and hand the result to
    `ShardWriter.add`. Raises DatasetError (e.g. EncodingError) for data that cannot be stored, naming
    `where`; TypeError for values of the wrong type.
    """
    unknown = sorted(set(values) - set(fields))
    # A Zarr row has every array: there, every field is required.
    missing = sorted(n for n, s in fields.items() if (s.required or format == "zarr") and n not in values)
    if unknown or missing:
        raise DatasetError(f"{where}: fields {sorted(values)} do not match the column's {sorted(fields)} "
                           f"(unknown {unknown}, missing {missing})")
    prepared = {n: prepare_field(n, fields[n], v, format, where) for n, v in values.items()}
    return PreparedSample(format, prepared)


class ShardWriter:
    """Write shard `plan.index` of the column in `column_dir`; use as a context manager.

    Exactly one worker writes a shard; samples are added in plan order. On a clean exit the data is
    published atomically under its final name(s), then the sidecar; `record` then holds the `ShardRecord`.
    If the block raises, nothing is published (an existing shard stays as it was). An existing shard is an
    error unless `overwrite` is true, in which case its sidecar is removed just before the new data
    replaces it. A Zarr column's arrays must exist (`zarr_layout.publish_layout`, run by the driver).

        with ShardWriter(out / "render", plan, "webdataset", fields) as writer:
            writer.add("000123", {"dpm": dpm, "mask": mask, "meta": {"focal": 50.0}})
            writer.fail("000124", "mesh has no skin")
    """

    def __init__(self, column_dir: str | os.PathLike, plan: ShardPlan, format: str,
                 fields: Mapping[str, FieldSpec], overwrite: bool = False):
        self.column_dir = Path(column_dir)
        self.index, self.plan = plan.index, plan
        self.format = _check_format(format)
        self.fields = dict(fields)
        self.overwrite = overwrite
        self.where = f"{self.column_dir} shard {self.index}"
        self.record: ShardRecord | None = None
        self._ids: list[str] = []
        self._failures: list[Failure] = []
        self._seen: set[str] = set()
        self._position = {sample_id: i for i, sample_id in enumerate(plan.ids)}
        self._stack = contextlib.ExitStack()
        self._claim_held = contextlib.ExitStack()
        self._open = False
        self._tar: webdataset.TarWriter | None = None
        self._stream: io.BufferedWriter | None = None
        self._rows: dict[str, list[tuple[int, Any]]] = {}  # zarr: field -> (position, prepared value)
        self._specs = zarr_layout.array_specs(self.fields) if self.format == "zarr" else []

    def __enter__(self) -> ShardWriter:
        # The shard's claim, held until its sidecar is published: a second writer of the same shard (a
        # stray worker of a killed run, another command) is refused here, naming the holder; a writer
        # that dies releases it (`fileio.exclusive_lock`).
        claim = self.column_dir / f"{CLAIM_PREFIX}{shard_name(self.index)}"  # hidden: Zarr and listings skip it
        claim.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as held:
            held.enter_context(exclusive_lock(claim, f"{self.where}: another writer is writing this shard"))
            exists = record_path(self.column_dir, self.index).exists() or shard_files(
                self.column_dir, self.index, self.format)
            if not self.overwrite and exists:
                raise DatasetError(f"{self.where}: shard exists; remove it or write with overwrite=True")
            if self.format == "zarr" and not (self.column_dir / "zarr.json").exists():
                raise DatasetError(f"{self.column_dir}: not a Zarr column (its arrays are created by the driver)")
            self._open_data()
            self._claim_held = held.pop_all()
        self._open = True
        return self

    def _open_data(self) -> None:
        with self._stack:  # closes what was opened if a later step fails
            if self.format == "webdataset":
                tmp = self._stack.enter_context(atomic_output(data_path(self.column_dir, self.index)))
                self._stream = self._stack.enter_context(open(tmp, "wb"))
                # Fixed mtime: the same samples always give the same bytes, hence the same checksum.
                self._tar = webdataset.TarWriter(self._stream, encoder=False, mtime=0.0)
                self._stack.callback(self._tar.close)  # before the file closes, also when discarding
            self._stack = self._stack.pop_all()

    def _claim(self, sample_id: str) -> None:
        check_sample_id(sample_id, self.where)
        if sample_id in self._seen:
            raise DatasetError(f"{self.where}: sample {sample_id!r} added twice")
        if sample_id not in self._position:
            raise DatasetError(f"{self.where}: sample {sample_id!r} is not in this shard's plan")
        self._seen.add(sample_id)

    def add(self, sample_id: str, fields: Mapping[str, FieldValue] | PreparedSample) -> None:
        """Append one sample: a value per field of the column (see `fields.prepare_field`), or the
        `prepare_sample` of them (for this column's fields and format)."""
        if not self._open:
            raise RuntimeError("ShardWriter.add outside its `with` block")
        if not isinstance(fields, PreparedSample):
            fields = prepare_sample(self.fields, self.format, fields, f"{self.where}: sample {sample_id!r}")
        elif fields.format != self.format:
            raise ValueError(f"{self.where}: sample {sample_id!r} was prepared for {fields.format}")
        prepared = fields.values
        self._claim(sample_id)
        if self._tar is not None:
            key = wds_key(sample_id)
            members = {f"{n}.{EXTENSIONS[self.fields[n].kind]}": v for n, v in sorted(prepared.items())}
            self._tar.write({"__key__": key} | members)
        else:
            for name, value in prepared.items():
                self._rows.setdefault(name, []).append((self._position[sample_id], value))
            self._rows.setdefault(VALID, []).append((self._position[sample_id], True))
        self._ids.append(sample_id)

    def fail(self, sample_id: str, reason: str) -> None:
        """Record that `sample_id` could not be produced, and why (stored in the sidecar)."""
        self._claim(sample_id)
        self._failures.append(Failure(sample_id, str(reason)))

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._open = False  # the writer cannot be used after its block
        with self._claim_held:  # released last, after the sidecar (or after discarding everything)
            return self._finish(exc_type, exc, tb)

    def _finish(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._stack.__exit__(exc_type, exc, tb)  # temporaries are removed, nothing published
            return False
        with self._stack:  # any failure below also discards the temporaries
            if self._tar is not None:
                self._tar.close()  # writes the end-of-archive blocks; the file stays open
                self._stream.close()
            else:
                files = zarr_layout.encode_shard(self._specs, self._shard_size(), self._blocks())
            if self.overwrite:
                record_path(self.column_dir, self.index).unlink(missing_ok=True)
            elif shard_files(self.column_dir, self.index, self.format) and self._tar is None:
                raise DatasetError(f"{self.where}: another writer published this shard")
            elif self._tar is not None and data_path(self.column_dir, self.index).exists():
                raise DatasetError(f"{self.where}: another writer published this shard")
        # The tar is in place now (the stack's exit renamed it); Zarr files are published here.
        if self._tar is None:
            self._publish_zarr(files)
        sha256, nbytes = shard_digest(self.column_dir, self.index, self.format)
        self.record = ShardRecord(
            self.index, len(self._ids), tuple(self._ids), tuple(self._failures), sha256, nbytes,
            self.format, SCHEMA_VERSION,
        )
        write_record(self.column_dir, self.record)  # last: the shard is complete now
        return False

    def _shard_size(self) -> int:
        size = zarr_layout.shard_size(self.column_dir)
        if len(self.plan.ids) > size:
            raise DatasetError(
                f"{self.where}: {len(self.plan.ids)} planned samples, the arrays hold {size} per shard")
        return size

    def _blocks(self) -> dict[str, np.ndarray]:
        """(shard_size, ...) rows of every array that holds a value in this shard."""
        size = self._shard_size()
        blocks: dict[str, np.ndarray] = {}
        by_path = {spec.path: spec for spec in self._specs}
        for name, rows in self._rows.items():
            kind = self.fields[name].kind if name != VALID else "valid"
            if kind == "dpm":
                counts, values = f"{name}/counts", f"{name}/values"
                spec = by_path[values]
                most = max(len(v) for _, (_, v) in rows)
                chunk = spec.chunk[0]
                blocks[counts] = np.zeros((size, *by_path[counts].shape), np.uint8)
                blocks[values] = np.zeros((size, -(-max(most, 1) // chunk) * chunk, 6), spec.dtype)
                for position, (c, v) in rows:
                    blocks[counts][position] = c
                    blocks[values][position, : len(v)] = v
                continue
            spec = by_path[name]
            if kind == "json":
                block = np.full(size, "", dtype=object)
            else:
                block = np.full((size, *spec.shape), spec.fill, dtype=spec.dtype)
            for position, value in rows:
                block[position] = value
            blocks[name] = block
        return blocks

    def _publish_zarr(self, files: dict[str, bytes]) -> None:
        # `valid` goes last, after every other field of its rows (and an earlier write's `valid` goes
        # first): a reader of the plain Zarr arrays never sees a row marked present whose fields are not
        # all written, whenever the writer is killed (docs/format.md).
        specs = sorted(self._specs, key=lambda spec: spec.path == VALID)
        valid_path = self.column_dir / VALID / zarr_layout.shard_keys(specs[-1], self.index)
        valid_path.unlink(missing_ok=True)
        for spec in specs:
            path = self.column_dir / spec.path / zarr_layout.shard_keys(spec, self.index)
            if spec.path in files:
                atomic_write_bytes(path, files[spec.path])
            else:  # all fill now: a file from an earlier write of this shard must not survive
                path.unlink(missing_ok=True)


def check_shard(
    column_dir: str | os.PathLike, index: int, format: str, check_checksum: bool = True
) -> tuple[ShardRecord | None, str | None]:
    """(record, None) if shard `index` is complete, else (record or None, what is wrong).

    Complete means: the sidecar exists and parses, its format is `format`, the data exists under its
    final name(s) with the recorded size and (if `check_checksum`) sha256. A malformed sidecar counts as
    an incomplete shard (its message says why). Temporaries of killed writers are ignored.
    """
    try:
        record = read_record(column_dir, index)
    except DatasetError as err:
        return None, str(err)
    where = f"{column_dir} shard {index}"
    if record is None:
        return None, f"{record_path(column_dir, index)}: shard record missing (shard unfinished or removed)"
    if record.format != format:
        return record, f"{record_path(column_dir, index)}: format {record.format!r}, column is {format!r}"
    files = shard_files(column_dir, index, format)
    if not files and (format == "webdataset" or record.bytes):
        return record, f"{where}: shard data missing"
    try:
        if check_checksum:
            sha256, nbytes = shard_digest(column_dir, index, format)
        else:
            sha256, nbytes = record.sha256, sum(p.stat().st_size for _, p in files)
    except (DatasetError, OSError) as err:
        return record, f"{where}: unreadable ({err})"
    if nbytes != record.bytes:
        return record, f"{where}: {nbytes} bytes, record says {record.bytes} (truncated or changed)"
    if sha256 != record.sha256:
        return record, f"{where}: sha256 does not match its record (corrupt or changed)"
    return record, None


def shard_status(
    column_dir: str | os.PathLike, index: int, format: str, check_checksum: bool = True
) -> ShardRecord | None:
    """The record of shard `index` if it is complete and matches its data, else None (redo it)."""
    record, problem = check_shard(column_dir, index, format, check_checksum)
    return record if problem is None else None


def remove_temporaries(column_dir: str | os.PathLike) -> int:
    """Delete the leftovers of killed writers of a column (hidden temporaries anywhere in its folder and
    its sidecar folder, shard claims no live writer holds); returns how many. Only while no writer of the
    column runs."""
    removed = 0
    for claim in Path(column_dir).glob(f"{CLAIM_PREFIX}*"):  # a dead writer's claim: not held, removed
        with contextlib.suppress(LockedError), exclusive_lock(claim, str(claim)):
            removed += 1
    for top in (Path(column_dir), records_dir(column_dir)):
        for folder, dirs, _ in os.walk(top):
            removed += remove_stale_temporaries(folder)
            dirs[:] = [d for d in dirs if not d.startswith(TMP_PREFIX)]
    return removed


def remove_shard(column_dir: str | os.PathLike, index: int, format: str) -> None:
    """Remove shard `index`: the sidecar first (so it reads as unfinished), then the data."""
    record_path(column_dir, index).unlink(missing_ok=True)
    for _, path in shard_files(column_dir, index, format):
        path.unlink(missing_ok=True)


def read_shard(
    out_dir: str | os.PathLike, column: ColumnInfo, index: int, verify: bool = True
) -> Iterator[tuple[str, StoredSample]]:
    """Yield (sample id, fields) of shard `index` of `column` in stored order.

    Fields decode on first access (`fields.StoredSample`). With `verify`, the shard's data must match the
    sha256 of its record in `column.shards` before anything is yielded: a mismatch raises DatasetError
    naming the column, shard and, where a checksummed part of a sample is damaged, the sample. Raises
    DatasetError naming the shard (and member or sample) for unreadable data or unsafe tar members.
    """
    folder = Path(out_dir) / column.name
    if verify:
        _verify(folder, column, index)
    if column.format == "webdataset":
        yield from _read_tar(data_path(folder, index), index, column.fields)
    else:
        yield from _read_zarr(Path(out_dir), column, index)


def _verify(folder: Path, column: ColumnInfo, index: int) -> None:
    record = column.shards.get(index)
    if record is None:
        raise DatasetError(f"{folder} shard {index}: no record in manifest.json (shard unfinished)")
    try:
        sha256, nbytes = shard_digest(folder, index, column.format)
    except OSError as err:
        raise DatasetError(f"{folder} shard {index}: unreadable ({err})") from err
    if (sha256, nbytes) == (record.sha256, record.bytes):
        return
    # Which sample? Decode every field of every sample: zarr's per-chunk crc32c, the npz and PNG CRCs
    # and the shape checks name the first damaged one.
    culprit = ""
    try:
        for _, sample in read_shard(folder.parent, column, index, verify=False):
            for name in sample:
                sample[name]  # noqa: B018 (decoding is the check)
    except DatasetError as err:
        culprit = f"; first damaged sample: {err}"
    raise DatasetError(
        f"{folder} shard {index}: data do not match the sha256 of its record ({nbytes} bytes, record says "
        f"{record.bytes}; corrupt or changed){culprit or '; no sample fails its own checks'}. Nothing of "
        f"this shard was read: rerun the stage that wrote column {column.name!r} (it redoes broken shards)"
    )


def _split_member(member: tarfile.TarInfo, path: Path) -> tuple[str, str, str]:
    name = member.name
    key, _, rest = name.partition(".")
    field, _, ext = rest.rpartition(".")
    unsafe = name.startswith(("/", "\\")) or "/" in name or "\\" in name or ".." in name
    if unsafe or not member.isfile() or not NAME_RE.match(field) or ext not in set(EXTENSIONS.values()):
        raise DatasetError(f"{path}: refusing tar member {name!r} (expected a file '<key>.<field>.<ext>')")
    sample_id = sample_id_from_key(key)
    if wds_key(sample_id) != key:
        raise DatasetError(f"{path}: tar member {name!r}: key {key!r} is not an escaped sample id")
    check_sample_id(sample_id, f"{path}: tar member {name!r}")
    return sample_id, field, ext


def _read_tar(path: Path, index: int, fields: dict[str, FieldSpec]) -> Iterator[tuple[str, StoredSample]]:
    done: set[str] = set()
    current: str | None = None
    raw: dict[str, bytes] = {}
    specs = dict(fields)
    where = f"{path.parent} shard {index}"
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                sample_id, field, ext = _split_member(member, path)
                if sample_id != current:
                    if current is not None:
                        yield current, StoredSample(raw, specs, f"{where} sample {current!r}")
                    if sample_id in done:
                        raise DatasetError(f"{path}: members of sample {sample_id!r} are not adjacent")
                    done.add(sample_id)
                    current, raw = sample_id, {}
                if field in raw:
                    raise DatasetError(f"{path}: tar member {member.name!r} appears twice")
                spec = specs.get(field)
                if spec is None:  # not in the column's specs: `verify` reports it; decode by extension
                    kind = {"npz": "dpm", "png": "image", "json": "json", "npy": "array"}[ext]
                    spec = specs[field] = FieldSpec(kind, required=False)
                elif EXTENSIONS[spec.kind] != ext:
                    raise DatasetError(f"{path}: tar member {member.name!r}: a {spec.kind} field is stored "
                                       f"as .{EXTENSIONS[spec.kind]}")
                raw[field] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DatasetError(f"{path}: unreadable tar shard ({err})") from err
    if current is not None:
        yield current, StoredSample(raw, specs, f"{where} sample {current!r}")


class _DamagedChunk(Exception):
    """A Zarr chunk of `field` that does not decode (crc32c mismatch, broken compression)."""

    def __init__(self, field: str, cause: Exception):
        super().__init__(f"field {field!r} does not decode ({cause})")
        self.cause = cause


def _read_zarr(out: Path, column: ColumnInfo, index: int) -> Iterator[tuple[str, StoredSample]]:
    folder = out / column.name
    try:
        ids, group = zarr_layout.open_column(out, column.name)
        size = group[VALID].chunks[0]
        start = index * size
        valid = group[VALID][start : start + size]
        row_ids = [str(i) for i in ids[start : start + size]]
        specs = zarr_layout.array_specs(column.fields)
        arrays = {spec.path: group[spec.path] for spec in specs}
        # Every array laid out as the plan says (rows, chunks, dtype): edited metadata (a row count, a
        # shard size) would otherwise read the wrong rows or fail deep inside numpy.
        for spec in specs:
            problem = zarr_layout.array_problem(arrays[spec.path], spec, ids.shape[0], size)
            if problem is not None:
                raise DatasetError(f"{folder / spec.path}: {problem} (its Zarr metadata was changed; "
                                   "`dualpm-prep verify` lists every problem)")
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise DatasetError(f"{folder} shard {index}: unreadable Zarr data ({err})") from err
    for block_start in range(0, size, ZARR_READ_ROWS):
        rows = [i for i in range(block_start, min(size, block_start + ZARR_READ_ROWS)) if valid[i]]
        if not rows:
            continue
        where = f"{folder} shard {index}"
        block = _Block(arrays, column.fields, start + rows[0], start + rows[-1] + 1, where)
        for i in rows:
            raw = {name: functools.partial(block.row, name, start + i) for name in column.fields}
            yield row_ids[i], StoredSample(raw, column.fields, f"{where} sample {row_ids[i]!r}")


class _Block:
    """Rows a..b-1 of a Zarr column. Each field is read for all of them with one zarr call per array, when
    a sample first needs it: one call per sample would cost more than decoding small samples (an event-loop
    round trip each), and fields nobody decodes (images, meta while training) are never read."""

    def __init__(self, arrays: dict[str, Any], fields: dict[str, FieldSpec], a: int, b: int, where: str):
        self.arrays, self.fields, self.a, self.b, self.where = arrays, fields, a, b, where
        self.values: dict[str, Any] = {}

    def row(self, name: str, r: int) -> Any:
        """Row r's raw value of field `name` (a copy: a sample never pins its block), or the exception
        that its damaged chunk raised (decoding the field raises it)."""
        if name not in self.values:
            try:
                self.values[name] = self._read(name, self.a, self.b)
            except _DamagedChunk:  # row by row, so only the damaged rows fail
                self.values[name] = [self._read_or_error(name, r) for r in range(self.a, self.b)]
        value = self.values[name]
        if isinstance(value, list):
            value, r = value[r - self.a], 0
            if isinstance(value, Exception):
                return value
        else:
            r -= self.a
        kind = self.fields[name].kind
        if kind == "dpm":
            counts, values, hits = value
            return counts[r].copy(), values[r, : hits[r]].copy()
        return str(value[r]) if kind == "json" else value[r].copy()

    def _read_or_error(self, name: str, r: int) -> Any:
        try:
            return self._read(name, r, r + 1)
        except _DamagedChunk as err:
            return err.cause

    def _read(self, name: str, a: int, b: int) -> Any:
        try:
            if self.fields[name].kind == "dpm":
                counts = self.arrays[f"{name}/counts"][a:b]  # (B, H, W)
                hits = counts.reshape(len(counts), -1).sum(axis=1, dtype=np.int64)  # (B,)
                values = self.arrays[f"{name}/values"]
                chunk = values.chunks[1]
                most = -(-int(hits.max(initial=0)) // chunk) * chunk  # whole chunks: the rest is not stored
                return counts, values[a:b, :most], hits
            return self.arrays[name][a:b]
        except (ValueError, RuntimeError) as err:  # zarr: crc32c mismatch; blosc: undecodable chunk
            raise _DamagedChunk(name, err) from err
        except (OSError, KeyError, TypeError) as err:
            raise DatasetError(f"{self.where}: unreadable Zarr data ({err})") from err
