"""`dualpm-infer`: run a trained DualPM model on a prepared dataset split or on a folder of images.

    dualpm-infer --checkpoint runs/demo --data out/demo --split val --out pred/demo
    dualpm-infer --checkpoint runs/demo/checkpoints/latest.pt --images photos/ --masks masks/ --out pred/photos
    dualpm-infer --oracle --data out/demo --out pred/oracle    # ground truth as the prediction: checks eval

Outputs, in OUT:

    predictions.zarr/               every prediction, dense (what dualpm-eval reads; see `PredictionStore`)
    samples/<id>/canonical.ply      kept points in canonical space, coloured by their canonical xyz
    samples/<id>/posed.ply          the same points posed (camera space, depth subtracted), same colours
    samples/<id>/sheet.png          input, mask, then per layer: canonical colours, depth, confidence
    samples/<id>/skeleton.json      with --skeleton: per-joint canonical -> posed transforms
    samples/<id>/reposed.ply        with --skeleton: the template mesh posed by those transforms
    failures.jsonl                  samples (or steps of them) that could not be done, and why
    infer.config.yaml               the resolved configuration

Kept points follow the reference rule: sigmoid(occupancy) > 0.5, inside the mask, confidence >= 2.0
(both thresholds configurable), and finite. A model trained with left-right mirroring predicts each image
twice, directly and mirrored, and stores the mean (`--mirror-average`, on by default for such models).
Every kept point, PLY and sheet is derived from the float16 values stored in the Zarr, so the files and
what dualpm-eval measures agree exactly.

Inputs: `--data` reads the dataset's stored features (the model's training resolution, as the trainer
decodes them). `--images/--masks` pairs files by stem (`<id>.png` or `<id>_rgb.png` with `<id>.png` or
`<id>_mask.png`), runs the feature extractor of the checkpoint's feature spec with the PCA basis carried
by the checkpoint, and upsamples the features as the trainer does; a sample whose mask is missing or whose
image cannot be read is listed in failures.jsonl and the others are processed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import numpy as np
import torch
import torch.nn.functional as F
import zarr
from tqdm import tqdm
from zarr.storage import LocalStore

from dualpm.cliutils import handles_user_errors, show_and_save_config
from dualpm.data.augment import mirror_prediction
from dualpm.data.reader import DatasetInfo, ShardStream, decode_sample, open_dataset
from dualpm.data.source import Layout
from dualpm.errors import BackendUnavailable, ConfigError, DatasetError, DualPMError
from dualpm.eval.skeleton import (
    JointFit,
    estimate_joint_transforms,
    joint_parents,
    repose_vertices,
    save_skeleton_json,
    skin_weights_at,
)
from dualpm.features import FeatureBasis, FeatureSpec, build_extractor, check_basis, extract, fit_basis
from dualpm.fileio import atomic_directory, atomic_output, atomic_write_text, safe_join
from dualpm.gltf import SkinnedMesh, load_skinned_mesh
from dualpm.images import load_image, stack_images
from dualpm.loss import split_target
from dualpm.masks import INSIDE, read_mask, resize_mask
from dualpm.model import DualPMNet, Prediction, describe
from dualpm.pointcloud import write_mesh_ply, write_ply
from dualpm.store import StoredSample, load_manifest
from dualpm.train.checkpoint import FEATURE_BASIS, find_checkpoint, load_checkpoint
from dualpm.train.config import Config, config_from_dict
from dualpm.viz import canonical_to_rgb, depth_to_rgb, image_grid

PREDICTIONS = "predictions.zarr"
STORE_KEY = "dualpm_predictions"  # the store's attributes
STORE_VERSION = 1
SAMPLES = "samples"
FAILURES = "failures.jsonl"
OCCUPANCY_THRESHOLD = 0.5  # reference inference rule (DESIGN.md)
CONFIDENCE_THRESHOLD = 2.0
SKIN_MAX_DISTANCE = 0.5  # reference skeleton script: canonical points farther from the template are outliers
FLOAT16_MAX = float(np.finfo(np.float16).max)
SHEET_CELL = 128  # smallest tile side of the sheets, pixels
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
STEM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # usable as a folder name; no path separators
# Feature column config keys that say where or how fast features were computed, not what they are.
FEATURE_VOLATILE = frozenset(
    {"sd_path", "dino_path", "cuda_bf16", "batch", "device", "threads", "tool_version", "schema_version", "basis"}
)
T = TypeVar("T")


class InferError(DualPMError):
    """Inference inputs that cannot be used together (checkpoint, dataset, images, mesh)."""


# ---- predictions: thresholds, the Zarr store ---------------------------------------------------------


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


def kept_points(maps: PredictedMaps, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(canonical (N, 3), posed (N, 3)) float32 of the kept points of ONE sample.

    Args:
        maps: one sample's maps (canonical/posed (L, 3, H, W)); keep: (L, H, W) bool from `keep_mask`.
    Points are ordered layer by layer, then in raster order.
    """
    canonical = np.moveaxis(maps.canonical, -3, -1)[keep]  # (L, H, W, 3) -> (N, 3)
    posed = np.moveaxis(maps.posed, -3, -1)[keep]
    return canonical.astype(np.float32), posed.astype(np.float32)


