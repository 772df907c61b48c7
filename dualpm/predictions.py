"""The predictions store: what `dualpm-infer` writes and `dualpm-eval` (and the demo report) read.

    OUT/predictions.zarr    every prediction, dense (`PredictionsWriter` writes it, `open_predictions` reads it)
    OUT/samples/<id>/       per-sample files of dualpm-infer (PLYs, sheet, skeleton.json)

Kept points follow the reference rule (`keep_mask`): sigmoid(occupancy) > 0.5, inside the mask,
confidence >= 2.0 (both thresholds configurable, the ones used recorded in the store), and finite.
Producer and consumers import this module; it imports neither.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from dualpm.errors import DatasetError

PREDICTIONS = "predictions.zarr"
STORE_KEY = "dualpm_predictions"  # the store's attributes
STORE_VERSION = 1
SAMPLES = "samples"
OCCUPANCY_THRESHOLD = 0.5  # the reference inference rule: sigmoid(occupancy) > 0.5 and confidence >= 2
CONFIDENCE_THRESHOLD = 2.0
FLOAT16_MAX = float(np.finfo(np.float16).max)


class PredictionsError(DatasetError):
    """A predictions store that is missing, unreadable or of another version."""


@dataclass(frozen=True)
class PredictedMaps:
    """Dense predictions of B samples, float16 as stored (CPU numpy).

    canonical, posed: (B, L, 3, H, W) scene units (posed: camera space, view[2, 3] subtracted from z).
    occupancy: (B, L, H, W) sigmoid(occupancy logit) in [0, 1].
    confidence: (B, L, H, W) c >= 1, clamped to the float16 maximum (65504).
    mask: (B, H, W) uint8 0/1 object mask the prediction was made for.
    """

    canonical: np.ndarray
    posed: np.ndarray
    occupancy: np.ndarray
    confidence: np.ndarray
    mask: np.ndarray


MAP_NAMES = tuple(f.name for f in dataclasses.fields(PredictedMaps))


def keep_mask(
    maps: PredictedMaps, occupancy_threshold: float, confidence_threshold: float
) -> np.ndarray:
    """The reference inference rule: which predicted points are kept.

    Returns:
        (B, L, H, W) bool: sigmoid(occupancy) > occupancy_threshold, inside the mask, confidence >=
        confidence_threshold, and both points finite. Works on any leading batch shape.
    """
    finite = np.isfinite(maps.canonical).all(axis=-3) & np.isfinite(maps.posed).all(axis=-3)
    return (
        (maps.occupancy.astype(np.float32) > occupancy_threshold)
        & (maps.confidence.astype(np.float32) >= confidence_threshold)
        & (maps.mask[..., None, :, :] > 0)
        & finite
    )


def recorded_thresholds(preds: PredictionsReader) -> tuple[float, float]:
    """(occupancy, confidence) thresholds dualpm-infer recorded in `preds` (the defaults where it did not)."""
    return (float(preds.attrs.get("occupancy_threshold", OCCUPANCY_THRESHOLD)),
            float(preds.attrs.get("confidence_threshold", CONFIDENCE_THRESHOLD)))


def kept_counts(preds: PredictionsReader) -> np.ndarray:
    """(S,) int64 kept points of every sample of `preds`, under the thresholds dualpm-infer recorded."""
    occ, conf = recorded_thresholds(preds)
    return np.array([int(keep_mask(preds.sample(i), occ, conf).sum()) for i in range(len(preds))], dtype=np.int64)


def kept_points(maps: PredictedMaps, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(canonical (N, 3), posed (N, 3)) float32 of the kept points of ONE sample.

    Args:
        maps: one sample's maps (canonical/posed (L, 3, H, W)); keep: (L, H, W) bool from `keep_mask`.
    Points are ordered layer by layer, then in raster order.
    """
    canonical = np.moveaxis(maps.canonical, -3, -1)[keep]  # (L, H, W, 3) -> (N, 3)
    posed = np.moveaxis(maps.posed, -3, -1)[keep]
    return canonical.astype(np.float32), posed.astype(np.float32)


