"""Streaming reader: joins a prepared dataset's `render` and `features` columns shard by shard.

`open_dataset(root)` reads the manifest once and lists, per split, the shards finished in both columns
with the sample ids they share (a sample missing from either column is skipped; `DatasetInfo.incomplete`
says what an unfinished store lacks: the trainer refuses it unless asked to train on it). `ShardStream` is the
`IterableDataset` the trainer reads:

* **Consumers.** Every (DDP rank, DataLoader worker) pair is one consumer, `rank * workers + worker`.
  Each epoch the split's shards are put in an order seeded by (seed, epoch) (the same on every
  consumer), and `consumer_segments` gives each consumer its part: whole shards round-robin, and the
  `S mod C` remaining shards shared at sample granularity (strided), or, with fewer shards than
  consumers, every shard strided over all consumers. Every sample of an epoch goes to exactly one
  consumer, and nothing hangs whatever the counts.
* **Infinite training stream.** Each consumer runs epoch after epoch on its own (its shards read
  `open_shards` at a time, round robin, then a seeded shuffle buffer per (seed, epoch, consumer)), so
  DDP ranks never wait for each other at an epoch end: training is counted in global steps.
* **Data position.** Every sample carries `position = (role, epoch, count)`: `count` samples of that
  epoch were yielded by that consumer up to and including this one. Restarting a consumer at
  (epoch, count) replays its stream without decoding (records are read but not decoded) and yields
  exactly what an uninterrupted run would have yielded next. `role_offset` rotates which worker
  plays which role, because a new DataLoader always starts its round robin at worker 0.

Decoded samples: `features` (C, H, W) float32 upsampled bilinearly (align_corners=False) to the training
resolution, `target` (H, W, L, 7) float32 (first L layers), `mask` (H, W) float32 in {0, 1} (the stored
mask decoded by `dualpm.masks`, resized by area > 0.5; layer-1 alpha only for a column that declares no
mask field: a required field missing from a sample is an error), `id` and `position` (3,) int64.

Integrity: every shard of both columns is checked against the sha256 of its record before any of its
samples is yielded (`dualpm.store.read_shard`; the cost is measured in docs/benchmarks.md), and features
that are not finite or beyond +-`FEATURE_LIMIT` fail their sample, naming it: nothing unverified is
trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dualpm.errors import DatasetError
from dualpm.masks import INSIDE, resize_mask
from dualpm.store import ColumnInfo, Manifest, StoredSample
from dualpm.store.access import CACHE_BYTES, Store, open_store
from dualpm.pointmaps import ALPHA
from dualpm.store.fields import ARRAY_LIMIT

RENDER = "render"
FEATURES = "features"
FEATURE_FIELD = "features"  # the features column's (C, h, w) array field
# Every extractor we ship gives features within a few units; beyond this, or not finite, is damaged data
# (the same bound `dualpm-prep verify` applies).
FEATURE_LIMIT = ARRAY_LIMIT
T = TypeVar("T")


@dataclass(frozen=True)
class ShardInfo:
    """A shard finished in both columns; `ids`: the samples both hold, in stored order."""

    index: int
    ids: tuple[str, ...]


@dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a prepared dataset (see `open_dataset`).

    resolution: (H, W) of the stored dual point maps; stored_layers: their L.
    feature_channels / feature_grid: C and (h, w) of the stored feature arrays.
    feature_config: the features column's config (the FeatureSpec dict of its extractor).
    identity: sha256 over the shard plan and both columns' shard checksums (changes if data change).
    shards: split name -> usable shards, in plan order.
    """

    root: Path | str  # the folder, or the URL of a remote store
    manifest: Manifest
    resolution: tuple[int, int]
    stored_layers: int
    feature_channels: int
    feature_grid: tuple[int, int]
    feature_config: dict[str, Any]
    identity: str
    shards: dict[str, tuple[ShardInfo, ...]]
    skipped_shards: int  # plan shards not finished in both columns
    store: Store  # reads the shards (local folder or URL, see dualpm.store.access)

    def count(self, split: str) -> int:
        """Number of samples of `split` the reader yields per epoch."""
        return sum(len(s.ids) for s in self.shards.get(split, ()))

    def incomplete(self, splits: Sequence[str]) -> str | None:
        """What is missing when shards of the plan are unfinished in a column (None: the store is complete).

        Says, per column, how many of the plan's shards it lacks (and which), and per split in `splits` how
        many of the planned samples training would see. Failed samples (recorded in finished shards) are
        not missing data.
        """
        if not self.skipped_shards:
            return None
        plan = self.manifest.plan
        parts = []
        for name in (RENDER, FEATURES):
            lacking = [p.index for p in plan if p.index not in self.manifest.columns[name].shards]
            if lacking:
                shown = ", ".join(map(str, lacking[:8])) + (", ..." if len(lacking) > 8 else "")
                parts.append(f"column {name!r} lacks {len(lacking)} of {len(plan)} shards ({shown})")
        seen = [f"{self.count(split)} of {sum(len(p.ids) for p in plan if p.split == split)} {split!r} samples"
                for split in splits]
        return f"{', '.join(parts)}; training would see {' and '.join(seen)}"

    def incomplete_refusal(self, splits: Sequence[str]) -> str | None:
        """The one-line refusal to train on an incomplete store (None: complete): counts and commands."""
        what = self.incomplete(splits)
        if what is None:
            return None
        stages = [name for name in (RENDER, FEATURES)
                  if any(p.index not in self.manifest.columns[name].shards for p in self.manifest.plan)]
        commands = " and ".join(f"dualpm-prep {name} SRC {self.root}" for name in stages)
        return (
            f"{self.root}: the store is incomplete: {what}. Complete it by rerunning the stage that stopped "
            f"(it resumes): {commands} (SRC: {self.manifest.source}), or train on what is there with "
            "--allow-incomplete"
        )


