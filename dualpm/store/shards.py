"""Column shards: written by exactly one worker, published atomically, then described by a sidecar.

A sample is a sample id plus named fields; a field's name says its kind, in both formats:
`*.json` a dict (stored as JSON), `*.npy` a numpy array (no pickles), anything else raw bytes
(e.g. "dpm" from `encoding.encode_dual_pointmap`, "rgb.png", "mask.png" copied from the source).
`read_shard` gives back the same names and kinds whatever the format.

WebDataset tar, `OUT/<column>/shard-000042.tar` (streaming; the default for render outputs):
members `<id>.<field>` in sample order (a sample's fields adjacent, sorted by name), written with
`webdataset.TarWriter` under a temporary name and renamed. Readers refuse member names that are not
`<valid id>.<valid field>` (absolute, "/", "..").

Zarr v3, `OUT/<column>/shard-000042.zarr/` (dense arrays; the default for features). The column folder
is a Zarr group, each shard a child group written in a temporary folder and renamed::

    zarr.json            attributes {"dualpm": {"schema_version", "ids": [...], "fields": [...]}}
    <name>.npy           array (n, ...) of the per-sample arrays (same shape and dtype in a shard),
                         one chunk per sample, all chunks in one Zarr shard file, zstd
    <name>/data          other fields (bytes, JSON text): uint8 (total bytes,), samples concatenated
    <name>/offsets       int64 (n + 1,): sample i is data[offsets[i]:offsets[i + 1]]

Zarr fields are buffered in memory until the shard closes, so each Zarr shard file is written once,
whole (partial writes to a Zarr shard file are read-modify-write, and lose data with two writers):
size shards to fit in a worker's memory.

Both formats: the data is published first, the sidecar (`manifest.ShardRecord`) last, so a shard is
complete iff its sidecar exists and matches the data; `shard_status` checks that.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import webdataset
import zarr
from zarr.storage import LocalStore

from dualpm.errors import DatasetError
from dualpm.fileio import atomic_directory, atomic_output, atomic_write_json
from dualpm.store.manifest import (
    FIELD_RE,
    FORMATS,
    SCHEMA_VERSION,
    Failure,
    ShardRecord,
    check_sample_id,
    read_record,
    record_path,
    shard_name,
    write_record,
)

FieldValue = bytes | np.ndarray | dict
_SUFFIX = {"webdataset": ".tar", "zarr": ".zarr"}
_BYTES_CHUNK = 1 << 20  # Zarr chunk of concatenated bytes fields
_ZARR_GROUP = {"zarr_format": 3, "node_type": "group", "attributes": {}}


def _check_format(format: str) -> str:
    if format not in FORMATS:
        raise DatasetError(f"unknown shard format {format!r}; expected one of {FORMATS}")
    return format


def data_path(column_dir: str | os.PathLike, index: int, format: str) -> Path:
    """Final path of shard `index`'s data: a `.tar` file or a `.zarr` folder."""
    return Path(column_dir) / f"{shard_name(index)}{_SUFFIX[_check_format(format)]}"


def field_kind(name: str) -> str:
    """The kind of a field from its name's last suffix: "json", "npy", or else "bytes"."""
    return {"json": "json", "npy": "npy"}.get(name.rsplit(".", 1)[-1] if "." in name else "", "bytes")


def data_digest(path: str | os.PathLike) -> tuple[str, int]:
    """(sha256 hex, total bytes) of a shard's data.

    A file: the sha256 of its bytes. A folder: the sha256 over its files in sorted relative-path
    order of (posix path, NUL, 8-byte little-endian size, contents), so renames, moves and edits all
    change it. Symlinks and other non-regular entries raise DatasetError.
    """
    path = Path(path)
    digest, total = hashlib.sha256(), 0
    if path.is_file() and not path.is_symlink():
        return _hash_file(digest, path).hexdigest(), path.stat().st_size
    files = []
    for root, dirs, names in os.walk(path):
        for name in dirs + names:
            entry = Path(root) / name
            if entry.is_symlink() or not (entry.is_dir() or entry.is_file()):
                raise DatasetError(f"{entry}: unexpected link or special file in shard data")
        files += [Path(root) / n for n in names]
    for file in sorted(files, key=lambda f: f.relative_to(path).as_posix()):
        size = file.stat().st_size
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + size.to_bytes(8, "little"))
        _hash_file(digest, file)
        total += size
    return digest.hexdigest(), total


