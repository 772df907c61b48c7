"""Streaming reader: column join, decoding, partition over ranks x workers, shuffle, positions, errors.

`write_store` (also used by test_train.py) builds a tiny prepared dataset with the store API: analytic
spheres seen along -z (orthographic), so every sample has 1..4 depth-peeled layers with known points.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualpm.data.reader import (
    FEATURE_LIMIT,
    ShardInfo,
    ShardStream,
    consumer_segments,
    decode_sample,
    interleave,
    make_loader,
    open_dataset,
    shuffle_buffer,
)
from dualpm.errors import DatasetError
from dualpm.masks import decode_mask
from dualpm.store import (
    SCHEMA_VERSION,
    ColumnInfo,
    FieldSpec,
    Manifest,
    ShardWriter,
    column_dir,
    plan_shards,
    publish_layout,
    save_manifest,
    shard_files,
)

STORED_LAYERS = 6


def sphere_sample(seed: int, size: int, layers: int = STORED_LAYERS) -> np.ndarray:
    """(size, size, layers, 7) dual point map of two spheres along -z: up to 4 hits per pixel."""
    rng = np.random.default_rng(seed)
    v, u = (np.mgrid[:size, :size] + 0.5) / size * 2 - 1  # image row 0 at the top: y = -v
    x, y = u, -v
    hits = []  # (depth z, canonical xyz, posed xyz) per sphere surface
    for k in range(2):
        centre = np.array([rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), -0.6 * k])
        radius = rng.uniform(0.35, 0.6)
        d2 = radius**2 - (x - centre[0]) ** 2 - (y - centre[1]) ** 2
        hit = d2 > 0
        for sign in (1.0, -1.0):  # front (nearer: larger z), back
            z = centre[2] + sign * np.sqrt(np.where(hit, d2, 0.0))
            posed = np.stack([x, y, z], -1)
            canon = (posed - centre) / radius + np.array([2.0 * k, 0, 0])
            hits.append((np.where(hit, z, -np.inf), canon, posed))
    depth = np.stack([h[0] for h in hits], -1)  # (H, W, 4)
    order = np.argsort(-depth, axis=-1)  # nearest first
    dpm = np.zeros((size, size, layers, 7), np.float32)
    for layer in range(min(layers, len(hits))):
        pick = order[..., layer]
        z = np.take_along_axis(depth, pick[..., None], -1)[..., 0]
        valid = np.isfinite(z)
        canon = np.choose(pick[..., None], [h[1] for h in hits])
        posed = np.choose(pick[..., None], [h[2] for h in hits])
        dpm[valid, layer, 0:3] = canon[valid]
        dpm[valid, layer, 3:6] = posed[valid]
        dpm[valid, layer, 6] = 1.0
    return dpm


def sample_features(dpm: np.ndarray, channels: int, grid: int, seed: int) -> np.ndarray:
    """(channels, grid, grid) float16: layer-1 posed xyz + alpha, area-averaged, then seeded noise."""
    first = torch.from_numpy(dpm[:, :, 0, 3:7]).permute(2, 0, 1)[None]  # (1, 4, H, W)
    base = F.interpolate(first, size=(grid, grid), mode="area")[0].numpy()
    noise = np.random.default_rng(10_000 + seed).normal(0, 0.5, (max(0, channels - 4), grid, grid))
    return np.concatenate([base, noise])[:channels].astype(np.float16)


def as_stored(dpm: np.ndarray) -> np.ndarray:
    """A dual point map as the store gives it back (float16 values)."""
    return dpm.astype(np.float16).astype(np.float32)


def write_store(
    root: Path,
    n_train: int = 8,
    n_val: int = 4,
    shard_size: int = 4,
    size: int = 16,
    channels: int = 5,
    grid: int = 8,
    formats: tuple[str, str] = ("webdataset", "zarr"),
    mask_size: int | None = None,
    with_mask: bool = True,
    fail: dict[str, set[str]] | None = None,
    skip_shards: dict[str, set[int]] | None = None,
    nan_features: frozenset[str] = frozenset(),
    ids: list[str] | None = None,
    precision: str = "float16",
    huge_targets: frozenset[str] = frozenset(),
) -> Path:
    """Write a prepared dataset (manifest + columns "render" and "features") to `root`; returns `root`.

    Sample i (id `ids[i]`, default f"{i:04d}"): `sphere_sample(i, size)`; features `sample_features(...,
    channels, grid, i)`; mask = layer-1 alpha (at `mask_size` if given, nearest-upsampled).
    `fail[column]`: ids recorded as failed there. `skip_shards[column]`: shards left unwritten (unfinished).
    `nan_features`: ids whose features are NaN. `huge_targets`: ids whose dual point map values are 1e30
    (stored with precision float32).
    """
    fail, skip_shards = fail or {}, skip_shards or {}
    ids = ids or [f"{i:04d}" for i in range(n_train + n_val)]
    seeds = {sample_id: i for i, sample_id in enumerate(ids)}
    plan = plan_shards({"train": ids[:n_train], "val": ids[n_train:]}, shard_size)
    manifest = Manifest.create("synthetic spheres", shard_size, plan)
    side = mask_size or size
    render_fields = {"dpm": FieldSpec("dpm", (size, size, STORED_LAYERS, 7), precision), "meta": FieldSpec("json")}
    if with_mask:
        render_fields["mask"] = FieldSpec("mask", (side, side), "uint8")
    fields = {"render": render_fields, "features": {"features": FieldSpec("array", (channels, grid, grid), "float16")}}
    configs = {"render": {"size": size}, "features": {"extractor": "test", "dim": channels, "grid": grid}}
    for name, fmt in zip(("render", "features"), formats, strict=True):
        manifest.columns[name] = ColumnInfo(name, fmt, SCHEMA_VERSION, configs[name], fields[name])
        column_dir(root, name).mkdir(parents=True, exist_ok=True)
    publish_layout(root, manifest)
    for name, column in manifest.columns.items():
        for shard in plan:
            if shard.index in skip_shards.get(name, set()):
                continue
            with ShardWriter(column_dir(root, name), shard, column.format, column.fields) as writer:
                for sample_id in shard.ids:
                    if sample_id in fail.get(name, set()):
                        writer.fail(sample_id, "test failure")
                        continue
                    seed = seeds[sample_id]
                    dpm = sphere_sample(seed, size)
                    if name == "features":
                        feats = sample_features(dpm, channels, grid, seed)
                        if sample_id in nan_features:
                            feats[:] = np.nan
                        writer.add(sample_id, {"features": feats})
                        continue
                    if sample_id in huge_targets:
                        dpm[..., :6] = np.where(dpm[..., 6:] > 0, 1e30, 0.0)
                    values = {"dpm": dpm, "meta": {"seed": seed}}
                    if with_mask:
                        mask = dpm[:, :, 0, 6] > 0
                        values["mask"] = mask.repeat(side // size, 0).repeat(side // size, 1)
                    writer.add(sample_id, values)
            column.shards[shard.index] = writer.record
    save_manifest(root, manifest)
    return root


def ids_of(loader) -> list[str]:
    return [i for batch in loader for i in batch["id"]]


# --- dataset info, join, decoding -------------------------------------------------------------------


@pytest.mark.parametrize("formats", [("webdataset", "zarr"), ("zarr", "webdataset")])
def test_open_dataset_joins_columns_and_probes_shapes(tmp_path, formats):
    fail = {"render": {"0001"}, "features": {"0006", "0009"}}
    root = write_store(tmp_path, formats=formats, fail=fail, skip_shards={"features": {1}})
    info = open_dataset(root)
    assert info.resolution == (16, 16) and info.stored_layers == STORED_LAYERS
    assert info.feature_channels == 5 and info.feature_grid == (8, 8)
    assert info.feature_config == {"extractor": "test", "dim": 5, "grid": 8}
    # Shard 1 (ids 4-7) is unfinished in "features": skipped; failed samples are left out of the join.
    assert info.skipped_shards == 1
    assert info.shards == {
        "train": (ShardInfo(0, ("0000", "0002", "0003")),),
        "val": (ShardInfo(2, ("0008", "0010", "0011")),),
    }
    assert info.count("train") == 3 and info.count("val") == 3
    stream = ShardStream(info, "val", 4, (16, 16), seed=0, shuffle=False, infinite=False)
    assert ids_of(make_loader(stream, 2, 0, 2, False)) == ["0008", "0010", "0011"]
    assert open_dataset(root).identity == info.identity


def test_decoded_sample_matches_the_stored_data(tmp_path):
    root = write_store(tmp_path, mask_size=32)
    info = open_dataset(root)
    stream = ShardStream(info, "train", 3, (16, 16), seed=0, shuffle=False, infinite=False)
    sample = next(iter(stream))
    assert sample["id"] == "0000" and sample["position"].tolist() == [0, 0, 1]
    dpm = as_stored(sphere_sample(0, 16))  # float16-rounded like the store
    assert sample["target"].dtype == torch.float32 and sample["target"].shape == (16, 16, 3, 7)
    assert torch.equal(sample["target"], torch.from_numpy(dpm[:, :, :3]))
    assert torch.equal(sample["mask"], torch.from_numpy(dpm[:, :, 0, 6]))  # 32x32 mask area-resized back
    stored = torch.from_numpy(sample_features(sphere_sample(0, 16), 5, 8, 0)).float()
    expected = F.interpolate(stored[None], size=(16, 16), mode="bilinear", align_corners=False)[0]
    assert sample["features"].dtype == torch.float32 and torch.equal(sample["features"], expected)
    # The analytic spheres really produce several layers.
    assert sample["target"][..., 2, 6].sum() > 0


def test_mask_falls_back_to_layer1_alpha_and_resolution_resamples(tmp_path):
    info = open_dataset(write_store(tmp_path, with_mask=False))
    sample = next(iter(ShardStream(info, "train", 2, (8, 8), seed=0, shuffle=False, infinite=False)))
    dpm = as_stored(sphere_sample(0, 16))
    # 16 -> 8: nearest sampling takes the pixel at odd rows/columns (centre rule), never blends points.
    assert torch.equal(sample["target"], torch.from_numpy(dpm[1::2, 1::2, :2]))
    assert torch.equal(sample["mask"], sample["target"][..., 0, 6])
    assert sample["features"].shape == (5, 8, 8)


FEATS = {"features": np.zeros((3, 4, 4), np.float16)}


@pytest.mark.parametrize("encoding", ["0/1 uint8", "0/255 uint8", "0/65535 uint16", "RGBA alpha"])
def test_masks_in_any_encoding_read_the_same(encoding):
    # decode_sample takes any mask the one decoder (dualpm.masks) reads: 0/1 must not read as empty.
    dpm = sphere_sample(3, 16)
    inside = dpm[:, :, 0, 6] > 0
    stored = {
        "0/1 uint8": inside.astype(np.uint8),
        "0/255 uint8": inside.astype(np.uint8) * 255,
        "0/65535 uint16": inside.astype(np.uint16) * 65535,
        "RGBA alpha": np.dstack([np.full(inside.shape + (3,), 255, np.uint8), inside.astype(np.uint8) * 255]),
    }[encoding]
    fields = {"dpm": dpm, "mask": decode_mask(stored, "mask")}
    sample = decode_sample(fields, FEATS, 2, (16, 16), "sample '3'")
    assert torch.equal(sample["mask"], torch.from_numpy(inside.astype(np.float32)))


def test_an_empty_stored_mask_with_hits_is_an_error_naming_the_sample():
    dpm = sphere_sample(3, 16)
    fields = {"dpm": dpm, "mask": np.zeros((16, 16), np.float32)}
    with pytest.raises(DatasetError, match=r"sample '3': the stored mask is empty but the dual point map has hits"):
        decode_sample(fields, FEATS, 2, (16, 16), "sample '3'")


def test_decode_errors_name_the_sample():
    fields = {"dpm": sphere_sample(0, 8, layers=2)}
    with pytest.raises(DatasetError, match=r"sample '7'.*2 layers, 4 requested"):
        decode_sample(fields, FEATS, 4, (8, 8), "sample '7'")
    with pytest.raises(DatasetError, match=r"sample '7': no 'dpm'"):
        decode_sample({}, FEATS, 1, (8, 8), "sample '7'")


@pytest.mark.parametrize("value", [np.nan, np.inf, -1e4, 25536.0])
def test_damaged_features_are_an_error_naming_the_sample(value):
    fields = {"dpm": sphere_sample(0, 8, layers=2)}
    feats = np.zeros((3, 4, 4), np.float16)
    feats[1, 2, 3] = value
    with pytest.raises(DatasetError, match=r"sample '7': features are damaged"):
        decode_sample(fields, {"features": feats}, 2, (8, 8), "sample '7'")
    feats[1, 2, 3] = -FEATURE_LIMIT  # the bound itself is fine
    decode_sample(fields, {"features": feats}, 2, (8, 8), "sample '7'")


def test_open_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="manifest.json: not found"):
        open_dataset(tmp_path / "empty")
    root = write_store(tmp_path / "d")
    manifest_path = root / "manifest.json"
    import json

    data = json.loads(manifest_path.read_text())
    del data["columns"]["features"]
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="no column 'features'.*dualpm-prep features"):
        open_dataset(root)


# --- partition over consumers -------------------------------------------------------------------------


def _epoch_assignment(sizes: list[int], consumers: int) -> list[list[str]]:
    shards = [ShardInfo(k, tuple(f"{k}-{i}" for i in range(n))) for k, n in enumerate(sizes)]
    out = []
    for c in range(consumers):
        got = []
        for seg in consumer_segments(shards, consumers, c):
            flat = [i for s in seg.shards for i in s.ids]
            got += flat[seg.offset :: seg.stride]
        out.append(got)
    return out


@pytest.mark.parametrize(
    "sizes,consumers",
    [
        ([4] * 8, 4), ([4] * 9, 4), ([5, 3, 4, 4, 2], 4), ([4] * 3, 4), ([7], 4), ([2, 1], 6), ([3] * 11, 8),
        ([6], 1),
    ],
)
def test_every_sample_goes_to_exactly_one_consumer(sizes, consumers):
    parts = _epoch_assignment(sizes, consumers)
    everything = [f"{k}-{i}" for k, n in enumerate(sizes) for i in range(n)]
    assert sorted(i for p in parts for i in p) == sorted(everything)
    if sum(sizes) >= consumers:
        assert all(parts), "no consumer may be left without samples"
    if len(sizes) >= consumers:  # whole shards where possible: a consumer reads at most one shared shard
        for c in range(consumers):
            shards = consumer_segments([ShardInfo(k, ("x",) * n) for k, n in enumerate(sizes)], consumers, c)
            assert sum(s.stride > 1 for s in shards) <= 1


def test_shuffle_buffer_is_a_seeded_permutation():
    items = list(range(50))
    a = list(shuffle_buffer(items, 8, np.random.default_rng(3)))
    b = list(shuffle_buffer(items, 8, np.random.default_rng(3)))
    c = list(shuffle_buffer(items, 8, np.random.default_rng(4)))
    assert a == b and sorted(a) == items and a != items and a != c
    assert list(shuffle_buffer(items, 1, np.random.default_rng(3))) == items


def test_interleave_is_round_robin_over_a_window_of_iterators():
    opened = []

    def source(name, n):
        opened.append(name)
        yield from (f"{name}{k}" for k in range(n))

    streams = (source(name, n) for name, n in (("a", 3), ("b", 1), ("c", 2), ("d", 1)))
    assert list(interleave(streams, 2)) == ["a0", "b0", "a1", "a2", "c0", "c1", "d0"]
    assert opened == ["a", "b", "c", "d"]
    assert list(interleave(iter([iter([1, 2]), iter([3])]), 1)) == [1, 2, 3]  # width 1: plain chain
    # Closed early, the iterators still open are closed (their shard files released).
    streams = [source(name, 5) for name in "xyz"]
    it = interleave(iter(streams), 2)
    assert next(it) == "x0"
    it.close()
    assert all(s.gi_frame is None for s in streams[:2])


def test_samples_of_open_shards_are_interleaved(tmp_path):
    # 4 shards of 4 (ids 0000-0003 in one shard, ...): without a buffer, 2 open shards alternate.
    info = open_dataset(write_store(tmp_path, n_train=16, n_val=1, shard_size=4, size=8, grid=4))
    ids = [s["id"] for s in itertools.islice(iter(_stream(info, buffer_size=0, open_shards=2)), 16)]
    shards = [int(i) // 4 for i in ids]
    assert sorted(ids) == [f"{i:04d}" for i in range(16)]
    assert all(a != b for a, b in zip(shards[:7], shards[1:8], strict=True))  # two shards, alternating
    assert len(set(shards[:8])) == 2
    alone = [int(s["id"]) // 4 for s in itertools.islice(iter(_stream(info, buffer_size=0, open_shards=1)), 16)]
    assert all(len(set(alone[k : k + 4])) == 1 for k in range(0, 16, 4))  # one shard after another


# --- streams over ranks x workers -------------------------------------------------------------------


def _stream(info, rank=0, world=1, **kw):
    args = dict(layers=2, resolution=(16, 16), seed=5, rank=rank, world=world, buffer_size=4) | kw
    return ShardStream(info, "train", **args)


@pytest.mark.parametrize("n_train,shard_size", [(12, 2), (12, 12), (6, 4)])
def test_two_ranks_two_workers_read_each_sample_once_per_epoch(tmp_path, n_train, shard_size):
    # (12, 2): 6 shards for 4 consumers; (12, 12): one shard shared by all; (6, 4): 2 shards, sizes 4 and 2.
    root = write_store(tmp_path, n_train=n_train, n_val=1, shard_size=shard_size, size=8, grid=4)
    info = open_dataset(root)
    train_ids = [f"{i:04d}" for i in range(n_train)]
    seen: dict[int, list[str]] = {0: [], 1: []}  # epoch -> ids over all ranks and workers
    for rank in range(2):
        loader = make_loader(_stream(info, rank, 2), 1, 2, 2, False)
        for batch in itertools.islice(loader, 3 * n_train):  # this rank's consumers: >= 2 epochs each
            epoch = int(batch["position"][0, 1])
            if epoch in seen:
                seen[epoch] += batch["id"]
    assert sorted(seen[0]) == train_ids and sorted(seen[1]) == train_ids
    # Finite (validation-style) pass, no shuffle: once in total, whatever the counts.
    streams = [_stream(info, r, 2, shuffle=False, infinite=False) for r in range(2)]
    finite = [ids_of(make_loader(s, 2, 2, 2, False)) for s in streams]
    assert sorted(finite[0] + finite[1]) == train_ids


def test_order_is_seeded_per_epoch_and_differs_between_epochs(tmp_path):
    info = open_dataset(write_store(tmp_path, n_train=16, n_val=1, shard_size=4, size=8, grid=4))
    take = lambda seed: [s["id"] for s in itertools.islice(iter(_stream(info, seed=seed)), 32)]  # noqa: E731
    first, again, other = take(5), take(5), take(6)
    assert first == again and first != other
    assert sorted(first[:16]) == sorted(first[16:]) and first[:16] != first[16:]
    assert first[:16] != sorted(first[:16])


def test_fewer_samples_than_consumers_is_a_clear_error(tmp_path):
    info = open_dataset(write_store(tmp_path, n_train=3, n_val=1, shard_size=4, size=8, grid=4))
    with pytest.raises(DatasetError, match="3 samples, fewer than the 4 data consumers"):
        next(iter(_stream(info, rank=3, world=4)))  # consumer 3 of 4 has no sample


def test_restart_from_positions_continues_the_same_stream(tmp_path):
    info = open_dataset(write_store(tmp_path, n_train=10, n_val=1, shard_size=3, size=8, grid=4))
    workers, k, n = 2, 7, 16
    full = list(itertools.islice(make_loader(_stream(info), 2, workers, 2, False), n))
    positions = np.zeros((workers, 2), np.int64)
    for batch in full[:k]:
        role, epoch, count = batch["position"][-1].tolist()
        positions[role] = (epoch, count)
    resumed = make_loader(_stream(info, positions=positions, role_offset=k % workers), 2, workers, 2, False)
    rest = list(itertools.islice(resumed, n - k))
    for a, b in zip(full[k:], rest, strict=True):
        assert a["id"] == b["id"] and torch.equal(a["position"], b["position"])
        assert torch.equal(a["target"], b["target"]) and torch.equal(a["features"], b["features"])
    # Two full epochs for both roles happened in between: the count really wrapped.
    assert Counter(int(b["position"][-1, 1]) for b in full).keys() >= {0, 1}


@pytest.mark.parametrize("render_format", ["webdataset", "zarr"])
def test_reads_the_render_column_of_the_render_stage(tmp_path, render_format):
    # The real producer: tests/datagen.py source layout -> pipeline.render_stage (Embree) -> column "render";
    # a features column (area-downsampled RGB) written beside it in Zarr.
    from datagen import make_source_dataset
    from pipeline.render_stage import RenderConfig, render_fields, render_shard

    from dualpm.images import load_image

    ds = make_source_dataset(tmp_path / "src", num_samples=4, image_size=32, val=1)
    root = tmp_path / "out"
    plan = plan_shards({"train": ds.ids[:3], "val": ds.ids[3:]}, 2)
    manifest = Manifest.create(str(ds.root), 2, plan)
    config = RenderConfig(str(ds.root), 16, 3, "cpu", 4, render_format, mask_size=(32, 32), image_size=(32, 32))
    render = ColumnInfo("render", render_format, SCHEMA_VERSION, config.to_json(), render_fields(config))
    feature_fields = {"features": FieldSpec("array", (3, 8, 8), "float16")}
    features = ColumnInfo("features", "zarr", SCHEMA_VERSION, {"extractor": "rgb", "dim": 3, "grid": 8},
                          feature_fields)
    manifest.columns.update(render=render, features=features)
    for name in manifest.columns:
        column_dir(root, name).mkdir(parents=True)
    publish_layout(root, manifest)
    for shard in plan:
        render.shards[shard.index] = render_shard(config, shard, str(column_dir(root, "render")))
        with ShardWriter(column_dir(root, "features"), shard, "zarr", feature_fields) as writer:
            for sample_id in shard.ids:
                rgb = load_image(ds.root / "renders" / f"{sample_id}_rgb.png")  # (3, H, W) in [0, 1]
                small = F.interpolate(rgb[None], size=(8, 8), mode="area")[0]
                writer.add(sample_id, {"features": small.numpy().astype(np.float16)})
        features.shards[shard.index] = writer.record
    save_manifest(root, manifest)

    info = open_dataset(root)
    assert (info.resolution, info.stored_layers, info.feature_channels) == ((16, 16), 3, 3)
    assert info.count("train") == 3 and info.count("val") == 1
    samples = list(ShardStream(info, "train", 2, (16, 16), seed=0, shuffle=False, infinite=False))
    assert [s["id"] for s in samples] == ds.ids[:3]
    for s in samples:
        # The source mask (32 x 32 uint8 0/255) area-resized to 16 x 16 agrees with the rendered coverage
        # except along the silhouette.
        coverage = s["target"][..., 0, 6]
        assert (s["mask"] != coverage).float().mean() < 0.1 and coverage.sum() > 10
        assert torch.isfinite(s["target"]).all() and s["features"].shape == (3, 16, 16)


def test_the_published_layout_in_every_mask_encoding_and_pose_dtype_reads_back(tmp_path, ray_local):
    # A published-layout dataset made here: masks 0/255, 0/1 and 1-bit, poses float64 and float32, packed
    # features, the published split file, an id skipped by the 5000 rule and one sample with an empty mask.
    import shutil

    from click.testing import CliRunner
    from datagen import MASK_ENCODINGS, POSE_DTYPES, make_source_dataset, save_mask

    from dualpm.masks import mask_iou
    from pipeline.cli import main

    ds = make_source_dataset(tmp_path / "src", num_samples=8, models=2, image_size=32, feature_channels=64,
                             feature_grid=4, mask_encodings=MASK_ENCODINGS, pose_dtypes=POSE_DTYPES)
    (ds.root / "train_benchmark.txt").write_text("".join(f"{i}\n" for i in ds.ids[:5]))
    for folder, suffix in (("poses", "_pose.npz"), ("cameras", "_camera.txt"), ("metadata", "_metadata.txt")):
        shutil.copy(ds.root / folder / f"{ds.ids[0]}{suffix}", ds.root / folder / f"005000{suffix}")
    empty = ds.ids[6]
    save_mask(ds.root / "masks" / f"{empty}_mask.png", np.zeros((32, 32), bool), "0-1")
    out = tmp_path / "out"
    stages = ((["render", "--resolution", "32", "--layers", "2"], "render: 7 samples written, 1 failed"),
              (["features", "--extractor", "precomputed", "--workers", "1"], "features: 8 samples"))
    for args, line in stages:
        result = CliRunner().invoke(main, [args[0], str(ds.root), str(out), *args[1:]])
        assert result.exit_code == 0 and line in result.output, result.output
        assert "source: 3 files not taken (3 multiple-of-5000)" in result.output
    info = open_dataset(out)
    assert info.manifest.split_rule["rule"] == "train_benchmark.txt"
    assert (info.count("train"), info.count("val")) == (5, 2)  # the empty-mask sample failed
    for split in ("train", "val"):
        for sample in ShardStream(info, split, 2, (32, 32), seed=0, shuffle=False, infinite=False):
            alpha = sample["target"][..., 0, 6].numpy() > 0
            assert alpha.sum() > 20 and mask_iou(sample["mask"].numpy() > 0, alpha) >= 0.99, sample["id"]
    failures = (out / "failures.jsonl").read_text()
    assert f"{empty}_mask.png: the mask is empty" in failures


# --- integrity --------------------------------------------------------------------------------------


def flip_bytes(path: Path, count: int = 64) -> None:
    """Flip `count` bytes in the middle of a file (what a bad disk or a stray write does)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for k in range(middle, middle + count):
        data[k] ^= 0x40  # finite but absurd float16 values (up to ~40,000): the old reader trained on them
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("features_format", ["zarr", "webdataset"])
def test_corrupt_feature_bytes_are_never_read(tmp_path, features_format):
    # Issue 18, item 1: 64 flipped bytes inside a features shard used to be trained on (values ~25,000).
    root = write_store(tmp_path, n_train=4, n_val=0, shard_size=4, formats=("webdataset", features_format))
    info = open_dataset(root)
    files = shard_files(root / "features", 0, features_format)
    flip_bytes(max((p for _, p in files), key=lambda p: p.stat().st_size))
    stream = ShardStream(info, "train", 2, (16, 16), seed=0, shuffle=False, infinite=False)
    with pytest.raises(DatasetError) as error:
        next(iter(stream))
    message = str(error.value)
    assert f"{root / 'features'} shard 0: data do not match the sha256 of its record" in message
    if features_format == "zarr":  # per-chunk checksums name the sample too
        assert "first damaged sample" in message and "field 'features' does not decode" in message