def feature_array(fields: Mapping[str, Any], where: str) -> np.ndarray:
    """The stored (C, h, w) float features of a features-column sample, checked for damage.

    Raises DatasetError naming `where` when the field is missing, not a float (C, h, w) array, not finite,
    or beyond +-`FEATURE_LIMIT` (flipped bytes that still decode)."""
    if FEATURE_FIELD not in fields:
        raise DatasetError(f"{where}: no {FEATURE_FIELD!r} field, has {sorted(fields)}")
    value = fields[FEATURE_FIELD]
    if not isinstance(value, np.ndarray) or value.ndim != 3 or value.dtype.kind != "f":
        shape = getattr(value, "shape", type(value).__name__)
        raise DatasetError(f"{where}: field {FEATURE_FIELD!r} must be a float (C, h, w) array, got {shape}")
    top = float(np.abs(value).max(initial=0.0))
    if not np.isfinite(top) or top > FEATURE_LIMIT:
        raise DatasetError(
            f"{where}: features are damaged (not finite, or up to {top:.4g}, beyond +-{FEATURE_LIMIT:g}); "
            "verify the store (`dualpm-prep verify`) and rerun `dualpm-prep features`"
        )
    return value


def open_dataset(
    root: str | Path, cache: str | Path | None = None, cache_bytes: int = CACHE_BYTES
) -> DatasetInfo:
    """Read `root/manifest.json`, join the columns' shard records, and probe the first sample.

    `root` is a folder or a store URL (s3://, gs://, http(s)://, file://; `dualpm.store.access`); `cache`
    a folder keeping a remote store's shards (at most `cache_bytes`) for later epochs and runs.
    Raises DatasetError (naming the file) if the dataset, a column or every shard of it is missing,
    or the first sample does not decode.
    """
    store = open_store(root, cache, cache_bytes)
    root = store.root if store.root is not None else store.where
    if store.root is not None and not store.root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    manifest = store.load_manifest()
    where = f"{root}/manifest.json"
    for name, stage in ((RENDER, "render"), (FEATURES, "features")):
        if name not in manifest.columns:
            raise DatasetError(f"{where}: no column {name!r} (run `dualpm-prep {stage}` first)")
    render, features = manifest.columns[RENDER], manifest.columns[FEATURES]
    shards: dict[str, list[ShardInfo]] = {}
    skipped = 0
    for plan in manifest.plan:
        rec_r, rec_f = render.shards.get(plan.index), features.shards.get(plan.index)
        if rec_r is None or rec_f is None:
            skipped += 1
            continue
        have = set(rec_f.ids)
        ids = tuple(i for i in rec_r.ids if i in have)
        if ids:
            shards.setdefault(plan.split, []).append(ShardInfo(plan.index, ids))
    if not shards:
        raise DatasetError(f"{where}: no shard is finished in both columns {RENDER!r} and {FEATURES!r}")
    identity = hashlib.sha256(
        json.dumps(
            {
                "plan": [[p.split, list(p.ids)] for p in manifest.plan],
                **{c.name: {str(k): r.sha256 for k, r in sorted(c.shards.items())}
                   for c in (render, features)},
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    # Shapes from the first sample: the one source that is right whatever wrote the column configs.
    first = next(iter(shards.values()))[0]
    with contextlib.closing(_joined(store, render, features, first, first.ids[:1])) as probe:
        sample_id, fields, feature_fields = next(probe)
    if "dpm" not in fields:
        raise DatasetError(f"{fields.where}: no 'dpm' field")
    dpm = fields["dpm"]
    feats = feature_array(feature_fields, feature_fields.where)
    return DatasetInfo(
        root=root,
        manifest=manifest,
        resolution=(dpm.shape[0], dpm.shape[1]),
        stored_layers=dpm.shape[2],
        feature_channels=feats.shape[0],
        feature_grid=(feats.shape[1], feats.shape[2]),
        feature_config=dict(features.config),
        identity=identity,
        shards={k: tuple(v) for k, v in shards.items()},
        skipped_shards=skipped,
        store=store,
    )


def _advance(records: Iterator[tuple[str, dict[str, Any]]], sample_id: str, where: str) -> dict[str, Any]:
    # Both columns store plan order minus failures: skip forward to the wanted id.
    for found, fields in records:
        if found == sample_id:
            return fields
    raise DatasetError(
        f"{where}: sample {sample_id!r} is in the shard record but not in the data (or out of order)"
    )


def _joined(
    store: Store, render: ColumnInfo, features: ColumnInfo, shard: ShardInfo, wanted: Sequence[str]
) -> Iterator[tuple[str, StoredSample, StoredSample]]:
    """Yield (id, render fields, features fields) of the `wanted` ids (stored order) of a shard, undecoded.

    Both columns' shard data are checked against their records' sha256 before the first sample."""
    r_iter = store.read_shard(render, shard.index)
    f_iter = store.read_shard(features, shard.index)
    try:
        for sample_id in wanted:
            r_fields = _advance(r_iter, sample_id, f"{store.column_where(RENDER)} shard {shard.index}")
            f_fields = _advance(f_iter, sample_id, f"{store.column_where(FEATURES)} shard {shard.index}")
            for column, fields in ((render, r_fields), (features, f_fields)):
                # A field the column declares required is never replaced by something else (a tar
                # sample without its mask member must not train on the rendered alpha).
                missing = [n for n, spec in column.fields.items() if spec.required and n not in fields]
                if missing:
                    raise DatasetError(f"{fields.where}: required field {missing[0]!r} missing (the column's "
                                       "fields say every sample has it)")
            yield sample_id, r_fields, f_fields
    finally:  # release the open tar / Zarr handles now, not at garbage collection
        r_iter.close()
        f_iter.close()


@dataclass(frozen=True)
class Segment:
    """Take samples offset, offset + stride, ... of the concatenated samples of `shards`."""

    shards: tuple[ShardInfo, ...]
    offset: int
    stride: int


def consumer_segments(shards: Sequence[ShardInfo], consumers: int, consumer: int) -> list[Segment]:
    """The part of one epoch's (already ordered) shards read by `consumer` of `consumers`.

    S >= C shards: consumer c reads whole shards c, c + C, ... of the first C * (S // C), and shares one
    of the r = S mod C remaining shards with the other consumers c' = c (mod r), taking a strided
    subset. S < C: every consumer strides over all shards (each reads them all; the data set is tiny
    compared with the parallelism). Either way every sample goes to exactly one consumer.
    """
    if not 0 <= consumer < consumers:
        raise ValueError(f"consumer {consumer} not in 0..{consumers - 1}")
    q, r = divmod(len(shards), consumers)
    if q == 0:
        return [Segment(tuple(shards), consumer, consumers)] if shards else []
    segments = [Segment((shards[consumer + consumers * j],), 0, 1) for j in range(q)]
    if r:
        k = consumer % r
        segments.append(Segment((shards[q * consumers + k],), consumer // r, len(range(k, consumers, r))))
    return segments


def shuffle_buffer(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Streaming shuffle: keep `size` items, yield a random one as each new item arrives, then the rest."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


_END = object()  # marks an exhausted iterator in interleave()


def interleave(iterators: Iterable[Iterator[T]], width: int) -> Iterator[T]:
    """Round robin over `width` iterators at a time, taking the next one in when one ends.

    Iterators are started lazily in the given order, so at most `width` shards are open at once.
    """
    pending = iter(iterators)
    active = list(itertools.islice(pending, max(1, width)))
    try:
        while active:
            for k, it in enumerate(active):
                item = next(it, _END)
                if item is _END:
                    active[k] = next(pending, None)  # dropped below if there is none
                    continue
                yield item
            active = [it for it in active if it is not None]
    finally:  # a consumer that stops early closes the shards still open now
        for it in active:
            if it is not None and hasattr(it, "close"):
                it.close()


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def decode_sample(
    fields: Mapping[str, Any], features: Mapping[str, Any], layers: int, resolution: tuple[int, int],
    where: str,
) -> dict[str, torch.Tensor]:
    """Decode one joined sample for training.

    Args:
        fields: the render column's fields ("dpm", optional "mask"), e.g. a `dualpm.store.StoredSample`.
        features: the features column's fields ("features": (C, h, w) float array).
        layers: L, the number of (nearest) layers kept.
        resolution: (H, W) training resolution.
        where: names the sample in error messages.
    Returns:
        features (C, H, W) float32, target (H, W, L, 7) float32 (scene units), mask (H, W) float32, CPU.
    """
    if "dpm" not in fields:
        raise DatasetError(f"{where}: no 'dpm' field")
    dpm = fields["dpm"]  # (H0, W0, L0, 7) float32
    if dpm.shape[2] < layers:
        raise DatasetError(f"{where}: holds {dpm.shape[2]} layers, {layers} requested")
    dpm = dpm[:, :, :layers]  # a view: no copy
    if dpm.shape[:2] != resolution:
        # Nearest sampling: point maps must not be blended across depth discontinuities.
        dpm = dpm[_nearest_index(resolution[0], dpm.shape[0])][:, _nearest_index(resolution[1], dpm.shape[1])]
    target = torch.from_numpy(dpm)
    if "mask" in fields:
        stored = fields["mask"]  # (h, w) float32 in [0, 1] (`dualpm.masks.decode_mask`)
        if not (stored > INSIDE).any() and bool(target[:, :, 0, ALPHA].any()):
            raise DatasetError(f"{where}: the stored mask is empty but the dual point map has hits")
        mask = resize_mask(stored, resolution)
    else:
        mask = target[:, :, 0, ALPHA].clone()
    feats = torch.from_numpy(feature_array(features, where)).float()  # (C, h, w)
    if tuple(feats.shape[1:]) != resolution:
        feats = F.interpolate(feats[None], size=resolution, mode="bilinear", align_corners=False)[0]
    return {"features": feats, "target": target, "mask": mask}


class ShardStream(IterableDataset):
    """Samples of one split, partitioned over (rank, DataLoader worker); see the module docstring.

    Args:
        info: from `open_dataset`.
        split: split name ("train", "val", ...).
        layers: L, the layers kept; resolution: (H, W) training resolution.
        seed: seeds the shard order and the shuffle buffers (with the epoch and the consumer).
        rank, world: this DDP rank and the number of ranks.
        shuffle: seeded shard order and shuffle buffer (False: plan order, each consumer in stored order).
        buffer_size: shuffle buffer size in samples (<= 1: no buffer).
        open_shards: with shuffle, shards each consumer reads at once, samples taken round robin.
        infinite: run epoch after epoch (training); False: one epoch (validation).
        positions: (roles, 2) int64 (epoch, count) per role of this rank to start from (None: all 0).
        role_offset: worker w plays role (w + role_offset) % workers.
    """

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        layers: int,
        resolution: tuple[int, int],
        seed: int,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        buffer_size: int = 64,
        open_shards: int = 4,
        infinite: bool = True,
        positions: np.ndarray | None = None,
        role_offset: int = 0,
    ):
        super().__init__()
        if split not in info.shards:
            raise DatasetError(
                f"{info.root}: split {split!r} has no finished shards (splits: {sorted(info.shards)})"
            )
        self.info, self.split, self.layers, self.resolution = info, split, layers, tuple(resolution)
        self.seed, self.rank, self.world = seed, rank, world
        self.shuffle, self.buffer_size, self.infinite = shuffle, buffer_size, infinite
        self.open_shards = open_shards
        self.positions = None if positions is None else np.asarray(positions, np.int64).reshape(-1, 2)
        self.role_offset = role_offset
        self._columns = (info.manifest.columns[RENDER], info.manifest.columns[FEATURES])

    def consumer(self) -> tuple[int, int, int]:
        """(role, consumer index, number of consumers) of the calling process."""
        worker = get_worker_info()
        workers, wid = (1, 0) if worker is None else (worker.num_workers, worker.id)
        role = (wid + self.role_offset) % workers
        return role, self.rank * workers + role, self.world * workers

    def epoch_shards(self, epoch: int) -> list[ShardInfo]:
        """The split's shards in epoch `epoch`'s order (the same for every consumer)."""
        shards = list(self.info.shards[self.split])
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(shards))
            shards = [shards[i] for i in order]
        return shards

    def records(
        self, epoch: int, consumer: int, consumers: int
    ) -> Iterator[tuple[int, str, StoredSample, StoredSample]]:
        """Undecoded (shard, id, render fields, features fields) of one consumer's epoch, in yield order."""

        store = self.info.store

        def shard_records(shard: ShardInfo, wanted: list[str]) -> Iterator[tuple[int, str, StoredSample,
                                                                                  StoredSample]]:
            for sample_id, fields, feats in _joined(store, *self._columns, shard, wanted):
                yield shard.index, sample_id, fields, feats

        parts = []  # (shard, the ids this consumer takes from it), in epoch order
        for seg in consumer_segments(self.epoch_shards(epoch), consumers, consumer):
            start = 0  # index of the shard's first sample in the segment's concatenation
            for shard in seg.shards:
                wanted = shard.ids[(seg.offset - start) % seg.stride :: seg.stride]
                start += len(shard.ids)
                if wanted:
                    parts.append((shard, wanted))
        # A remote store fetches the shards in the order they will be opened, a few ahead of the reader.
        store.prefetch([(column, shard.index) for shard, _ in parts for column in self._columns])
        streams = (shard_records(shard, wanted) for shard, wanted in parts)
        if not self.shuffle:
            return itertools.chain.from_iterable(streams)
        # Shards are often written model by model (ours, the published set): reading several at once
        # mixes them before the shuffle buffer does, so a batch is not one animal.
        rng = np.random.default_rng([self.seed, epoch, consumer, 1])
        return shuffle_buffer(interleave(streams, self.open_shards), self.buffer_size, rng)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        role, consumer, consumers = self.consumer()
        epoch, skip = 0, 0
        if self.positions is not None:
            if role >= len(self.positions):
                raise ValueError(f"positions hold {len(self.positions)} roles, role {role} requested")
            epoch, skip = (int(v) for v in self.positions[role])
        while True:
            count = 0
            for shard, sample_id, fields, feats in self.records(epoch, consumer, consumers):
                count += 1
                if count <= skip:  # fast-forward after a resume: read, never decode
                    continue
                where = f"{self.info.root}: shard {shard} sample {sample_id!r}"
                sample = decode_sample(fields, feats, self.layers, self.resolution, where)
                sample["id"] = sample_id
                sample["position"] = torch.tensor([role, epoch, count], dtype=torch.int64)
                yield sample
            if not self.infinite:
                return
            if count == 0:
                raise DatasetError(
                    f"{self.info.root}: split {self.split!r} has {self.info.count(self.split)} samples, "
                    f"fewer than the {consumers} data consumers (DDP ranks x loader workers); "
                    "use fewer loader workers"
                )
            epoch, skip = epoch + 1, 0


def make_loader(
    stream: ShardStream, batch_size: int, workers: int, prefetch: int, pin_memory: bool
) -> DataLoader:
    """A DataLoader over `stream`: batches are formed inside each worker (one role per batch).

    It gets its own generator: starting an iterator then leaves the global torch RNG (dropout) untouched,
    so a resumed run, which starts a new iterator, draws the same dropout masks as an uninterrupted one.
    """
    return DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=workers,
        prefetch_factor=prefetch if workers > 0 else None,
        pin_memory=pin_memory,
        drop_last=False,
        generator=torch.Generator().manual_seed(0),  # the stream seeds itself; this only feeds worker seeds
    )
