"""Check a whole store: manifest, shard records, checksums, alignment with the plan, decodability.

`verify_store` returns every problem it finds (empty list: the store is sound); it raises nothing
for a broken store, so `dualpm-prep verify` can print them all.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dualpm.errors import DualPMError
from dualpm.store.fields import ARRAY_LIMIT, StoredSample
from dualpm.store.manifest import (
    MANIFEST_NAME,
    ColumnInfo,
    Manifest,
    ShardPlan,
    column_dir,
    load_manifest,
    record_indices,
)
from dualpm.store.shards import check_shard, read_shard, shard_files
from dualpm.store.zarr_layout import layout_problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store; `column`, `shard` and `sample` are None where not specific."""

    column: str | None
    shard: int | None
    sample: str | None
    message: str

    def __str__(self) -> str:
        where = [f"column {self.column}"] if self.column else []
        where += [f"shard {self.shard}"] if self.shard is not None else []
        where += [f"sample {self.sample}"] if self.sample else []
        return f"{', '.join(where) or 'store'}: {self.message}"


def _check_sample(column: ColumnInfo, fields: StoredSample) -> list[str]:
    """Messages for one sample's fields against the column's field specs (decoding each field), and for
    float values the reader refuses: not finite, or float arrays beyond +-`ARRAY_LIMIT`."""
    messages = [f"required field {name!r} missing" for name, spec in column.fields.items()
                if spec.required and name not in fields]
    for name in fields:
        if name not in column.fields:
            messages.append(f"unexpected field {name!r}")
        try:
            value = fields[name]  # decoding checks the data against the column's spec
        except DualPMError as err:
            messages.append(str(err).removeprefix(f"{fields.where}: "))
            continue
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size:
            top = float(np.abs(value).max())
            if not np.isfinite(top):
                messages.append(f"field {name!r} holds values that are not finite (NaN or inf)")
            elif name in column.fields and column.fields[name].kind == "array" and top > ARRAY_LIMIT:
                messages.append(f"field {name!r} holds values up to {top:.4g}, beyond +-{ARRAY_LIMIT:g} (damaged)")
    return messages


def _metadata_problems(out_dir: str | os.PathLike, manifest: Manifest) -> list[Problem]:
    """manifest.json's own schema block, and the Zarr metadata, against the manifest."""
    problems = []
    path = Path(out_dir) / MANIFEST_NAME
    raw = json.loads(path.read_text(encoding="utf-8"))  # load_manifest read it already
    expected = json.loads(json.dumps(manifest.schema()))
    if not isinstance(raw.get("schema"), dict):
        problems.append(Problem(None, None, None, f"{path}: no schema block ('schema')"))
    elif raw["schema"] != expected:
        keys = sorted(k for k in set(raw["schema"]) | set(expected) if raw["schema"].get(k) != expected.get(k))
        problems.append(Problem(None, None, None, f"{path}: the schema block contradicts the manifest in "
                                f"{', '.join(keys)}"))
    too_long = [p.index for p in manifest.plan if len(p.ids) > manifest.shard_size]
    if too_long:
        problems.append(Problem(None, too_long[0], None, f"{path}: plan shard {too_long[0]} holds more samples "
                                f"than shard_size {manifest.shard_size}"))
    problems += [Problem(column, None, None, message) for column, message in layout_problems(out_dir, manifest)]
    return problems


def _verify_shard(folder: Path, column: ColumnInfo, plan: ShardPlan, deep: bool) -> list[Problem]:
    name, index = column.name, plan.index
    record, problem = check_shard(folder, index, column.format, check_checksum=deep)
    if problem is not None:
        problems = [Problem(name, index, None, problem)]
        if deep and record is not None and record.format == column.format and shard_files(
                folder, index, column.format):  # damaged data: which samples?
            problems += _sample_problems(folder, column, index)[0]
        return problems
    problems = []
    listed = column.shards.get(index)
    if listed is None:
        problems.append(Problem(name, index, None, "manifest.json has no record of this finished shard"))
    elif listed != record:
        problems.append(Problem(name, index, None, "manifest.json's record differs from the shard's sidecar"))
    if record.schema_version != column.schema_version:
        problems.append(Problem(name, index, None, f"schema version {record.schema_version}, column has "
                                f"{column.schema_version}"))
    position = {sample_id: i for i, sample_id in enumerate(plan.ids)}
    for sample_id in record.ids + tuple(f.sample_id for f in record.failures):
        if sample_id not in position:
            problems.append(Problem(name, index, sample_id, "sample is not in this shard's plan"))
    order = [position[i] for i in record.ids if i in position]
    if order != sorted(order):
        problems.append(Problem(name, index, None, "samples are not in plan order"))
    if not deep:
        return problems
    found, stored = _sample_problems(folder, column, index)
    problems += found
    if stored is not None and tuple(stored) != record.ids:
        problems.append(Problem(name, index, None, f"data holds {len(stored)} samples that differ from the "
                                f"record's {record.count}"))
    return problems


def _sample_problems(folder: Path, column: ColumnInfo, index: int) -> tuple[list[Problem], list[str] | None]:
    """(problems of each sample of a shard, decoding every field; the ids read, or None if unreadable)."""
    problems, stored = [], []
    try:
        for sample_id, fields in read_shard(folder.parent, column, index, verify=False):
            stored.append(sample_id)
            problems += [Problem(column.name, index, sample_id, m) for m in _check_sample(column, fields)]
    except DualPMError as err:
        return problems + [Problem(column.name, index, None, str(err))], None
    return problems, stored


def verify_store(
    out_dir: str | os.PathLike, columns: list[str] | None = None, deep: bool = True,
    shard_data: Callable[[str, int], AbstractContextManager[Any]] | None = None,
) -> list[Problem]:
    """Every problem found in the store at `out_dir` (empty when it is complete and sound).

    Checks: manifest.json readable and valid, its schema block and the Zarr metadata (root schema block,
    `ids`, every array's layout) agreeing with it; for each column (all, or `columns`) every planned shard
    finished, its sidecar matching the data (size; sha256 when `deep`) and the manifest, its samples
    a subset of the plan's shard in plan order; and when `deep`, every sample readable, its fields
    decodable (Zarr chunk and zip/PNG checksums included) with the shapes, dtypes and required fields of
    the column's `fields` specs, float values finite and float arrays within +-`ARRAY_LIMIT` (what the
    reader refuses). Sidecars of shards beyond the plan are reported too. `shard_data(column, index)`, if
    given, is entered around the checks of each shard (a remote store stages the shard's data there).
    """
    try:
        manifest = load_manifest(out_dir)
    except DualPMError as err:
        return [Problem(None, None, None, str(err))]
    names = list(manifest.columns) if columns is None else columns
    problems = _metadata_problems(out_dir, manifest)
    for name in names:
        column = manifest.columns.get(name)
        if column is None:
            problems.append(Problem(name, None, None, "column not in manifest.json"))
            continue
        folder = column_dir(out_dir, name)
        for plan in manifest.plan:
            with shard_data(name, plan.index) if shard_data is not None else contextlib.nullcontext():
                problems += _verify_shard(folder, column, plan, deep)
        extra = [i for i in record_indices(folder) if i >= len(manifest.plan)]
        problems += [Problem(name, i, None, "shard record beyond the plan") for i in extra]
    return problems
