"""The Zarr side of a store: one Zarr v3 hierarchy rooted at OUT, typed arrays, shards = plan shards.

```
OUT/zarr.json                 root group: attrs["dualpm"] = the schema block; consolidated metadata
OUT/ids                       (N,) string: the sample id planned for row r ('' for padding)
OUT/<column>/zarr.json        column group (Zarr columns only): attrs["dualpm"] = its part of the schema
OUT/<column>/valid            (N,) bool: row r holds a stored sample of this column
OUT/<column>/<field...>       one typed array per field (two for a dual point map), see `array_specs`
```
N = plan shards x shard_size; row r = shard * shard_size + position in the plan shard. Per-sample arrays
are chunked by up to 16 samples (`ArraySpec.chunk_rows`; blosc-zstd, then a crc32c that zarr checks on
every read, so damaged bytes are caught chunk by chunk) inside one Zarr shard file per plan shard, key
`c/<shard>/0/...`: plan shard k of a column is the files `<array>/c/k...` (`shard_keys`), written by
exactly one worker.

Only the driver writes metadata (`publish_layout`: arrays are created once with their final shape, so
adding shards never changes it; it also rewrites the consolidated metadata). A shard writer encodes its
rows into an in-memory array of one shard with the same codecs and publishes each resulting Zarr shard
file under its final key atomically (`encode_shard`), so a worker never reads or rewrites another's
files, and a killed one leaves at most a hidden temporary.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec, ZstdCodec
from zarr.storage import LocalStore, MemoryStore

from dualpm.store.manifest import FieldSpec, Manifest
from dualpm.store.schema import IDS, VALID

ATTRS = "dualpm"
HIT_CHUNK = 4096  # dual point map values per chunk: a sample's hits span a few chunks, the rest is not stored
# Rows (samples) per chunk: up to CHUNK_ROWS, dividing the shard size, and about CHUNK_BYTES uncompressed.
# zarr-python spends ~0.4 ms on every chunk it reads, more than decoding a small sample takes: chunks of
# one sample made the reader 2x slower on the demo data (docs/benchmarks.md). Large samples (features,
# images at full size) still get a chunk each.
CHUNK_ROWS, CHUNK_BYTES = 16, 1 << 18


@dataclass(frozen=True)
class ArraySpec:
    """One Zarr array of a column: per-row shape, inner chunk (per row), dtype and codecs."""

    path: str  # relative to the column group, e.g. "dpm/values"
    shape: tuple[int, ...]  # per row
    chunk: tuple[int, ...]  # per row
    dtype: Any
    fill: Any
    shuffle: str = "shuffle"  # blosc shuffle ("shuffle", "bitshuffle") or "zstd" for plain zstd
    transpose: tuple[int, ...] | None = None  # storage order of the (1, *chunk) chunk before compression
    per_row_chunks: bool = True  # False: one chunk per plan shard (small per-row scalars)
    dims: tuple[str, ...] = ()  # names of the per-row dimensions (Zarr v3 dimension_names, for xarray)

    def chunk_rows(self, shard_size: int) -> int:
        """Rows per chunk: the most, up to CHUNK_ROWS, that divide `shard_size` and fit CHUNK_BYTES."""
        itemsize = 1024 if self.dtype == "str" else np.dtype(self.dtype).itemsize  # JSON text: ~1 kB
        row_bytes = int(np.prod(self.chunk, dtype=np.int64)) * itemsize
        fits = [d for d in range(1, CHUNK_ROWS + 1) if shard_size % d == 0 and d * row_bytes <= CHUNK_BYTES]
        return max(fits, default=1)

    def codecs(self) -> dict[str, Any]:
        compressor = ZstdCodec(level=3) if self.shuffle == "zstd" else BloscCodec(
            cname="zstd", clevel=5, shuffle=self.shuffle)
        filters = [TransposeCodec(order=self.transpose)] if self.transpose else None
        return {"filters": filters, "compressors": [compressor, Crc32cCodec()], "fill_value": self.fill}

    def create(self, group: zarr.Group, rows: int, shard_size: int, overwrite: bool = False) -> zarr.Array:
        """The array in `group` with `rows` rows, one Zarr shard per `shard_size` rows."""
        if self.per_row_chunks:
            rows_per_chunk = self.chunk_rows(shard_size)
            layout = {"chunks": (rows_per_chunk, *self.chunk), "shards": (shard_size, *self.shape)}
        else:
            layout = {"chunks": (shard_size, *self.chunk)}
        return group.create_array(self.path, shape=(rows, *self.shape), dtype=self.dtype, overwrite=overwrite,
                                  dimension_names=("sample", *self.dims), **layout, **self.codecs())


def dpm_capacity(shape: Sequence[int]) -> tuple[int, int]:
    """(value rows per sample, values per chunk) of a dual point map of `shape` (H, W, L, 7)."""
    most = shape[0] * shape[1] * shape[2]  # at most one hit per pixel and layer
    chunk = min(HIT_CHUNK, most)
    return -(-most // chunk) * chunk, chunk


def array_specs(fields: dict[str, FieldSpec]) -> list[ArraySpec]:
    """The arrays of a Zarr column with `fields` (each spec needs shape and dtype), `valid` first."""
    specs = [ArraySpec(VALID, (), (), "bool", False, "zstd", per_row_chunks=False)]
    for name, spec in fields.items():
        if spec.kind == "json":
            specs.append(ArraySpec(name, (), (), "str", "", "zstd"))
            continue
        if spec.shape is None or (spec.kind in ("dpm", "array") and spec.dtype is None):
            raise ValueError(f"field {name!r}: a Zarr column needs its shape and dtype")
        if spec.kind == "dpm":
            h, w = spec.shape[:2]
            capacity, chunk = dpm_capacity(spec.shape)
            specs.append(ArraySpec(f"{name}/counts", (h, w), (h, w), "uint8", 0, "bitshuffle", dims=("row", "col")))
            # Stored channel-planar (6, chunk) per chunk: each coordinate's bytes compress together.
            specs.append(ArraySpec(f"{name}/values", (capacity, 6), (chunk, 6), spec.dtype, 0, "shuffle",
                                   (0, 2, 1), dims=("hit", "channel")))
        elif spec.kind in ("mask", "image"):
            dims = ("image_row", "image_col", "color")[: len(spec.shape)]
            specs.append(ArraySpec(name, spec.shape, spec.shape, "uint8", 0, "bitshuffle", dims=dims))
        else:
            dims = ("channel", "grid_row", "grid_col") if len(spec.shape) == 3 else tuple(
                f"{name}_{axis}" for axis in range(len(spec.shape)))
            specs.append(ArraySpec(name, spec.shape, spec.shape, spec.dtype, 0, "shuffle", dims=dims))
    return specs


def shard_keys(spec: ArraySpec, index: int) -> str:
    """Key (relative to the array) of the Zarr shard file of plan shard `index`."""
    return "/".join(["c", str(index)] + ["0"] * len(spec.shape))


def _open_root(out_dir: Path, mode: str) -> zarr.Group:
    # Writers see the hierarchy as it is on disk, not as the consolidated metadata last described it.
    return zarr.open_group(store=LocalStore(out_dir, read_only=mode == "r"), mode=mode, zarr_format=3,
                           use_consolidated=None if mode == "r" else False)


def _same_layout(array: Any, spec: ArraySpec, rows: int, shard_size: int) -> bool:
    return array_problem(array, spec, rows, shard_size) is None


def array_problem(array: Any, spec: ArraySpec, rows: int, shard_size: int) -> str | None:
    """How `array` differs from the layout `spec` gives it for `rows` rows in shards of `shard_size`
    (None: the same shape, chunks, shards, dtype, fill value and codecs)."""
    if not isinstance(array, zarr.Array):
        return "not a Zarr array"
    want = spec.create(zarr.group(store=MemoryStore()), rows, shard_size).metadata.to_dict()
    have = array.metadata.to_dict()
    if tuple(have.get("shape", ())) != tuple(want["shape"]):
        return f"shape {tuple(have.get('shape', ()))}, the plan gives {tuple(want['shape'])}"
    differ = sorted(k for k in set(have) | set(want) if k != "attributes" and have.get(k) != want.get(k))
    return f"its {', '.join(differ)} differ from the store's layout" if differ else None


def layout_problems(out_dir: str | os.PathLike, manifest: Manifest) -> list[tuple[str | None, str]]:
    """(column or None, message) for every way the store's Zarr metadata contradicts `manifest`.

    Checked in both views a reader may take (the consolidated metadata in OUT/zarr.json, and the nodes'
    own zarr.json files): the root's schema block equals the manifest's (format_version, shard_size,
    rows, fields...), the `ids` array holds the plan, and every Zarr column's group and arrays exist with
    the layout of `manifest.shard_size` x plan shards.
    """
    out = Path(out_dir)
    zarr_columns = [name for name, column in manifest.columns.items() if column.format == "zarr"]
    if not (out / "zarr.json").exists():
        return [(None, f"{out / 'zarr.json'}: missing (the Zarr root of the store)")] if zarr_columns else []
    rows, size = len(manifest.plan) * manifest.shard_size, manifest.shard_size
    schema = json.loads(json.dumps(manifest.schema()))
    problems: list[tuple[str | None, str]] = []
    for view, consolidated in (("consolidated metadata", True), ("metadata", False)):
        where = f"{out / 'zarr.json'} ({view})"
        try:
            root = zarr.open_group(store=LocalStore(out, read_only=True), mode="r", zarr_format=3,
                                   use_consolidated=consolidated)
            found = root.attrs.get(ATTRS)
            if not isinstance(found, dict):
                problems.append((None, f"{where}: no schema block (attributes[{ATTRS!r}])"))
            elif found != schema:
                keys = sorted(k for k in set(found) | set(schema) if found.get(k) != schema.get(k))
                problems.append((None, f"{where}: the schema block contradicts manifest.json in {', '.join(keys)}"))
            ids_spec = ArraySpec(IDS, (), (), "str", "", "zstd", per_row_chunks=False)
            if IDS not in root or (problem := array_problem(root[IDS], ids_spec, rows, size)) is not None:
                problems.append((None, f"{where}: array {IDS!r}: {'missing' if IDS not in root else problem}"))
            else:
                planned = np.full(rows, "", dtype=object)
                for plan in manifest.plan:
                    planned[plan.index * size : plan.index * size + len(plan.ids)] = plan.ids
                if [str(i) for i in root[IDS][...]] != list(planned):
                    problems.append((None, f"{where}: array {IDS!r} does not hold the plan's sample ids"))
            for name in zarr_columns:
                if name not in root:
                    problems.append((name, f"{where}: no group {name!r}"))
                    continue
                group = root[name]
                if group.attrs.get(ATTRS) != schema["columns"][name]:
                    problems.append((name, f"{where}: group {name!r}: its schema block contradicts manifest.json"))
                for spec in array_specs(manifest.columns[name].fields):
                    array = group[spec.path] if spec.path in group else None
                    problem = "missing" if array is None else array_problem(array, spec, rows, size)
                    if problem is not None:
                        problems.append((name, f"{where}: array {name}/{spec.path}: {problem}"))
        except Exception as err:  # noqa: BLE001 (zarr raises many kinds on edited metadata: reported, not hidden)
            problems.append((None, f"{where}: unreadable ({type(err).__name__}: {err})"))
    return problems


def publish_layout(out_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Write the store's Zarr metadata for `manifest` (driver only, while no shard writer runs).

    Root group with the schema block, the `ids` array, a group per Zarr column with its arrays (created
    when missing or laid out differently, which drops their data: only after the column's shards were
    removed), the Zarr leftovers of columns now stored as WebDataset removed, then consolidated metadata.
    """
    out = Path(out_dir)
    rows, size = len(manifest.plan) * manifest.shard_size, manifest.shard_size
    root = _open_root(out, "a")
    changed = "consolidated_metadata" not in json.loads((out / "zarr.json").read_text())
    schema = json.loads(json.dumps(manifest.schema()))  # as it reads back (lists, not tuples)
    if root.attrs.get(ATTRS) != schema:
        root.attrs[ATTRS] = schema
        changed = True
    ids_spec = ArraySpec(IDS, (), (), "str", "", "zstd", per_row_chunks=False)
    if not (IDS in root and _same_layout(root[IDS], ids_spec, rows, size)):
        planned = np.full(rows, "", dtype=object)
        for plan in manifest.plan:
            planned[plan.index * size : plan.index * size + len(plan.ids)] = plan.ids
        ids_spec.create(root, rows, size, overwrite=True)[...] = planned
        changed = True
    for name, column in manifest.columns.items():
        folder = out / name
        if column.format != "zarr":
            if (folder / "zarr.json").exists():  # the column was Zarr before: only its tar files stay
                (folder / "zarr.json").unlink()
                for entry in folder.iterdir():
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                changed = True
            continue
        group = root.require_group(name)
        if group.attrs.get(ATTRS) != schema["columns"][name]:
            group.attrs[ATTRS] = schema["columns"][name]
            changed = True
        specs = array_specs(column.fields)
        for spec in specs:
            if not (spec.path in group and _same_layout(group[spec.path], spec, rows, size)):
                spec.create(group, rows, size, overwrite=True)
                changed = True
        wanted = {spec.path.split("/")[0] for spec in specs}
        for stale in set(group.keys()) - wanted:
            shutil.rmtree(folder / stale)
            changed = True
    if changed:
        with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec yet": we know
            warnings.simplefilter("ignore", category=UserWarning)
            zarr.consolidate_metadata(LocalStore(out))


