"""The schema block: what every stored number means and where it lies, written with the data.

`manifest.json` ("schema") and the Zarr root attributes (`attrs["dualpm"]`) carry the same block, so a
store explains itself to someone who has neither this code nor docs/format.md (the full specification):

    format, format_version, spec       "dualpm-store", the store schema version, "docs/format.md"
    shard_size, shards, rows, splits   plan geometry: Zarr row = shard * shard_size + position in the shard
    conventions                        coordinate frames, units, depth layers, sample ids, WebDataset keys
    columns.<name>                     format and, per field: kind, dtype, shape, required, encoding (how
                                       it is stored in this column's container) and `about` (channels,
                                       units, resolution, precision: given by the stage that wrote it)

Kinds (`manifest.FieldSpec.kind`) and their encodings are defined here once; `fields.py` implements them.
"""

from __future__ import annotations

from typing import Any

FORMAT_NAME = "dualpm-store"
SCHEMA_VERSION = 2  # of the manifest, the sidecars and both containers (docs/format.md)
SPEC = "docs/format.md"
VALID = "valid"  # Zarr: (N,) bool per column, true where the row holds a stored sample
IDS = "ids"  # Zarr: (N,) string at the root, the sample id planned for each row ('' for padding)

CONVENTIONS = {
    "world": "Y-up (glTF). Canonical xyz: bind-pose (rest) vertex positions of the sample's mesh.",
    "camera": "OpenGL: the camera looks down -Z, +Y up, +X right; image row 0 is the top of the image.",
    "posed": "Camera coordinates with the camera's z translation view[2, 3] subtracted from z "
             "(object-centred depth; the view matrix is in the render column's meta).",
    "layers": "Depth peeling: layer l is the l-th distinct surface along the pixel ray, nearest first; "
              "a pixel's hits are layers 0..count-1.",
    "units": "Scene units (those of the source meshes); pixels for image sizes.",
    "ids": "Sample ids are file stems: letters and digits of any script, '.', '_', '-' (docs/format.md).",
    "webdataset_keys": "A tar member is '<key>.<field>.<extension>'; key = sample id with '%' written "
                       "'%25' and '.' written '%2E' (WebDataset splits names at the first dot).",
    "zarr_rows": "Row r of every Zarr array holds the sample planned at shard r // shard_size, position "
                 "r % shard_size; <column>/valid[r] says whether that sample is stored (it can be missing: "
                 "failed, shard unfinished, or padding after a split's last shard).",
}

PRECISION = {
    "float16": "IEEE float16, rounded to nearest: relative error <= 2**-11 (4.9e-4), so <= 4.9e-4 scene "
               "units for |x| < 2",
    "float32": "IEEE float32, rounded to nearest: relative error <= 2**-24 (6.0e-8)",
}


def _encoding(kind: str, fmt: str, name: str, spec: dict[str, Any]) -> str:
    """How a field of `kind` is stored in a column of format `fmt` (one line; docs/format.md has recipes)."""
    dtype, shape = spec.get("dtype"), spec.get("shape")
    if fmt == "webdataset":
        return {
            "dpm": f"member '<key>.{name}.npz' (zip, deflate): counts (H, W) uint8 = hits per pixel; values "
                   f"(M, 6) {dtype} = canonical xyz, posed xyz of the M hits, layer-major then raster order; "
                   "shape (4,) int64 = (H, W, L, 7)",
            "mask": f"member '<key>.{name}.png': PNG, 1-bit (1 = inside)",
            "image": f"member '<key>.{name}.png': the source image file (PNG or JPEG bytes as found)",
            "json": f"member '<key>.{name}.json': UTF-8 JSON object",
            "array": f"member '<key>.{name}.npy': .npy array {dtype} {shape}",
        }[kind]
    return {
        "dpm": f"arrays '{name}/counts' (N, H, W) uint8 = hits per pixel and '{name}/values' (N, capacity, "
               f"6) {dtype} = canonical xyz, posed xyz; row r's hits are values[r, :counts[r].sum()], "
               "layer-major then raster order (entries beyond are 0 and not stored)",
        "mask": f"array '{name}' (N, h, w) uint8 (1 = inside)",
        "image": f"array '{name}' (N, h, w, 3) uint8 RGB",
        "json": f"array '{name}' (N,) string: JSON text ('' where the row holds no sample)",
        "array": f"array '{name}' (N, *shape) {dtype}",
    }[kind]


def schema_block(
    shard_size: int, shards: int, splits: dict[str, list[int]], columns: dict[str, tuple[str, dict]]
) -> dict[str, Any]:
    """The schema block of a store.

    Args:
        shard_size: planned samples per shard; shards: planned shards.
        splits: split name -> [first shard, end shard) (a split's shards are contiguous).
        columns: column name -> (format, {field name: manifest.FieldSpec}).
    """
    described = {}
    for name, (fmt, fields) in columns.items():
        out = {}
        for field_name, spec in fields.items():
            entry = spec.to_json()
            about = entry.pop("about")
            out[field_name] = entry | {"encoding": _encoding(spec.kind, fmt, field_name, entry)} | about
        extra = {VALID: "(N,) bool: row holds a stored sample of this column"} if fmt == "zarr" else {}
        described[name] = {"format": fmt, "fields": out} | ({"arrays": extra} if extra else {})
    return {
        "format": FORMAT_NAME,
        "format_version": SCHEMA_VERSION,
        "spec": SPEC,
        "shard_size": shard_size,
        "shards": shards,
        "rows": shards * shard_size,
        "splits": splits,
        "conventions": CONVENTIONS,
        "columns": described,
    }
