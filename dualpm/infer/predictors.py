"""From a checkpoint to predictions: the model (or the oracle), and the features for raw images.

A predictor maps a `Batch` to `PredictedMaps` (float16, as stored): `ModelPredictor` runs the trained
network (optionally averaged with its mirrored prediction), `OraclePredictor` returns the ground truth.
`build_image_features` rebuilds the extractor and PCA basis the model was trained with, from the
checkpoint alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualpm.data.augment import mirror_prediction
from dualpm.errors import ConfigError
from dualpm.features import FeatureBasis, FeatureSpec, build_extractor, check_basis, fit_basis
from dualpm.features.column import VOLATILE
from dualpm.infer import InferError
from dualpm.infer.batches import Batch
from dualpm.model import DualPMNet, NetworkOutput
from dualpm.predictions import FLOAT16_MAX, PredictedMaps
from dualpm.train.checkpoint import FEATURE_BASIS, CheckpointError, find_checkpoint, load_weights
from dualpm.train.config import Config, config_from_dict
from dualpm.pointmaps import to_channel_first

# Features column config keys that say where or how fast features were computed, not what they are:
# those that may differ between runs of one column, the store's schema version, and the basis file's
# name (the basis itself is compared through `basis_sha256`).
FEATURE_VOLATILE = frozenset(VOLATILE) | {"schema_version", "basis"}


def _half(x: torch.Tensor) -> np.ndarray:
    return x.float().clamp(-FLOAT16_MAX, FLOAT16_MAX).cpu().numpy().astype(np.float16)


class ModelPredictor:
    """A trained DualPMNet on `device`; bf16 autocast on CUDA when `bf16`. With `mirror_axis` (the
    canonical axis the model was trained to mirror, see dualpm.data.augment) every map is the mean of the
    direct prediction and the mirrored image's prediction mirrored back (occupancy: mean probability)."""

    def __init__(self, model: DualPMNet, device: torch.device, bf16: bool, mirror_axis: int | None = None):
        self.model, self.device, self.bf16 = model.to(device).eval(), device, bf16
        self.mirror_axis = mirror_axis

    def _forward(self, feats: torch.Tensor) -> NetworkOutput:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(feats)

    @torch.inference_mode()
    def __call__(self, batch: Batch) -> PredictedMaps:
        feats = batch.features.to(self.device, non_blocking=True)
        pred = self._forward(feats)
        canonical, posed = pred.canonical, pred.posed
        occupancy, confidence = torch.sigmoid(pred.occupancy_logit), pred.confidence
        if self.mirror_axis is not None:
            back = mirror_prediction(self._forward(feats.flip(-1)), self.mirror_axis)
            canonical, posed = (canonical + back.canonical) / 2, (posed + back.posed) / 2
            occupancy = (occupancy + torch.sigmoid(back.occupancy_logit)) / 2
            confidence = (confidence + back.confidence) / 2
        # NaN stays NaN (and is never kept); only finite overflow is clamped into float16.
        return PredictedMaps(
            canonical=_half(canonical),
            posed=_half(posed),
            occupancy=_half(occupancy),
            confidence=_half(confidence),
            mask=batch.mask.numpy().astype(np.uint8),
        )


class OraclePredictor:
    """The ground truth as a prediction (all stored layers), optionally with seeded Gaussian noise of
    `noise` scene units on every point: a perfect model, to check evaluation and skeleton fitting."""

    def __init__(self, noise: float, seed: int):
        self.noise = noise
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: Batch) -> PredictedMaps:
        maps = to_channel_first(batch.target)  # canonical/posed (B, L, 3, H, W), alpha (B, L, H, W)
        canonical, posed = maps.canonical.numpy(), maps.posed.numpy()
        if self.noise > 0:
            canonical = canonical + self.noise * self.rng.standard_normal(canonical.shape, dtype=np.float32)
            posed = posed + self.noise * self.rng.standard_normal(posed.shape, dtype=np.float32)
        occupied = maps.alpha.numpy() > 0.5
        return PredictedMaps(
            canonical=canonical.astype(np.float16),
            posed=posed.astype(np.float16),
            occupancy=occupied.astype(np.float16),
            confidence=np.where(occupied, FLOAT16_MAX, 1.0).astype(np.float16),
            mask=batch.mask.numpy().astype(np.uint8),
        )


