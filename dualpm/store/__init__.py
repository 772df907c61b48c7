"""On-disk store of prepared datasets: sparse dual point maps, manifest, column shards, verification.

```
OUT/manifest.json                 shard plan, columns (format, producing config, fields), shard records
OUT/failures.jsonl                per-sample failures {column, shard, id, reason}
OUT/<column>/shard-000042.tar     WebDataset shard (members "<id>.<field>"), or
OUT/<column>/shard-000042.zarr/   a Zarr v3 group (OUT/<column>/ itself a Zarr group)
OUT/<column>/shard-000042.json    the shard's record, published after its data
```
`encoding` (dual point map <-> bytes, PNG helpers), `manifest` (plan, records, manifest I/O),
`shards` (one writer per shard, readers, completeness), `verify` (whole-store checks).
"""

from dualpm.store.encoding import (
    EncodingError,
    baseline_npz_bytes,
    decode_dual_pointmap,
    decode_png,
    encode_dual_pointmap,
    png_bytes,
)
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
from dualpm.store.shards import (
    ShardWriter,
    check_shard,
    data_digest,
    data_path,
    read_shard,
    remove_shard,
    shard_status,
)
from dualpm.store.verify import Problem, verify_store

__all__ = [
    "FAILURES_NAME", "FORMATS", "MANIFEST_NAME", "SCHEMA_VERSION",
    "ColumnInfo", "EncodingError", "Failure", "FieldSpec", "Manifest", "Problem", "ShardPlan", "ShardRecord",
    "ShardWriter", "baseline_npz_bytes", "check_sample_id", "check_shard", "column_dir", "data_digest",
    "data_path", "decode_dual_pointmap", "decode_png", "encode_dual_pointmap", "load_manifest", "plan_shards",
    "png_bytes", "read_record", "read_records", "read_shard", "remove_shard", "save_manifest", "shard_status",
    "verify_store", "write_failures", "write_record",
]