def test_a_required_field_missing_from_a_tar_is_an_error_not_replaced_by_the_alpha(tmp_path):
    # Issue 22, item 7: a tar shard without its `mask` members trained (exit 0) on the rendered alpha.
    # The shard is rewritten without them and its records updated, so checksums pass: the data lie.
    import io
    import tarfile

    from dualpm.data.reader import ShardStream
    from dualpm.store import load_manifest, shard_digest
    from dualpm.store.manifest import ShardRecord, write_record

    root = write_store(tmp_path / "data", n_train=8, n_val=0, shard_size=4)
    manifest = load_manifest(root)
    render = manifest.columns["render"]
    path = root / "render" / "shard-000001.tar"
    kept = io.BytesIO()
    with tarfile.open(path) as old, tarfile.open(fileobj=kept, mode="w") as new:
        for member in old:
            if member.name != "0005.mask.png":
                new.addfile(member, old.extractfile(member))
    path.write_bytes(kept.getvalue())
    sha256, nbytes = shard_digest(root / "render", 1, "webdataset")
    record = render.shards[1]
    render.shards[1] = ShardRecord(1, record.count, record.ids, record.failures, sha256, nbytes, "webdataset",
                                   record.schema_version)
    write_record(root / "render", render.shards[1])
    save_manifest(root, manifest)
    info = open_dataset(root)
    stream = ShardStream(info, "train", 2, (16, 16), seed=0, shuffle=False, infinite=False)
    with pytest.raises(DatasetError, match=r"render shard 1 sample '0005': required field 'mask' missing \(the "
                       r"column's fields say every sample has it\)"):
        list(stream)