class PredictionsWriter:
    """Writer of `predictions.zarr` (Zarr v3), one batch at a time.

    Arrays (N samples, L layers, H x W pixels; one chunk per sample, zstd):
        ids (N,) str; canonical, posed (N, L, 3, H, W) float16; occupancy, confidence (N, L, H, W)
        float16; mask (N, H, W) uint8. Attributes under `STORE_KEY`: version, thresholds, mode
        (model / oracle), checkpoint, data / split or images / masks, model config, feature spec, ...
    Write it into a temporary folder (`fileio.atomic_directory`) so it appears whole or not at all.
    """

    def __init__(self, folder: Path, layers: int, resolution: tuple[int, int]):
        self.root = zarr.open_group(store=LocalStore(folder), mode="w", zarr_format=3)
        h, w = resolution
        shapes = {
            "canonical": ((layers, 3, h, w), "float16"),
            "posed": ((layers, 3, h, w), "float16"),
            "occupancy": ((layers, h, w), "float16"),
            "confidence": ((layers, h, w), "float16"),
            "mask": ((h, w), "uint8"),
        }
        self.arrays = {
            name: self.root.create_array(name, shape=(0, *shape), dtype=dtype, chunks=(1, *shape))
            for name, (shape, dtype) in shapes.items()
        }
        self.ids: list[str] = []

    def append(self, ids: list[str], maps: PredictedMaps) -> None:
        start, count = len(self.ids), len(ids)
        for name, array in self.arrays.items():
            array.resize((start + count, *array.shape[1:]))
            array[start : start + count] = getattr(maps, name)
        self.ids += ids

    def finish(self, attrs: dict[str, Any]) -> None:
        ids = self.root.create_array("ids", shape=(len(self.ids),), dtype=str, chunks=(max(1, len(self.ids)),))
        ids[...] = np.array(self.ids, dtype=str)
        self.root.attrs[STORE_KEY] = {"version": STORE_VERSION, **attrs}


@dataclass
class PredictionsReader:
    """An opened `predictions.zarr` (see `open_predictions`)."""

    path: Path
    ids: list[str]
    attrs: dict[str, Any]
    arrays: dict[str, Any]  # name -> zarr array

    def __len__(self) -> int:
        return len(self.ids)

    def sample(self, index: int) -> PredictedMaps:
        """The maps of sample `index` (canonical (L, 3, H, W), ..., mask (H, W))."""
        return PredictedMaps(**{name: self.arrays[name][index] for name in MAP_NAMES})


def open_predictions(path: str | Path) -> PredictionsReader:
    """Open the predictions written by `dualpm-infer` (the OUT folder or its `predictions.zarr`)."""
    path = Path(path)
    store_path = path if path.name == PREDICTIONS or (path / "zarr.json").exists() else path / PREDICTIONS
    if not (store_path / "zarr.json").is_file():
        raise PredictionsError(f"{path}: no {PREDICTIONS} here (write one with dualpm-infer --out {path})")
    try:
        root = zarr.open_group(store=LocalStore(store_path, read_only=True), mode="r")
        attrs = dict(root.attrs.get(STORE_KEY) or {})
        if attrs.get("version") != STORE_VERSION:
            raise PredictionsError(f"{store_path}: not a dualpm predictions store of version {STORE_VERSION}")
        ids = [str(i) for i in root["ids"][...]]
        arrays = {name: root[name] for name in MAP_NAMES}
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise PredictionsError(f"{store_path}: unreadable predictions store ({err})") from err
    if any(a.shape[0] != len(ids) for a in arrays.values()):
        raise PredictionsError(f"{store_path}: arrays and ids disagree on the number of samples")
    return PredictionsReader(store_path, ids, attrs, arrays)