class PredictionStore:
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
class Predictions:
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


def open_predictions(path: str | Path) -> Predictions:
    """Open the predictions written by `dualpm-infer` (the OUT folder or its `predictions.zarr`)."""
    path = Path(path)
    store_path = path if path.name == PREDICTIONS or (path / "zarr.json").exists() else path / PREDICTIONS
    if not (store_path / "zarr.json").is_file():
        raise InferError(f"{path}: no {PREDICTIONS} here (write one with dualpm-infer --out {path})")
    try:
        root = zarr.open_group(store=LocalStore(store_path, read_only=True), mode="r")
        attrs = dict(root.attrs.get(STORE_KEY) or {})
        if attrs.get("version") != STORE_VERSION:
            raise InferError(f"{store_path}: not a dualpm predictions store of version {STORE_VERSION}")
        ids = [str(i) for i in root["ids"][...]]
        arrays = {name: root[name] for name in MAP_NAMES}
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise InferError(f"{store_path}: unreadable predictions store ({err})") from err
    if any(a.shape[0] != len(ids) for a in arrays.values()):
        raise InferError(f"{store_path}: arrays and ids disagree on the number of samples")
    return Predictions(store_path, ids, attrs, arrays)


# ---- inputs -------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """B input samples. features: (B, C, H, W) float32 CPU (None for the oracle); mask: (B, H, W) float32
    in {0, 1}; target: (B, H, W, L, 7) ground truth (oracle only); images: (h, w, 3) uint8 inputs for the
    sheets, or None; meta: per sample, the render column's meta (dataset) or {} (images)."""

    ids: list[str]
    features: torch.Tensor | None
    mask: torch.Tensor
    target: torch.Tensor | None
    images: list[np.ndarray | None]
    meta: list[dict[str, Any]]


def prefetch(items: Iterator[T]) -> Iterator[T]:
    """Yield from `items`, producing the next item in a background thread while the caller works on this
    one (decoding PNGs and dual point maps releases the GIL)."""
    done = object()
    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
        future = pool.submit(next, items, done)
        while (item := future.result()) is not done:
            future = pool.submit(next, items, done)
            yield item


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def dataset_batches(
    info: DatasetInfo, split: str, layers: int, resolution: tuple[int, int], batch: int, limit: int,
    with_target: bool,
) -> Iterator[Batch]:
    """Batches of a dataset split in plan order, decoded as the trainer decodes them.

    layers, resolution: what the model predicts (the target is cut and resampled to them).
    limit: at most this many samples (0: all).
    """
    stream = ShardStream(info, split, layers, resolution, seed=0, shuffle=False, infinite=False)
    records = stream.records(epoch=0, consumer=0, consumers=1)
    if limit:
        records = itertools.islice(records, limit)

    def decoded(chunk: list[tuple[int, str, StoredSample, StoredSample]]) -> Batch:
        samples, images, meta = [], [], []
        for shard, sample_id, fields, feats in chunk:
            where = f"{info.root}: shard {shard} sample {sample_id!r}"
            samples.append(decode_sample(fields, feats, layers, resolution, where))
            images.append(fields["rgb"] if "rgb" in fields else None)
            meta.append(fields.get("meta") or {})
        return Batch(
            ids=[r[1] for r in chunk],
            features=torch.stack([s["features"] for s in samples]),
            mask=torch.stack([s["mask"] for s in samples]),
            target=torch.stack([s["target"] for s in samples]) if with_target else None,
            images=images,
            meta=meta,
        )

    return (decoded(chunk) for chunk in _chunks(records, batch))