# ---- checkpoint, features, meshes --------------------------------------------------------------------------


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file, or a run folder meaning its latest checkpoint."""
    if path.is_dir():
        found = find_checkpoint(path, "auto")
        if found is None:
            raise InferError(f"{path}: a folder without checkpoints/latest.pt; give a run folder or a .pt file")
        return found
    return path


def load_model(state: dict[str, Any], where: Path) -> tuple[DualPMNet, Config]:
    """The network of a training checkpoint, weights loaded, on the CPU."""
    try:
        config = config_from_dict(state["config"])
        model = DualPMNet(config.model)
        load_weights(model, state["model"], where)
    except KeyError as err:
        raise InferError(f"{where}: the checkpoint's model does not load (no entry {err})") from err
    except CheckpointError as err:
        raise InferError(str(err)) from err
    if config.data.resolution is None:
        raise InferError(f"{where}: the checkpoint does not record the training resolution")
    return model, config


def feature_differences(trained: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """Differences between two features column configs that change the features themselves."""
    keys = sorted((set(trained) | set(given)) - FEATURE_VOLATILE)
    return [f"{k}: {trained.get(k)!r} (trained) vs {given.get(k)!r}" for k in keys if trained.get(k) != given.get(k)]


def build_image_features(
    state: dict[str, Any], where: Path, device: torch.device, sd_model: str | None, dino_model: str | None
) -> tuple[Any, FeatureBasis]:
    """The extractor and PCA basis the checkpoint's model was trained with (weights folders may be moved:
    `sd_model` / `dino_model` override the recorded paths; other weights are refused by `check_basis`)."""
    config = state.get("features")
    if not isinstance(config, dict) or "extractor" not in config:
        raise InferError(f"{where}: the checkpoint records no feature spec; it cannot be run on raw images")
    fields = {f.name for f in dataclasses.fields(FeatureSpec)} | {"spec_version"}
    raw = {k: v for k, v in config.items() if k in fields}
    if raw["extractor"] == "precomputed":
        raise InferError(
            f"{where}: the model was trained on the dataset's precomputed packed features, which cannot be "
            "made from raw images; run it on a prepared dataset (--data) instead"
        )
    for key, value in (("sd_path", sd_model), ("dino_path", dino_model)):
        if value is not None:
            if key not in raw:
                raise ConfigError(f"--{key[:-5]}-model does not apply to {raw['extractor']!r} features")
            raw[key] = str(Path(value).expanduser().resolve())
    try:
        spec = FeatureSpec.from_dict(raw)
    except ConfigError as err:
        raise InferError(f"{where}: the checkpoint's feature spec is not usable ({err})") from err
    extractor = build_extractor(spec, device)
    embedded = state.get(FEATURE_BASIS)
    if config.get("basis"):
        if not isinstance(embedded, dict):
            raise InferError(
                f"{where}: the checkpoint lacks the features' PCA basis (written before checkpoints carried "
                "it); retrain, or resume the run for one step to write a checkpoint that carries it"
            )
        basis = FeatureBasis.from_tensors(embedded["tensors"], embedded["meta"], source=f"{where}: feature basis")
        expected = config.get("basis_sha256")
        if expected and basis.content_hash() != expected:
            raise InferError(f"{where}: the embedded feature basis is not the one the features were made with")
    else:
        basis = fit_basis(extractor, lambda: [])  # no PCA stages (rgb): the identity basis
    check_basis(basis, extractor, source=f"{where}: feature basis")  # other weights or spec: a clear error
    return extractor, basis
