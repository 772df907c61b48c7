"""The store's manifest, shard plan, shard records (sidecars) and failure log.

```
OUT/manifest.json                Manifest: schema and tool versions, source, shard size, the shard plan
                                 (split and sample ids of every shard) and the columns (format, producing
                                 config, expected fields, records of finished shards)
OUT/failures.jsonl               one JSON object per failed sample: column, shard, id, reason
OUT/<column>/shard-000042.tar    the data of shard 42 (WebDataset tar, or a .zarr folder; see shards.py)
OUT/<column>/shard-000042.json   its ShardRecord ("sidecar"), published after the data
```
Shard k of every column holds samples of plan shard k, in plan order (a column may lack samples that
failed). Each shard is written by one worker, which publishes its sidecar last; the driver may be
killed before it copies the records into manifest.json, so the sidecars on disk are the truth and
`read_records` rebuilds a column's records from them.

One `SCHEMA_VERSION` covers the layout of the manifest, the sidecars and the shard containers
(docs/format.md); readers refuse other versions with a message saying what to do (older stores: render
again into a new folder).

Sample ids are file stems: letters and digits of any script (with combining accents), '.', '_' and '-',
starting with a letter or digit, at most 128 characters; never '/', '\\', whitespace or control
characters (so never '.' or '..'). Column, split and field names are plainer (`NAME_RE`): they are folder
and Zarr node names.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dualpm import __version__
from dualpm.errors import ConfigError, DatasetError
from dualpm.fileio import TMP_PREFIX, atomic_write_json, atomic_write_text
from dualpm.store.schema import SCHEMA_VERSION, schema_block

FORMATS = ("webdataset", "zarr")
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
RECORDS_NAME = "records"  # OUT/records/<column>/: the sidecars (not a column name)
# Combining accents (Unicode blocks of combining marks): file names from macOS come decomposed (NFD).
_MARKS = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
SAMPLE_ID_RE = re.compile(rf"^[^\W_][\w.{_MARKS}-]{{0,127}}\Z")  # \w: letters and digits of any script, '_'
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\Z")  # column, split and field names
_RECORD_RE = re.compile(r"^shard-(\d{6,})\.json$")
SAMPLE_ID_RULE = (
    "letters and digits of any script, '.', '_' and '-', starting with a letter or digit, at most 128 "
    "characters; no '/', '\\', spaces or control characters"
)


def check_sample_id(sample_id: object, where: str) -> str:
    """Return `sample_id` if it is a valid id string, else raise DatasetError naming `where`."""
    if not isinstance(sample_id, str) or not SAMPLE_ID_RE.match(sample_id):
        raise DatasetError(f"{where}: sample id {sample_id!r} is not valid ({SAMPLE_ID_RULE})")
    return sample_id


def check_name(name: object, what: str, where: str) -> str:
    """Return `name` if it is a valid column, split or field name, else raise DatasetError."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name == RECORDS_NAME:
        raise DatasetError(f"{where}: {what} name {name!r} is not valid (letters, digits, '_' and '-')")
    return name


def shard_name(index: int) -> str:
    """Stem of shard `index`'s files, e.g. `shard-000042`."""
    return f"shard-{index:06d}"


@dataclass(frozen=True)
class Failure:
    """One sample that could not be produced, and why."""

    sample_id: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.sample_id, "reason": self.reason}


@dataclass(frozen=True)
class ShardPlan:
    """Shard `index` holds these samples of one split, in this order, in every column."""

    index: int
    split: str
    ids: tuple[str, ...]


@dataclass(frozen=True)
class ShardRecord:
    """What a finished shard holds; written as its sidecar and copied into the manifest.

    `sha256` and `bytes` cover the data: the tar file's bytes, or for a Zarr folder a hash over its
    sorted relative paths and file contents (see `shards.data_digest`).
    """

    index: int
    count: int
    ids: tuple[str, ...]
    failures: tuple[Failure, ...]
    sha256: str
    bytes: int
    format: str
    schema_version: int

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "count": self.count,
            "ids": list(self.ids),
            "failures": [f.to_json() for f in self.failures],
            "sha256": self.sha256,
            "bytes": self.bytes,
            "format": self.format,
            "schema_version": self.schema_version,
        }


FIELD_KINDS = ("dpm", "mask", "image", "json", "array")


