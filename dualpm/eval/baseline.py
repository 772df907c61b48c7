"""The constant-predictor baseline: the same dual point map for every image, from the training targets.

Per pixel and layer, over the TRAIN split's render column: the mean canonical and the mean posed point of
the training samples occupied there, and the occupancy frequency (the fraction of training samples
occupied there). Applied to a test sample, it keeps the points where the frequency exceeds one half,
inside that sample's mask: the best a model that ignores the image could do per pixel, so every report
shows how far above trivial the model is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dualpm.errors import DatasetError
from dualpm.store.access import open_store
from dualpm.pointmaps import POINTS, hits

FREQUENCY_THRESHOLD = 0.5


@dataclass(frozen=True, eq=False)
class ConstantBaseline:
    """canonical, posed: (L, 3, H, W) float32 mean points (0 where no training sample is occupied), scene
    units; frequency: (L, H, W) float32 in [0, 1]; samples: training samples averaged."""

    canonical: np.ndarray
    posed: np.ndarray
    frequency: np.ndarray
    samples: int

    def predict(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The baseline's prediction for one test sample.

        Args:
            mask: (H, W) bool or 0/1 object mask of the test sample.
        Returns:
            canonical (L, 3, H, W), posed (L, 3, H, W) float32 and keep (L, H, W) bool: frequency > 0.5
            inside the mask.
        """
        keep = (self.frequency > FREQUENCY_THRESHOLD) & (np.asarray(mask)[None] > 0)
        return self.canonical, self.posed, keep


def nearest_resample(dpm: np.ndarray, resolution: tuple[int, int]) -> np.ndarray:
    """(H0, W0, ...) -> (H, W, ...) by nearest pixel centres (never blends points across depth edges); the
    same sampling the training reader uses when the training resolution differs from the stored one."""
    if dpm.shape[:2] == tuple(resolution):
        return dpm
    rows = np.minimum(((np.arange(resolution[0]) + 0.5) * dpm.shape[0] / resolution[0]).astype(np.int64),
                      dpm.shape[0] - 1)
    cols = np.minimum(((np.arange(resolution[1]) + 0.5) * dpm.shape[1] / resolution[1]).astype(np.int64),
                      dpm.shape[1] - 1)
    return dpm[rows][:, cols]


def fit_constant_baseline(
    root: str | Path, layers: int, resolution: tuple[int, int], split: str = "train"
) -> ConstantBaseline:
    """Average the render column of `split` of the prepared dataset `root`.

    Args:
        layers: L, the (nearest) layers to average; resolution: (H, W) of the predictions it is compared
            with (stored maps are resampled by nearest pixel, as for training).
    Raises DatasetError when the split has no finished render shard or no sample.
    """
    store = open_store(root)
    root = store.where
    manifest = store.load_manifest()
    if "render" not in manifest.columns:
        raise DatasetError(f"{root}: no render column: the baseline averages the training targets")
    column = manifest.columns["render"]
    folder = store.column_where("render")
    h, w = resolution
    sums = np.zeros((h, w, layers, 6), np.float64)
    counts = np.zeros((h, w, layers), np.int64)
    samples = 0
    for plan in (p for p in manifest.plan if p.split == split):
        if store.shard_problem(column, plan.index) is not None or plan.index not in column.shards:
            continue  # an unfinished shard: the reader skips it too
        for sample_id, fields in store.read_shard(column, plan.index):  # sha256 checked first
            if "dpm" not in fields:
                raise DatasetError(f"{folder}: shard {plan.index} sample {sample_id!r} has no 'dpm' field")
            dpm = nearest_resample(fields["dpm"], resolution)[:, :, :layers]
            occupied = hits(dpm)  # (H, W, l) with l <= layers stored
            stored = dpm.shape[2]
            sums[:, :, :stored] += np.where(occupied[..., None], dpm[..., POINTS], 0.0)
            counts[:, :, :stored] += occupied
            samples += 1
    if samples == 0:
        raise DatasetError(f"{root}: no finished {split!r} sample in the render column to fit the baseline on")
    mean = sums / np.maximum(counts, 1)[..., None]  # (H, W, L, 6)
    mean = np.moveaxis(mean, (2, 3), (0, 1)).astype(np.float32)  # (L, 6, H, W)
    frequency = np.moveaxis(counts / samples, 2, 0).astype(np.float32)  # (L, H, W)
    return ConstantBaseline(mean[:, :3], mean[:, 3:], frequency, samples)