def pair_images(images_dir: Path, masks_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[dict[str, str]]]:
    """Pair image and mask files by id and list what cannot be paired.

    The id of `photo.png` and of `photo_rgb.png` is "photo"; its mask is `photo.png` or `photo_mask.png`
    (any image suffix) in `masks_dir`. Returns ([(id, image, mask)] sorted by id, failures).
    """
    def files(folder: Path, tag: str) -> dict[str, list[Path]]:
        if not folder.is_dir():
            raise InferError(f"{folder}: folder not found")
        found: dict[str, list[Path]] = {}
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                stem = path.stem[: -len(tag)] if path.stem.endswith(tag) and path.stem != tag else path.stem
                found.setdefault(stem, []).append(path)
        return found

    images, masks = files(images_dir, "_rgb"), files(masks_dir, "_mask")
    pairs, failures = [], []
    for sample_id, paths in sorted(images.items()):
        where = {"id": sample_id, "image": str(paths[0])}
        if not STEM_RE.match(sample_id):
            failures.append(where | {"reason": f"{paths[0].name}: the file name is not usable as a sample id "
                                               "(letters, digits, '.', '_' and '-' only)"})
        elif len(paths) > 1:
            failures.append(where | {"reason": f"several images for one id: {', '.join(p.name for p in paths)}"})
        elif sample_id not in masks:
            failures.append(where | {"reason": f"no mask {sample_id}.png or {sample_id}_mask.png in {masks_dir}"})
        elif len(masks[sample_id]) > 1:
            names = ", ".join(p.name for p in masks[sample_id])
            failures.append(where | {"reason": f"several masks for one id: {names}"})
        else:
            pairs.append((sample_id, paths[0], masks[sample_id][0]))
    return pairs, failures


