"""The predictions store: the keep rule on hand-made maps, kept points, and a write/read round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualpm.errors import DatasetError
from dualpm.predictions import (
    MAP_NAMES,
    PREDICTIONS,
    STORE_KEY,
    PredictedMaps,
    PredictionsError,
    PredictionsWriter,
    keep_mask,
    kept_points,
    open_predictions,
)


def maps_of(batch: int, layers: int, h: int, w: int, seed: int = 0) -> PredictedMaps:
    rng = np.random.default_rng(seed)
    return PredictedMaps(
        canonical=rng.standard_normal((batch, layers, 3, h, w)).astype(np.float16),
        posed=rng.standard_normal((batch, layers, 3, h, w)).astype(np.float16),
        occupancy=rng.random((batch, layers, h, w)).astype(np.float16),
        confidence=(1 + 3 * rng.random((batch, layers, h, w))).astype(np.float16),
        mask=(rng.random((batch, h, w)) > 0.3).astype(np.uint8),
    )


def test_keep_rule_occupancy_above_confidence_at_least_inside_mask_and_finite():
    # One sample, one layer, 1 x 6 pixels; pixel 0 passes every test, each other pixel fails one.
    occupancy = np.array([0.6, 0.5, 0.9, 0.9, 0.9, 0.9], np.float16)  # pixel 1: not above 0.5
    confidence = np.array([2.0, 3.0, 1.5, 3.0, 3.0, 3.0], np.float16)  # pixel 2: below 2; pixel 0: exactly 2
    mask = np.array([1, 1, 1, 0, 1, 1], np.uint8)  # pixel 3: outside
    canonical = np.zeros((3, 6), np.float16)
    posed = np.zeros((3, 6), np.float16)
    canonical[1, 4] = np.nan  # pixel 4: a canonical coordinate is NaN
    posed[2, 5] = np.inf  # pixel 5: a posed coordinate is infinite
    maps = PredictedMaps(canonical[None, :, None], posed[None, :, None], occupancy[None, None],
                         confidence[None, None], mask[None])  # (L=1, 3, 1, 6), ..., mask (1, 6)
    keep = keep_mask(maps, 0.5, 2.0)
    assert keep.shape == (1, 1, 6)
    assert keep[0, 0].tolist() == [True, False, False, False, False, False]
    # A leading batch axis works the same.
    batched = PredictedMaps(*(getattr(maps, n)[None] for n in MAP_NAMES))
    np.testing.assert_array_equal(keep_mask(batched, 0.5, 2.0)[0], keep)


def test_kept_points_are_float32_layer_by_layer_in_raster_order():
    maps = PredictedMaps(*(getattr(maps_of(1, 2, 3, 4), n)[0] for n in MAP_NAMES))
    keep = np.zeros((2, 3, 4), bool)
    keep[1, 0, 2] = keep[0, 2, 3] = keep[0, 1, 0] = True
    canonical, posed = kept_points(maps, keep)
    assert canonical.dtype == posed.dtype == np.float32 and canonical.shape == posed.shape == (3, 3)
    order = [(0, 1, 0), (0, 2, 3), (1, 0, 2)]  # (layer, row, column)
    np.testing.assert_array_equal(canonical, [maps.canonical[layer, :, i, j] for layer, i, j in order])
    np.testing.assert_array_equal(posed, [maps.posed[layer, :, i, j] for layer, i, j in order])


def test_store_round_trip_in_batches(tmp_path):
    first, second = maps_of(2, 3, 5, 4, seed=1), maps_of(1, 3, 5, 4, seed=2)
    store = PredictionsWriter(tmp_path / PREDICTIONS, layers=3, resolution=(5, 4))
    store.append(["a", "b"], first)
    store.append(["c"], second)
    store.finish({"mode": "oracle", "occupancy_threshold": 0.5})
    for where in (tmp_path, tmp_path / PREDICTIONS):  # the OUT folder or the store itself
        opened = open_predictions(where)
        assert opened.ids == ["a", "b", "c"] and len(opened) == 3 and opened.path == tmp_path / PREDICTIONS
        assert opened.attrs == {"version": 1, "mode": "oracle", "occupancy_threshold": 0.5}
        for name in MAP_NAMES:
            stored = opened.arrays[name][...]
            want = np.concatenate([getattr(first, name), getattr(second, name)])
            assert stored.dtype == want.dtype
            np.testing.assert_array_equal(stored, want)
        np.testing.assert_array_equal(opened.sample(2).canonical, second.canonical[0])


def test_missing_or_foreign_stores_are_refused_by_name(tmp_path):
    with pytest.raises(PredictionsError, match=f"no {PREDICTIONS} here"):
        open_predictions(tmp_path)
    store = PredictionsWriter(tmp_path / PREDICTIONS, layers=1, resolution=(2, 2))
    store.append(["a"], maps_of(1, 1, 2, 2))
    store.finish({})
    meta = tmp_path / PREDICTIONS / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"][STORE_KEY]["version"] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="not a dualpm predictions store of version 1"):
        open_predictions(tmp_path)
