"""On-disk store of prepared datasets: manifest, column shards (WebDataset tar or Zarr v3), verification.

```
OUT/zarr.json, OUT/ids            the Zarr root group (schema block in its attributes) and the row ids
OUT/manifest.json                 shard plan, columns (format, producing config, fields), shard records,
                                  the schema block
OUT/failures.jsonl                per-sample failures {column, shard, id, reason}
OUT/<column>/shard-000042.tar     WebDataset shard (members "<key>.<field>.<ext>"), or
OUT/<column>/<array>/c/42/...     the Zarr shard files of plan shard 42 (typed arrays, one row per sample)
OUT/records/<column>/shard-000042.json   the shard's record, published after its data
```
docs/format.md is the specification. `encoding` (sparse dual point maps, images), `fields` (field kinds),
`manifest` (plan, records, manifest I/O), `schema` (the schema block), `zarr_layout` (arrays, metadata),
`shards` (one writer per shard, readers, completeness, integrity), `verify` (whole-store checks).
"""

from dualpm.store.encoding import (
    PRECISIONS,
    EncodingError,
    baseline_npz_bytes,
    decode_png,
    dense_dual_pointmap,
    png_bytes,
    sparse_dual_pointmap,
)
from dualpm.store.fields import StoredSample
from dualpm.store.manifest import (
    FAILURES_NAME,
    FORMATS,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ColumnInfo,
    Failure,
    FieldSpec,
    Manifest,
    ShardPlan,
    ShardRecord,
    check_sample_id,
    column_dir,
    load_manifest,
    plan_shards,
    read_record,
    read_records,
    save_manifest,
    write_failures,
    write_record,
)
from dualpm.store.schema import PRECISION
from dualpm.store.shards import (
    ShardWriter,
    check_shard,
    data_path,
    read_shard,
    remove_shard,
    remove_temporaries,
    wds_key,
    shard_digest,
    shard_files,
    shard_status,
)
from dualpm.store.verify import Problem, verify_store
from dualpm.store.zarr_layout import publish_layout

__all__ = [
    "FAILURES_NAME", "FORMATS", "MANIFEST_NAME", "PRECISION", "PRECISIONS", "SCHEMA_VERSION",
    "ColumnInfo", "EncodingError", "Failure", "FieldSpec", "Manifest", "Problem", "ShardPlan", "ShardRecord",
    "ShardWriter", "StoredSample", "baseline_npz_bytes", "check_sample_id", "check_shard", "column_dir",
    "data_path", "decode_png", "dense_dual_pointmap", "load_manifest", "plan_shards", "png_bytes",
    "publish_layout", "read_record", "read_records", "read_shard", "remove_shard", "remove_temporaries",
    "wds_key",
    "save_manifest", "shard_digest", "shard_files", "shard_status", "sparse_dual_pointmap", "verify_store",
    "write_failures", "write_record",
]