def image_batches(
    pairs: list[tuple[str, Path, Path]], extractor: Any, basis: FeatureBasis, resolution: tuple[int, int],
    batch: int, failures: list[dict[str, str]],
) -> Iterator[Batch]:
    """Batches of raw images turned into model inputs: features by the checkpoint's extractor and basis,
    upsampled bilinearly to `resolution` (as the trainer upsamples stored features). Unreadable images
    or masks are appended to `failures` and skipped."""

    def load(chunk: list[tuple[str, Path, Path]]) -> list[tuple[str, torch.Tensor, torch.Tensor, Path]]:
        loaded = []
        for sample_id, image_path, mask_path in chunk:
            try:
                mask = torch.from_numpy(read_mask(mask_path))  # (h, w) float32 in [0, 1]
                if not bool((mask > INSIDE).any()):
                    raise DatasetError(f"{mask_path}: the mask is empty (no pixel inside): nothing to predict")
                loaded.append((sample_id, load_image(image_path), mask, image_path))
            except DatasetError as err:  # missing, truncated, not an image, empty mask: this sample's failure
                failures.append({"id": sample_id, "image": str(image_path), "reason": str(err)})
        return loaded

    size = extractor.input_size
    for loaded in prefetch(load(chunk) for chunk in _chunks(pairs, batch)):
        if not loaded:
            continue
        images = stack_images([im for _, im, _, _ in loaded], size).to(extractor.device)
        masks = stack_images([m[None] for _, _, m, _ in loaded], size).to(extractor.device)
        feats = extract(extractor, basis, images, masks).float()  # (B, C, g, g)
        if tuple(feats.shape[-2:]) != tuple(resolution):
            feats = F.interpolate(feats, size=tuple(resolution), mode="bilinear", align_corners=False)
        yield Batch(
            ids=[s for s, _, _, _ in loaded],
            features=feats.cpu(),
            mask=torch.stack([resize_mask(m, resolution) for _, _, m, _ in loaded]),
            target=None,
            images=[(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for _, im, _, _ in loaded],
            meta=[{"image": str(p)} for _, _, _, p in loaded],
        )


# ---- predictors ------------------------------------------------------------------------------------------


def _half(x: torch.Tensor) -> np.ndarray:
    return x.float().clamp(-FLOAT16_MAX, FLOAT16_MAX).cpu().numpy().astype(np.float16)


class ModelPredictor:
    """A trained DualPMNet on `device`; bf16 autocast on CUDA when `bf16`. With `mirror_axis` (the
    canonical axis the model was trained to mirror, see dualpm.data.augment) every map is the mean of the
    direct prediction and the mirrored image's prediction mirrored back (occupancy: mean probability)."""

    def __init__(self, model: DualPMNet, device: torch.device, bf16: bool, mirror_axis: int | None = None):
        self.model, self.device, self.bf16 = model.to(device).eval(), device, bf16
        self.mirror_axis = mirror_axis

    def _forward(self, feats: torch.Tensor) -> Prediction:
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
        maps = split_target(batch.target)  # canonical/posed (B, L, 3, H, W), alpha (B, L, H, W)
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
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as err:
        raise InferError(f"{where}: the checkpoint's model does not load ({err})") from err
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


class MeshSource:
    """Template meshes for skeleton fitting: one `--mesh` for every sample, or the dataset source's mesh
    of each sample's model (meta.json `model_name`). Meshes are loaded once."""

    def __init__(self, mesh: Path | None, source: Path | None):
        self.mesh, self.source = mesh, source
        self.cache: dict[Path, SkinnedMesh] = {}

    def for_sample(self, meta: dict[str, Any]) -> SkinnedMesh:
        if self.mesh is not None:
            path = self.mesh
        elif self.source is not None and meta.get("model_name"):
            path = Layout(self.source).mesh(str(meta["model_name"]))
        else:
            raise InferError("no template mesh for this sample: pass --mesh PATH (or --source with --data)")
        if path not in self.cache:
            self.cache[path] = load_skinned_mesh(path)
        return self.cache[path]


def fit_skeleton(canonical: np.ndarray, posed: np.ndarray, mesh: SkinnedMesh) -> JointFit:
    """Per-joint rigid transforms from predicted point pairs (reference skeleton estimation).

    Args:
        canonical, posed: (N, 3) float kept point pairs, scene units.
        mesh: the template whose skin weights (nearest vertex, outliers beyond `SKIN_MAX_DISTANCE`
            dropped) say which joint moves each point.
    """
    weights = skin_weights_at(canonical, mesh, k=1, max_distance=SKIN_MAX_DISTANCE)
    return estimate_joint_transforms(canonical, posed, weights, parents=joint_parents(mesh))


# ---- per-sample outputs ------------------------------------------------------------------------------


def prediction_sheet(
    image: np.ndarray | None, maps: PredictedMaps, keep: np.ndarray, title: str
) -> Any:
    """PIL picture of one prediction: input (if any), mask, then per layer canonical colours, depth (posed z)
    and log confidence of the kept points. maps: one sample (L, 3, H, W); keep: (L, H, W) bool."""
    canonical = np.moveaxis(maps.canonical.astype(np.float32), -3, -1)  # (L, H, W, 3)
    depth = maps.posed[:, 2].astype(np.float32)  # (L, H, W)
    log_conf = np.log(maps.confidence.astype(np.float32))
    kept = canonical[keep]
    bbox = np.stack([kept.min(0), kept.max(0)]) if len(kept) else None  # one colour box for all layers
    limits = (float(depth[keep].min()), float(depth[keep].max())) if keep.any() else None
    conf_limits = (float(log_conf[keep].min()), float(log_conf[keep].max())) if keep.any() else None
    tiles = [image] if image is not None else [np.zeros(maps.mask.shape, np.uint8)]
    labels = [f"{title} input"]
    tiles += [maps.mask.astype(bool), np.round(maps.occupancy[0].astype(np.float32) * 255).astype(np.uint8)]
    labels += ["mask", "L1 occupancy"]
    for layer in range(len(keep)):
        tiles += [
            canonical_to_rgb(canonical[layer], bbox, keep[layer]),
            depth_to_rgb(depth[layer], keep[layer], limits=limits),
            depth_to_rgb(log_conf[layer], keep[layer], cmap="magma", limits=conf_limits),
        ]
        labels += [f"L{layer + 1} canonical", f"L{layer + 1} depth", f"L{layer + 1} log conf."]
    # Tiles at least SHEET_CELL pixels wide: low-resolution maps are scaled up, and the labels fit.
    return image_grid(tiles, labels, columns=3, cell=max(SHEET_CELL, *maps.mask.shape))


@dataclass(frozen=True)
class OutputOptions:
    ply: bool
    sheets: bool
    skeleton: bool
    occupancy_threshold: float
    confidence_threshold: float


def write_sample(
    folder: Path, sample_id: str, maps: PredictedMaps, image: np.ndarray | None, meta: dict[str, Any],
    options: OutputOptions, meshes: MeshSource | None,
) -> list[dict[str, str]]:
    """Write one sample's PLYs, sheet and skeleton into `folder`; returns failures of optional steps."""
    keep = keep_mask(maps, options.occupancy_threshold, options.confidence_threshold)
    canonical, posed = kept_points(maps, keep)
    colours = canonical_to_rgb(canonical) if len(canonical) else np.zeros((0, 3), np.uint8)
    if options.ply:
        write_ply(folder / "canonical.ply", canonical, colours)
        write_ply(folder / "posed.ply", posed, colours)
    if options.sheets:
        with atomic_output(folder / "sheet.png") as tmp:
            prediction_sheet(image, maps, keep, sample_id).save(tmp, format="PNG", compress_level=1)  # 4x faster
    if not options.skeleton:
        return []
    try:
        mesh = meshes.for_sample(meta)
        fit = fit_skeleton(canonical, posed, mesh)
    except DualPMError as err:  # no mesh, too few points: the skeleton of this sample only
        return [{"id": sample_id, "step": "skeleton", "reason": str(err)}]
    names = [mesh.node_names[n] or f"joint{j}" for j, n in enumerate(mesh.joint_nodes)]
    save_skeleton_json(folder / "skeleton.json", fit.transforms, fit.valid, names, fit.residual)
    reposed = repose_vertices(mesh.vertices, mesh.joints, mesh.weights, fit.transforms)
    write_mesh_ply(folder / "reposed.ply", reposed, mesh.faces, canonical_to_rgb(mesh.vertices))
    return []


# ---- the command -------------------------------------------------------------------------------------------


def choose_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda: torch sees no CUDA GPU here; use --device cpu (or auto)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _check_inputs(checkpoint: Path | None, oracle: bool, data: Path | None, images: Path | None,
                  masks: Path | None, skeleton: bool, mesh: Path | None) -> None:
    if (checkpoint is None) == (not oracle):
        raise ConfigError("give exactly one of --checkpoint (a trained model) and --oracle (the ground truth)")
    if (data is None) == (images is None):
        raise ConfigError("give exactly one input: --data DATASET (a prepared dataset) or --images DIR --masks DIR")
    if (images is None) != (masks is None):
        raise ConfigError("--images and --masks go together: every image needs its object mask")
    if oracle and data is None:
        raise ConfigError("--oracle reads the ground truth of a prepared dataset: give --data")
    if skeleton and images is not None and mesh is None:
        raise ConfigError("--skeleton on raw images needs the template: --mesh PATH (a skinned glTF/GLB)")


def _summary_line(done: int, failures: list[dict[str, str]], seconds: float, out: Path) -> str:
    rate = done / seconds if seconds > 0 else math.inf
    failed = sorted({f["id"] for f in failures if "step" not in f})
    skeletons = sorted({f["id"] for f in failures if f.get("step") == "skeleton"})
    shown = ", ".join(failed[:5]) + (", ..." if len(failed) > 5 else "")
    line = f"infer: {done} samples predicted, {len(failed)} failed" + (f" ({shown})" if failed else "")
    if skeletons:
        line += f", {len(skeletons)} skeleton fits failed"
    line += f" in {seconds:.1f} s ({rate:.2f} samples/s) -> {out / PREDICTIONS}"
    if failures:
        line += f"; reasons in {out / FAILURES}"
    return line


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path), default=None,
              help="Training checkpoint (.pt), or a run folder meaning its checkpoints/latest.pt.")