def _hash_file(digest: Any, path: Path) -> Any:
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest


def _folder_size(folder: Path) -> int:
    return sum((Path(root) / n).stat().st_size for root, _, names in os.walk(folder) for n in names)


def _encode_field(name: str, value: Any, where: str) -> bytes | np.ndarray:
    """Check a field's value against its name; JSON fields become UTF-8 bytes, arrays stay arrays."""
    if not isinstance(name, str) or not FIELD_RE.match(name):
        raise ValueError(f"{where}: field name {name!r} is not valid (e.g. 'dpm', 'mask.png', 'meta.json')")
    kind = field_kind(name)
    if kind == "json":
        if not isinstance(value, dict):
            raise TypeError(f"{where}: field {name!r} must be a dict, got {type(value).__name__}")
        try:
            return json.dumps(value, sort_keys=True, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as err:
            raise DatasetError(f"{where}: field {name!r} is not JSON-serialisable ({err})") from err
    if kind == "npy":
        if not isinstance(value, np.ndarray) or value.dtype.hasobject:
            raise TypeError(f"{where}: field {name!r} must be a numpy array of plain dtype")
        return value
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{where}: field {name!r} must be bytes (dicts go in '*.json', arrays in '*.npy')")
    return bytes(value)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ShardWriter:
    """Write shard `shard_index` of the column in `column_dir`; use as a context manager.

    Exactly one worker writes a shard. On a clean exit the data is published atomically under its
    final name, then the sidecar; `record` then holds the `ShardRecord`. If the block raises, nothing
    is published (an existing shard stays as it was). An existing shard (data or sidecar) is an error
    unless `overwrite` is true, in which case its sidecar is removed just before the new data
    replaces it.

        with ShardWriter(out / "render", 42, "webdataset") as writer:
            writer.add("000123", {"dpm": encoded, "mask.png": png, "meta.json": {"focal": 50.0}})
            writer.fail("000124", "mesh has no skin")
    """

    def __init__(self, column_dir: str | os.PathLike, shard_index: int, format: str, overwrite: bool = False):
        self.column_dir = Path(column_dir)
        self.index = shard_index
        self.format = _check_format(format)
        self.overwrite = overwrite
        self.path = data_path(column_dir, shard_index, format)
        self.record: ShardRecord | None = None
        self._ids: list[str] = []
        self._failures: list[Failure] = []
        self._seen: set[str] = set()
        self._stack = contextlib.ExitStack()
        self._tmp: Path | None = None
        self._tar: webdataset.TarWriter | None = None
        self._stream: io.BufferedWriter | None = None
        self._columns: dict[str, list[bytes | np.ndarray]] = {}  # zarr: field -> per-sample values

    def __enter__(self) -> ShardWriter:
        if not self.overwrite and (self.path.exists() or record_path(self.column_dir, self.index).exists()):
            raise DatasetError(f"{self.path}: shard exists; remove it or write with overwrite=True")
        with self._stack:  # closes what was opened if a later step fails
            if self.format == "webdataset":
                self._tmp = self._stack.enter_context(atomic_output(self.path))
                self._stream = self._stack.enter_context(open(self._tmp, "wb"))
                # Fixed mtime: the same samples always give the same bytes, hence the same checksum.
                self._tar = webdataset.TarWriter(self._stream, encoder=False, mtime=0.0)
                self._stack.callback(self._tar.close)  # before the file closes, also when discarding
            else:
                self._tmp = self._stack.enter_context(atomic_directory(self.path, overwrite=self.overwrite))
            self._stack = self._stack.pop_all()
        return self

    def _claim(self, sample_id: str) -> None:
        check_sample_id(sample_id, str(self.path))
        if sample_id in self._seen:
            raise DatasetError(f"{self.path}: sample {sample_id!r} added twice")
        self._seen.add(sample_id)

    def add(self, sample_id: str, fields: Mapping[str, FieldValue]) -> None:
        """Append one sample. Fields: bytes (as-is), dict (name `*.json`), np.ndarray (name `*.npy`)."""
        if self._tmp is None:
            raise RuntimeError("ShardWriter.add outside its `with` block")
        where = f"{self.path}: sample {sample_id!r}"
        if not fields:
            raise ValueError(f"{where}: a sample needs at least one field")
        encoded = {name: _encode_field(name, value, where) for name, value in fields.items()}
        if self.format == "zarr":
            self._check_zarr_fields(encoded, where)
        self._claim(sample_id)
        if self._tar is not None:
            sample = {k: _npy_bytes(v) if isinstance(v, np.ndarray) else v for k, v in encoded.items()}
            self._tar.write({"__key__": sample_id} | sample)
        else:
            for name, value in encoded.items():
                self._columns.setdefault(name, []).append(value)
        self._ids.append(sample_id)

    def _check_zarr_fields(self, encoded: dict[str, bytes | np.ndarray], where: str) -> None:
        if self._columns and set(encoded) != set(self._columns):
            raise DatasetError(
                f"{where}: fields {sorted(encoded)} differ from this shard's {sorted(self._columns)}"
            )
        for name, value in encoded.items():
            first = self._columns[name][0] if self._columns else value
            if isinstance(value, np.ndarray) and (value.shape, value.dtype) != (first.shape, first.dtype):
                raise DatasetError(
                    f"{where}: field {name!r} is {value.dtype}{list(value.shape)}, "
                    f"other samples of the shard are {first.dtype}{list(first.shape)}"
                )

    def fail(self, sample_id: str, reason: str) -> None:
        """Record that `sample_id` could not be produced, and why (stored in the sidecar)."""
        self._claim(sample_id)
        self._failures.append(Failure(sample_id, str(reason)))

    def __exit__(self, exc_type, exc, tb) -> bool:
        tmp, self._tmp = self._tmp, None  # the writer cannot be used after its block
        if exc_type is not None:
            self._stack.__exit__(exc_type, exc, tb)  # temporaries are removed, nothing published
            return False
        with self._stack:  # any failure below also discards the temporaries
            if self._tar is not None:
                self._tar.close()  # writes the end-of-archive blocks; the file stays open
                self._stream.close()
            else:
                _write_zarr_group(tmp, self._ids, self._columns)
                if not (self.column_dir / "zarr.json").exists():
                    atomic_write_json(self.column_dir / "zarr.json", _ZARR_GROUP)
            sha256, nbytes = data_digest(tmp)
            if self.overwrite:
                record_path(self.column_dir, self.index).unlink(missing_ok=True)
            elif self.path.exists():
                raise DatasetError(f"{self.path}: another writer published this shard")
        # The data is in place now (the stack's exit renamed it); the sidecar goes last.
        self.record = ShardRecord(
            self.index, len(self._ids), tuple(self._ids), tuple(self._failures), sha256, nbytes,
            self.format, SCHEMA_VERSION,
        )
        write_record(self.column_dir, self.record)
        return False


def _write_zarr_group(folder: Path, ids: list[str], columns: dict[str, list[bytes | np.ndarray]]) -> None:
    root = zarr.open_group(store=LocalStore(folder), mode="w", zarr_format=3)
    root.attrs["dualpm"] = {"schema_version": SCHEMA_VERSION, "ids": ids, "fields": sorted(columns)}
    n = len(ids)
    for name, values in columns.items():
        if field_kind(name) == "npy":
            chunk = (1,) + tuple(max(1, s) for s in values[0].shape)  # one chunk per sample
            array = root.create_array(
                name, shape=(n, *values[0].shape), dtype=values[0].dtype, chunks=chunk, shards=(n, *chunk[1:])
            )
            array[...] = np.stack(values)
            continue
        group = root.create_group(name)
        offsets = np.zeros(n + 1, np.int64)
        offsets[1:] = np.cumsum([len(v) for v in values])
        total = int(offsets[-1])
        chunk = max(1, min(total, _BYTES_CHUNK))
        # Binary fields are already compressed (dpm, png); JSON text compresses well.
        compressors = "auto" if field_kind(name) == "json" else None
        shard = max(1, -(-total // chunk)) * chunk  # whole chunks covering all the bytes
        data = group.create_array(
            "data", shape=(total,), dtype="uint8", chunks=(chunk,), shards=(shard,), compressors=compressors
        )
        if total:
            data[...] = np.frombuffer(b"".join(values), np.uint8)
        group.create_array("offsets", data=offsets)


def check_shard(
    column_dir: str | os.PathLike, index: int, format: str, check_checksum: bool = True
) -> tuple[ShardRecord | None, str | None]:
    """(record, None) if shard `index` is complete, else (record or None, what is wrong).

    Complete means: the sidecar exists and parses, its format is `format`, the data exists under
    its final name with the recorded size and (if `check_checksum`) sha256. A malformed sidecar
    counts as an incomplete shard (its message says why). Temporaries of killed writers are ignored.
    """
    try:
        record = read_record(column_dir, index)
    except DatasetError as err:
        return None, str(err)
    path = data_path(column_dir, index, format)
    if record is None:
        return None, f"{record_path(column_dir, index)}: shard record missing (shard unfinished or removed)"
    if record.format != format:
        return record, f"{record_path(column_dir, index)}: format {record.format!r}, column is {format!r}"
    if not (path.is_file() if format == "webdataset" else path.is_dir()) or path.is_symlink():
        return record, f"{path}: shard data missing"
    try:
        if check_checksum:
            sha256, nbytes = data_digest(path)
        else:
            sha256 = record.sha256
            nbytes = path.stat().st_size if path.is_file() else _folder_size(path)
    except (DatasetError, OSError) as err:
        return record, f"{path}: unreadable ({err})"
    if nbytes != record.bytes:
        return record, f"{path}: {nbytes} bytes, record says {record.bytes} (truncated or changed)"
    if sha256 != record.sha256:
        return record, f"{path}: sha256 does not match its record (corrupt or changed)"
    return record, None


def shard_status(
    column_dir: str | os.PathLike, index: int, format: str, check_checksum: bool = True
) -> ShardRecord | None:
    """The record of shard `index` if it is complete and matches its data, else None (redo it)."""
    record, problem = check_shard(column_dir, index, format, check_checksum)
    return record if problem is None else None


def remove_shard(column_dir: str | os.PathLike, index: int, format: str) -> None:
    """Remove shard `index`: the sidecar first (so it reads as unfinished), then the data."""
    record_path(column_dir, index).unlink(missing_ok=True)
    path = data_path(column_dir, index, format)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _decode_field(name: str, data: bytes, where: str) -> Any:
    kind = field_kind(name)
    try:
        if kind == "json":
            value = json.loads(data.decode("utf-8"))
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            return value
        if kind == "npy":
            return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, UnicodeDecodeError, EOFError, OSError) as err:
        raise DatasetError(f"{where}: field {name!r} does not decode ({err})") from err
    return data


def read_shard(
    column_dir: str | os.PathLike, index: int, format: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (sample id, fields) of shard `index` in stored order.

    `*.json` fields come back as dicts, `*.npy` as numpy arrays, others as bytes. Raises
    DatasetError naming the shard (and member or sample) for unreadable data or unsafe tar members.
    This reads the data only: check completeness with `shard_status` first.
    """
    path = data_path(column_dir, index, format)
    if format == "webdataset":
        yield from _read_tar(path)
    else:
        yield from _read_zarr(path)


def _split_member(member: tarfile.TarInfo, path: Path) -> tuple[str, str]:
    name = member.name
    sample_id, _, field = name.partition(".")
    unsafe = name.startswith(("/", "\\")) or "/" in name or "\\" in name or ".." in name
    if unsafe or not member.isfile() or not FIELD_RE.match(field):
        raise DatasetError(f"{path}: refusing tar member {name!r} (expected a file named '<id>.<field>')")
    check_sample_id(sample_id, f"{path}: tar member {name!r}")
    return sample_id, field


def _read_tar(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    done: set[str] = set()
    current: str | None = None
    fields: dict[str, Any] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                sample_id, field = _split_member(member, path)
                if sample_id != current:
                    if current is not None:
                        yield current, fields
                    if sample_id in done:
                        raise DatasetError(f"{path}: members of sample {sample_id!r} are not adjacent")
                    done.add(sample_id)
                    current, fields = sample_id, {}
                if field in fields:
                    raise DatasetError(f"{path}: tar member {member.name!r} appears twice")
                fields[field] = _decode_field(field, tar.extractfile(member).read(), f"{path}: {member.name}")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DatasetError(f"{path}: unreadable tar shard ({err})") from err
    if current is not None:
        yield current, fields


# Samples read per zarr call when streaming a Zarr shard (see `_read_zarr`).
ZARR_READ_ROWS = 32


def _read_zarr(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        root = zarr.open_group(store=LocalStore(path, read_only=True), mode="r")
        info = root.attrs.get("dualpm")
        if not isinstance(info, dict) or info.get("schema_version") != SCHEMA_VERSION:
            raise DatasetError(f"{path}: not a dualpm shard of schema version {SCHEMA_VERSION}")
        ids, names = info.get("ids"), info.get("fields")
        if not isinstance(ids, list):
            raise DatasetError(f"{path}: malformed id list {ids!r:.80}")
        ids = [check_sample_id(i, str(path)) for i in ids]
        if not isinstance(names, list) or not all(isinstance(f, str) and FIELD_RE.match(f) for f in names):
            raise DatasetError(f"{path}: malformed field list {names!r:.80}")
        arrays, blobs = {}, {}
        for name in names:
            if field_kind(name) == "npy":
                arrays[name] = root[name]
                if arrays[name].shape[:1] != (len(ids),):
                    raise DatasetError(f"{path}: array {name!r} does not hold {len(ids)} samples")
                continue
            offsets = root[name]["offsets"][...]
            data = root[name]["data"][...].tobytes()
            ok = offsets.shape == (len(ids) + 1,) and offsets[0] == 0 and offsets[-1] == len(data)
            if not ok or np.any(np.diff(offsets) < 0):
                raise DatasetError(f"{path}: field {name!r} has malformed offsets")
            blobs[name] = (offsets, data)
        block: dict[str, np.ndarray] = {}
        for i, sample_id in enumerate(ids):
            if i % ZARR_READ_ROWS == 0:
                # One zarr call per block of rows, not per sample: each call has a fixed cost (an event-loop
                # round trip) that dominated reading small samples. Memory stays bounded by the block.
                block = {name: array[i : i + ZARR_READ_ROWS] for name, array in arrays.items()}
            # copy: a view would keep its whole block alive in the shuffle buffer
            fields: dict[str, Any] = {name: rows[i % ZARR_READ_ROWS].copy() for name, rows in block.items()}
            for name, (offsets, data) in blobs.items():
                value = data[offsets[i] : offsets[i + 1]]
                fields[name] = _decode_field(name, value, f"{path}: sample {sample_id!r}")
            yield sample_id, fields
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise DatasetError(f"{path}: unreadable Zarr shard ({err})") from err