@dataclass(frozen=True)
class FieldSpec:
    """A field of every sample of a column: what it holds and how it is stored (docs/format.md).

    kind: "dpm" (dual point map, (H, W, L, 7), stored sparse), "mask" (0/1 object mask, (h, w)),
        "image" (RGB, (h, w, 3) uint8), "json" (a dict), "array" (any fixed-shape numeric array).
    shape: the decoded per-sample shape; dtype: the stored numpy dtype name (dpm: of its values; mask,
        image: uint8). Zarr columns need both (one typed array per field); None means any.
    required: every stored sample has it. about: what the numbers mean (channels, units, conventions,
        precision), copied into the schema block of manifest.json and the Zarr attributes.
    """

    kind: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    required: bool = True
    about: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        shape = None if self.shape is None else list(self.shape)
        return {"kind": self.kind, "required": self.required, "shape": shape, "dtype": self.dtype,
                "about": self.about}


@dataclass(frozen=True)
class ColumnInfo:
    """One column of the store: how it is stored, what produced it, what its samples hold.

    `shards` maps shard index to the record of each finished shard; it is the one mutable part
    (the driver fills it in as shards finish).
    """

    name: str
    format: str
    schema_version: int
    config: dict[str, Any]
    fields: dict[str, FieldSpec] = field(default_factory=dict)
    shards: dict[int, ShardRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": self.format,
            "schema_version": self.schema_version,
            "config": self.config,
            "fields": {k: v.to_json() for k, v in self.fields.items()},
            "shards": {str(k): self.shards[k].to_json() for k in sorted(self.shards)},
        }


@dataclass(frozen=True)
class Manifest:
    """The store's table of contents (`OUT/manifest.json`). `columns` is mutable: stages add theirs."""

    schema_version: int
    tool_version: str
    source: str
    shard_size: int
    plan: tuple[ShardPlan, ...]
    columns: dict[str, ColumnInfo] = field(default_factory=dict)
    split_rule: dict[str, Any] | None = None  # how the source's ids were split (`SourceDataset.split_info`)

    @classmethod
    def create(cls, source: str, shard_size: int, plan: tuple[ShardPlan, ...],
               split_rule: dict[str, Any] | None = None) -> Manifest:
        """A new manifest of this tool's schema and version, with no columns yet."""
        return cls(SCHEMA_VERSION, __version__, source, shard_size, plan, split_rule=split_rule)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "tool_version": self.tool_version,
            "source": self.source,
            "shard_size": self.shard_size,
            "plan": [{"index": p.index, "split": p.split, "ids": list(p.ids)} for p in self.plan],
            "columns": {k: v.to_json() for k, v in self.columns.items()},
            "schema": self.schema(),
        } | ({} if self.split_rule is None else {"split_rule": self.split_rule})

    def schema(self) -> dict[str, Any]:
        """The schema block (what every stored field means and where it is): `schema.schema_block`.

        Written into manifest.json and the Zarr root attributes; derived, so never read back."""
        splits: dict[str, list[int]] = {}
        for p in self.plan:
            splits.setdefault(p.split, [p.index, p.index + 1])[1] = p.index + 1
        return schema_block(self.shard_size, len(self.plan), splits,
                            {name: (c.format, c.fields) for name, c in self.columns.items()})