def encode_shard(specs: list[ArraySpec], shard_size: int, rows: dict[str, np.ndarray]) -> dict[str, bytes]:
    """The Zarr shard files of one plan shard, as {array path: bytes} (arrays left out are all fill).

    Args:
        rows: array path -> (shard_size, *shape) values of the shard's rows (fill where no sample);
            for dual point map values (shard_size, m, 6) with m <= capacity: entries beyond are fill.
    """
    files = {}
    for spec in specs:
        if spec.path not in rows:
            continue
        stored: dict[str, Any] = {}
        array = spec.create(zarr.group(store=MemoryStore(store_dict=stored)), shard_size, shard_size)
        block = rows[spec.path]
        array[(slice(None),) + tuple(slice(0, n) for n in block.shape[1:])] = block
        key = f"{spec.path}/{shard_keys(spec, 0)}"
        if key in stored:  # absent when every value is the fill value: zarr does not store empty shards
            files[spec.path] = stored[key].to_bytes()
    return files


def shard_size(column_dir: str | os.PathLike) -> int:
    """Rows per plan shard of the Zarr column in `column_dir` (from its `valid` array)."""
    return zarr.open_array(store=LocalStore(Path(column_dir) / VALID, read_only=True), mode="r").chunks[0]


def open_column(out_dir: str | os.PathLike, name: str) -> tuple[zarr.Array, zarr.Group]:
    """(root `ids` array, column group) of a store, read-only."""
    root = _open_root(Path(out_dir), "r")
    return root[IDS], root[name]