@click.option("--oracle", is_flag=True,
              help="Use the dataset's ground truth (all stored layers) as the prediction instead of a model: "
                   "checks evaluation and skeleton fitting.")
@click.option("--oracle-noise", type=click.FloatRange(0, 10), default=0.0,
              help="--oracle: Gaussian noise added to every point, scene units (seeded by --seed).")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Prepared dataset (dualpm-prep output): predict from its stored features.")
@click.option("--split", type=str, default="val", help="--data: the split to predict.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of images (<id>.png or <id>_rgb.png; also jpg, bmp, webp, tif).")
@click.option("--masks", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of object masks, paired by id (<id>.png or <id>_mask.png).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--batch", type=click.IntRange(1, 4096), default=8, help="Samples per forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="auto: CUDA when torch sees a GPU.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default="auto",
              help="auto: bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--occupancy-threshold", type=click.FloatRange(0, 1), default=OCCUPANCY_THRESHOLD,
              help="Keep points with sigmoid(occupancy) above this.")
@click.option("--confidence-threshold", type=click.FloatRange(1, None), default=CONFIDENCE_THRESHOLD,
              help="Keep points with confidence c = 1 + exp(raw) at least this.")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="Predict at most this many samples (0: all).")
@click.option("--skeleton", is_flag=True,
              help="Also fit every joint's transform from the kept point pairs: skeleton.json, reposed.ply.")