def plan_shards(splits: dict[str, list[str]], shard_size: int) -> tuple[ShardPlan, ...]:
    """Cut each split's ids, in the given order, into shards of at most `shard_size` ids.

    Splits are taken in the dict's order; shard indices run 0, 1, ... across all splits; a shard
    never mixes splits. The same input always gives the same plan. Raises DatasetError on invalid
    or repeated ids or split names, ConfigError on a bad shard size.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ConfigError(f"shard_size must be a positive integer, got {shard_size!r}")
    plan: list[ShardPlan] = []
    seen: set[str] = set()
    for split, ids in splits.items():
        check_name(split, "split", "shard plan")
        for sample_id in ids:
            check_sample_id(sample_id, f"split {split!r}")
            if sample_id in seen:
                raise DatasetError(f"split {split!r}: sample id {sample_id!r} appears more than once")
            seen.add(sample_id)
        for start in range(0, len(ids), shard_size):
            plan.append(ShardPlan(len(plan), split, tuple(ids[start : start + shard_size])))
    return tuple(plan)


# --- JSON parsing with messages that name the file and the field -----------------------------------


def _get(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object")
    if key not in obj:
        raise DatasetError(f"{where}: missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise DatasetError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, got {value!r:.80}")
    return value


def _check_version(version: int, where: str) -> int:
    if 1 <= version < SCHEMA_VERSION:
        raise DatasetError(
            f"{where}: written by an older dualpm (store schema version {version}; this one reads version "
            f"{SCHEMA_VERSION}: typed Zarr arrays, standard WebDataset fields, docs/format.md). Prepare the "
            "data again into a new folder: `dualpm-prep render SRC NEW_OUT` then `dualpm-prep features SRC "
            "NEW_OUT` (or `dualpm-demo` for the demo data)"
        )
    if version > SCHEMA_VERSION:
        raise DatasetError(
            f"{where}: schema version {version} is newer than this dualpm supports ({SCHEMA_VERSION});"
            " upgrade dualpm"
        )
    if version < 1:
        raise DatasetError(f"{where}: unknown schema version {version}")
    return version


def _ids(values: Any, where: str) -> tuple[str, ...]:
    if not isinstance(values, list):
        raise DatasetError(f"{where}: expected a list of sample ids")
    ids = tuple(check_sample_id(v, f"{where}[{i}]") for i, v in enumerate(values))
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{where}: repeated sample ids")
    return ids


def record_from_json(obj: Any, where: str) -> ShardRecord:
    """Parse and validate a shard record; `where` names the file (and field) in error messages."""
    ids = _ids(_get(obj, "ids", list, where), f"{where}.ids")
    failures = []
    for i, f in enumerate(_get(obj, "failures", list, where)):
        fw = f"{where}.failures[{i}]"
        failures.append(Failure(check_sample_id(_get(f, "id", str, fw), fw), _get(f, "reason", str, fw)))
    record = ShardRecord(
        index=_get(obj, "index", int, where),
        count=_get(obj, "count", int, where),
        ids=ids,
        failures=tuple(failures),
        sha256=_get(obj, "sha256", str, where),
        bytes=_get(obj, "bytes", int, where),
        format=_get(obj, "format", str, where),
        schema_version=_check_version(_get(obj, "schema_version", int, where), where),
    )
    if record.index < 0 or record.bytes < 0:
        raise DatasetError(f"{where}: index and bytes must not be negative")
    if record.count != len(ids):
        raise DatasetError(f"{where}: count {record.count} but {len(ids)} ids")
    if record.format not in FORMATS:
        raise DatasetError(f"{where}.format: {record.format!r} is not one of {FORMATS}")
    if not re.fullmatch(r"[0-9a-f]{64}", record.sha256):
        raise DatasetError(f"{where}.sha256: not a sha256 hex digest")
    if set(ids) & {f.sample_id for f in failures}:
        raise DatasetError(f"{where}: a sample is listed both as stored and as failed")
    return record


def _column_from_json(obj: Any, where: str) -> ColumnInfo:
    fields = {}
    for name, spec in _get(obj, "fields", dict, where).items():
        fw = f"{where}.fields.{name}"
        check_name(name, "field", fw)
        shape = _get(spec, "shape", (list, type(None)), fw)
        if shape is not None and not all(type(s) is int and s >= 0 for s in shape):
            raise DatasetError(f"{fw}.shape: expected a list of non-negative integers")
        kind = _get(spec, "kind", str, fw)
        if kind not in FIELD_KINDS:
            raise DatasetError(f"{fw}.kind: {kind!r} is not one of {FIELD_KINDS}")
        fields[name] = FieldSpec(
            kind=kind,
            shape=None if shape is None else tuple(shape),
            dtype=_get(spec, "dtype", (str, type(None)), fw),
            required=_get(spec, "required", bool, fw),
            about=_get(spec, "about", dict, fw),
        )
    shards = {}
    for key, rec in _get(obj, "shards", dict, where).items():
        record = record_from_json(rec, f"{where}.shards.{key}")
        if key != str(record.index):
            raise DatasetError(f"{where}.shards.{key}: holds the record of shard {record.index}")
        shards[record.index] = record
    column = ColumnInfo(
        name=_get(obj, "name", str, where),
        format=_get(obj, "format", str, where),
        schema_version=_check_version(_get(obj, "schema_version", int, where), where),
        config=_get(obj, "config", dict, where),
        fields=fields,
        shards=shards,
    )
    if column.format not in FORMATS:
        raise DatasetError(f"{where}.format: {column.format!r} is not one of {FORMATS}")
    return column


def manifest_from_json(obj: Any, where: str) -> Manifest:
    """Parse and validate a manifest; `where` names the file in error messages."""
    version = _check_version(_get(obj, "schema_version", int, where), where)
    plan = []
    for i, p in enumerate(_get(obj, "plan", list, where)):
        pw = f"{where}: plan[{i}]"
        ids = _ids(_get(p, "ids", list, pw), f"{pw}.ids")
        shard = ShardPlan(_get(p, "index", int, pw), _get(p, "split", str, pw), ids)
        if shard.index != i:
            raise DatasetError(f"{pw}.index: expected {i} (indices are contiguous from 0), got {shard.index}")
        plan.append(shard)
    all_ids = [i for p in plan for i in p.ids]
    if len(set(all_ids)) != len(all_ids):
        raise DatasetError(f"{where}: plan: a sample id appears in more than one shard")
    columns = {}
    for name, col in _get(obj, "columns", dict, where).items():
        check_name(name, "column", where)
        column = _column_from_json(col, f"{where}: columns.{name}")
        if column.name != name:
            raise DatasetError(f"{where}: columns.{name}.name is {column.name!r}")
        if any(k >= len(plan) for k in column.shards):
            raise DatasetError(f"{where}: columns.{name} has records of shards that are not in the plan")
        columns[name] = column
    split_rule = _get(obj, "split_rule", dict, where) if "split_rule" in obj else None  # optional
    shard_size = _get(obj, "shard_size", int, where)
    if shard_size < 1:
        raise DatasetError(f"{where}.shard_size: must be positive, got {shard_size}")
    return Manifest(
        schema_version=version,
        tool_version=_get(obj, "tool_version", str, where),
        source=_get(obj, "source", str, where),
        shard_size=shard_size,
        plan=tuple(plan),
        columns=columns,
        split_rule=split_rule,
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: not found") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not readable JSON ({err})") from err


def load_manifest(out_dir: str | os.PathLike) -> Manifest:
    """Read and validate `out_dir/manifest.json` (DatasetError naming the file and field if bad)."""
    path = Path(out_dir) / MANIFEST_NAME
    return manifest_from_json(_read_json(path), str(path))


def save_manifest(out_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Write `out_dir/manifest.json` atomically."""
    atomic_write_json(Path(out_dir) / MANIFEST_NAME, manifest.to_json())


def column_dir(out_dir: str | os.PathLike, name: str) -> Path:
    """Folder of column `name` (names are plain: no dots or slashes)."""
    return Path(out_dir) / check_name(name, "column", str(out_dir))


def records_dir(column_dir: str | os.PathLike) -> Path:
    """Folder of the sidecars of the column in `column_dir`: OUT/records/<column>/ (outside the Zarr
    hierarchy, so zarr never meets files it does not know)."""
    folder = Path(column_dir)
    return folder.parent / RECORDS_NAME / folder.name


def record_path(column_dir: str | os.PathLike, index: int) -> Path:
    """Path of shard `index`'s sidecar for the column in `column_dir`."""
    return records_dir(column_dir) / f"{shard_name(index)}.json"


def write_record(column_dir: str | os.PathLike, record: ShardRecord) -> None:
    """Publish a shard's sidecar atomically (after its data)."""
    atomic_write_json(record_path(column_dir, record.index), record.to_json())


def read_record(column_dir: str | os.PathLike, index: int) -> ShardRecord | None:
    """Shard `index`'s sidecar, or None if it does not exist. DatasetError if it is malformed."""
    path = record_path(column_dir, index)
    if not path.exists():
        return None
    record = record_from_json(_read_json(path), str(path))
    if record.index != index:
        raise DatasetError(f"{path}: holds the record of shard {record.index}")
    return record


def record_indices(column_dir: str | os.PathLike) -> list[int]:
    """Sorted indices of the sidecars of the column in `column_dir`, from their names (temporaries are
    ignored)."""
    folder = records_dir(column_dir)
    if not folder.is_dir():
        return []
    names = (p.name for p in folder.iterdir() if not p.name.startswith(TMP_PREFIX))
    return sorted(int(m.group(1)) for name in names if (m := _RECORD_RE.match(name)))


def read_records(column_dir: str | os.PathLike) -> dict[int, ShardRecord]:
    """All sidecars of the column in `column_dir` by shard index: the truth when manifest.json is out of date.

    This does not check the data against the records: `shards.shard_status` does.
    """
    records = {i: read_record(column_dir, i) for i in record_indices(column_dir)}
    return {i: record for i, record in records.items() if record is not None}


def write_failures(out_dir: str | os.PathLike, manifest: Manifest) -> int:
    """Write `out_dir/failures.jsonl` from the records in `manifest`; returns the number of lines.

    Each line: {"column", "shard", "id", "reason"}, by column, then shard, then stored order.
    """
    lines = [
        json.dumps({"column": name, "shard": index, "id": f.sample_id, "reason": f.reason}, sort_keys=True)
        for name, column in manifest.columns.items()
        for index in sorted(column.shards)
        for f in column.shards[index].failures
    ]
    atomic_write_text(Path(out_dir) / FAILURES_NAME, "".join(line + "\n" for line in lines))
    return len(lines)