@click.option("--mesh", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="--skeleton: the template mesh (skinned glTF/GLB) for every sample.")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              show_default="the dataset manifest's source",
              help="--skeleton with --data: source dataset holding the templates (shapes/<model>/).")
@click.option("--sd-model", type=str, default=None, show_default="as recorded in the checkpoint",
              help="Raw images, sd-dino features: where the Stable Diffusion folder is on this machine.")
@click.option("--dino-model", type=str, default=None, show_default="as recorded in the checkpoint",
              help="Raw images, sd-dino/dino features: where the DINOv2 folder is on this machine.")
@click.option("--mirror-average/--no-mirror-average", default=None,
              show_default="on when the checkpoint was trained with data.hflip_canonical_axis",
              help="Average each prediction with that of the left-right mirrored image, mirrored back.")
@click.option("--no-ply", is_flag=True, help="Do not write the PLY point clouds.")
@click.option("--no-sheets", is_flag=True, help="Do not write the PNG sheets.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="--oracle-noise seed.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT/predictions.zarr.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and the sample count; write nothing.")
@handles_user_errors
def main(checkpoint: Path | None, oracle: bool, oracle_noise: float, data: Path | None, split: str,
         images: Path | None, masks: Path | None, out: Path, batch: int, device: str, precision: str,
         occupancy_threshold: float, confidence_threshold: float, limit: int, skeleton: bool,
         mesh: Path | None, source: Path | None, sd_model: str | None, dino_model: str | None,
         mirror_average: bool | None, no_ply: bool, no_sheets: bool, seed: int, overwrite: bool,
         dry_run: bool) -> None:
    """Predict dual point maps with a trained DualPM model: per sample, point clouds (PLY), a picture sheet
    and (optionally) the skeleton; all dense predictions in OUT/predictions.zarr for dualpm-eval."""
    _check_inputs(checkpoint, oracle, data, images, masks, skeleton, mesh)
    torch_device = choose_device(device)
    state, model_config, where = None, None, None
    if checkpoint is not None:
        where = resolve_checkpoint(checkpoint)
        state = load_checkpoint(where)
        model, model_config = load_model(state, where)
    info = open_dataset(data) if data is not None else None
    mirror_axis = None
    if oracle:
        layers, resolution = info.stored_layers, info.resolution
        if mirror_average:
            raise InferError("--mirror-average needs a model (--checkpoint), not --oracle")
    else:
        layers, resolution = model_config.model.num_layers, tuple(model_config.data.resolution)
        trained_axis = model_config.data.hflip_canonical_axis
        if mirror_average and trained_axis is None:
            raise InferError(f"--mirror-average: {where} was trained without mirroring "
                             "(data.hflip_canonical_axis), so its canonical mirror axis is unknown")
        mirror_axis = None if mirror_average is False else trained_axis  # None (unset): as trained
        if info is not None:
            diffs = feature_differences(state.get("features") or {}, info.feature_config)
            if diffs:
                raise InferError(f"{where} was trained on other features than {data} holds: {'; '.join(diffs)}")
    pairs, failures = ([], []) if images is None else pair_images(images, masks)
    total = (info.count(split) if split in info.shards else 0) if info is not None else len(pairs)
    total = min(total, limit) if limit else total
    if source is None and info is not None and skeleton and mesh is None:
        source = Path(load_manifest(info.root).source)
    bf16 = precision == "bf16" or (precision == "auto" and torch_device.type == "cuda")
    config = {
        "mode": "oracle" if oracle else "model",
        "checkpoint": str(where) if where else None,
        "step": int(state["step"]) if state else None,
        "oracle_noise": oracle_noise if oracle else None,
        "data": str(data.resolve()) if data else None, "split": split if data else None,
        "images": str(images.resolve()) if images else None, "masks": str(masks.resolve()) if masks else None,
        "out": str(out), "samples": total, "batch": batch, "device": str(torch_device),
        "precision": "bf16" if bf16 else "fp32", "layers": layers, "resolution": list(resolution),
        "occupancy_threshold": occupancy_threshold, "confidence_threshold": confidence_threshold,
        "mirror_average_axis": mirror_axis,
        "skeleton": skeleton, "mesh": str(mesh) if mesh else None, "source": str(source) if source else None,
        "ply": not no_ply, "sheets": not no_sheets, "seed": seed,
        "model": state["config"]["model"] if state else None,
        "features": (state.get("features") if state else (info.feature_config if info else None)),
    }
    if dry_run:
        show_and_save_config(config, None, "inference config (dry run)")
        if state is not None:
            click.echo(describe(model))
        click.echo(f"{total} samples would be predicted into {out / PREDICTIONS}")
        return
    if (out / PREDICTIONS).exists() and not overwrite:
        raise InferError(f"{out / PREDICTIONS} exists; pass --overwrite to replace it (or choose another --out)")
    if data is not None and split not in info.shards:
        raise DatasetError(f"{data}: split {split!r} has no finished shards (splits: {sorted(info.shards)})")

    if oracle:
        predictor: Callable[[Batch], PredictedMaps] = OraclePredictor(oracle_noise, seed)
    else:
        predictor = ModelPredictor(model, torch_device, bf16, mirror_axis)
    if info is not None:
        batches = prefetch(dataset_batches(info, split, layers, resolution, batch, limit, with_target=oracle))
    else:
        extractor, basis = build_image_features(state, where, torch_device, sd_model, dino_model)
        batches = image_batches(pairs[:limit] if limit else pairs, extractor, basis, resolution, batch, failures)
    options = OutputOptions(not no_ply, not no_sheets, skeleton, occupancy_threshold, confidence_threshold)
    meshes = MeshSource(mesh, source) if skeleton else None

    out.mkdir(parents=True, exist_ok=True)
    show_and_save_config(config, out / "infer.config.yaml", "inference config")
    if state is not None:
        click.echo(describe(model))
    start = time.perf_counter()
    done = 0
    with atomic_directory(out / PREDICTIONS, overwrite=True) as tmp:
        store = PredictionStore(tmp, layers, resolution)
        with tqdm(total=total, desc="infer", unit="sample", dynamic_ncols=True) as bar:
            for inputs in batches:
                maps = predictor(inputs)
                store.append(inputs.ids, maps)
                for i, sample_id in enumerate(inputs.ids):
                    one = PredictedMaps(*(getattr(maps, name)[i] for name in MAP_NAMES))
                    folder = safe_join(out, f"{SAMPLES}/{sample_id}")
                    failures += write_sample(folder, sample_id, one, inputs.images[i], inputs.meta[i], options, meshes)
                done += len(inputs.ids)
                bar.update(len(inputs.ids))
        atomic_write_text(out / FAILURES, "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures))
        if done == 0:
            reasons = "; ".join(f"{f['id']}: {f['reason']}" for f in failures[:3])
            raise InferError(f"no sample could be predicted{': ' + reasons if reasons else ''}")
        store.finish(config | {"failed": sorted({f["id"] for f in failures if "step" not in f})})
    click.echo(_summary_line(done, failures, time.perf_counter() - start, out))


if __name__ == "__main__":
    main()
