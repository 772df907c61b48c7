"""Per-sample evaluation of dual point map predictions against a prepared dataset (what dualpm-eval runs).

For each predicted sample (`dualpm.predictions.open_predictions`) and its ground truth (`GroundTruthReader`):

* Chamfer distances (Animodel definitions, `metrics.chamfer`) from the kept predicted posed points to
  (a) `layers`: the ground-truth posed points of every stored layer of the render column, and
  (b) `surface`: points sampled on the ground-truth posed mesh surface (source mesh + pose file, skinned,
      seen through the sample's camera, depth subtracted), when the source dataset is available;
  each in scene units and `unit_` (target scaled to fit a unit cube), and `icp_` after rigid ICP with the
  benchmark's 180-degree flip (`align.icp`).
* `canonical_error` / `posed_error`: mean distance to the ground truth at pixels where the correspondence is
  known (kept by the prediction and occupied in the ground truth), pooled over layers and per layer `_l<k>`.
* `iou_l<k>`: occupancy IoU per layer (predicted occupancy inside the mask, as the training metrics).
* `skeleton_rotation_deg` / `skeleton_position_error`: mean over joints of the errors of the estimated
  joint transforms (skeleton.json of dualpm-infer --skeleton) against the pose file's, when both exist.

Metric values are Python floats: NaN where a metric does not apply (an IoU of two empty layers, no
surface), inf for Chamfer distances of an empty prediction (never silently dropped from means).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualpm.camera import view_from_camera_pose
from dualpm.data.source import SourceDataset
from dualpm.errors import DatasetError, DualPMError
from dualpm.eval.align import icp
from dualpm.eval.baseline import nearest_resample
from dualpm.eval.metrics import (
    EvalError,
    chamfer,
    masked_point_error,
    occupancy_iou,
    sample_surface,
    unit_cube_transform,
)
from dualpm.skeleton.joints import bind_positions, joint_errors, load_skeleton_json
from dualpm.skeleton.rigid import SkeletonError
from dualpm.gltf import SkinnedMesh, load_skinned_mesh
from dualpm.skinning import joint_matrices, read_pose_file, skin
from dualpm.store.access import open_store
from dualpm.pointmaps import POSED, hits

DIRECTIONS = ("pred_to_gt", "gt_to_pred", "sym")


@dataclass(frozen=True)
class EvalOptions:
    occupancy_threshold: float
    confidence_threshold: float
    icp: bool  # also measure after rigid ICP alignment (reported separately)
    surface_points: int  # points sampled on the ground-truth mesh surface (0: skip the surface metrics)
    seed: int  # seeds the surface sampling (with the sample id)
    icp_iterations: int = 50


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """One sample's ground truth.

    dpm: (H0, W0, L0, 7) float32 stored dual point map (all stored layers). meta: its meta field.
    surface: (S, 3) float64 points on the posed mesh surface (camera space, depth subtracted), or None.
    world_vertices, faces, view: the posed mesh in its world frame and the camera (`world_mesh=True`).
    joints: (J, 4, 4) float64 canonical -> posed (same space) joint transforms, or None.
    joint_positions: (J, 3) canonical joint origins; joint_names: (J,) names. note: why surface is None.
    """

    sample_id: str
    dpm: np.ndarray
    meta: dict[str, Any]
    surface: np.ndarray | None = None
    joints: np.ndarray | None = None
    joint_positions: np.ndarray | None = None
    joint_names: tuple[str, ...] = ()
    note: str | None = None
    world_vertices: np.ndarray | None = None  # (V, 3) float64 posed mesh in the Y-up world (with world_mesh)
    faces: np.ndarray | None = None  # (F, 3) int64 its triangles
    view: np.ndarray | None = None  # (4, 4) float64 world -> camera (before the depth is subtracted)

    def layer_points(self) -> np.ndarray:
        """(N, 3) ground-truth posed points of every stored layer."""
        return self.dpm[..., POSED][hits(self.dpm)]


class GroundTruthReader:
    """Ground truth of a prepared dataset: render column (dual point maps, meta) and, when the source
    dataset is reachable, posed mesh surfaces and joint transforms.

    Args:
        root: the prepared dataset; source: the source dataset (None: the manifest's `source`).
        surface_points: points per surface sample (0: no surfaces, joints only); seed: seeds them with the
            sample id. world_mesh: also return the posed mesh in its world frame and the view matrix (the
            Animodel protocol scores against that mesh).
    """

    def __init__(self, root: str | Path, source: str | Path | None, surface_points: int, seed: int,
                 world_mesh: bool = False):
        self.store = open_store(root)
        self.root = self.store.where
        manifest = self.store.load_manifest()
        if "render" not in manifest.columns:
            raise DatasetError(f"{self.root}: no render column: nothing to evaluate against")
        self.column = manifest.columns["render"]
        self.format = self.column.format
        self.shard_of = {sid: plan.index for plan in manifest.plan for sid in plan.ids}
        self.surface_points, self.seed, self.world_mesh = surface_points, seed, world_mesh
        self.meshes: dict[Path, SkinnedMesh] = {}
        self.source: SourceDataset | None = None
        self.source_note: str | None = None
        where = Path(source) if source is not None else Path(manifest.source)
        try:
            self.source = SourceDataset(where)
        except DatasetError as err:
            self.source_note = (f"source dataset unavailable ({err}): Chamfer to the mesh surface and "
                                "skeleton errors are skipped (pass --source)")

    def read(self, ids: list[str]) -> Iterator[GroundTruth]:
        """Ground truth of `ids`, grouped by shard (each shard read once), in shard order."""
        missing = [i for i in ids if i not in self.shard_of]
        if missing:
            raise DatasetError(f"{self.root}: samples {missing[:5]} are not in the dataset's shard plan")
        wanted: dict[int, set[str]] = {}
        for sid in ids:
            wanted.setdefault(self.shard_of[sid], set()).add(sid)
        for index in sorted(wanted):
            problem = self.store.shard_problem(self.column, index)
            if problem is not None:
                raise DatasetError(f"{self.root}: render shard {index} is not usable: {problem}")
            found = set()
            for sid, fields in self.store.read_shard(self.column, index):  # sha256 checked first
                if sid in wanted[index]:
                    found.add(sid)
                    yield self._ground_truth(sid, fields)
            if found != wanted[index]:
                lost = sorted(wanted[index] - found)
                raise DatasetError(f"{self.root}: render shard {index} does not hold samples {lost[:5]}")

    def _mesh(self, model: str) -> SkinnedMesh:
        path = self.source.layout.mesh(model)
        if path not in self.meshes:
            self.meshes[path] = load_skinned_mesh(path)
        return self.meshes[path]

    def _ground_truth(self, sample_id: str, fields: Mapping[str, Any]) -> GroundTruth:
        if "dpm" not in fields:
            raise DatasetError(f"{self.store.column_where('render')}: sample {sample_id!r} has no 'dpm' field")
        dpm = fields["dpm"]
        meta = fields.get("meta") or {}
        if self.source is None:
            return GroundTruth(sample_id, dpm, meta, note=self.source_note)
        try:
            sample = self.source.sample(str(meta.get("source_id", sample_id)))
            mesh = self._mesh(sample.model_name)
            pose = torch.from_numpy(read_pose_file(sample.pose_path, mesh.num_nodes)).double()
            view = view_from_camera_pose(torch.from_numpy(sample.camera_pose))  # (4, 4) float64
        except DualPMError as err:  # this sample's source files: recorded, the sample still evaluated
            return GroundTruth(sample_id, dpm, meta, note=f"{sample_id}: no surface ({err})")
        to_camera = view.clone()
        to_camera[2, 3] = 0.0  # "subtract depth": z - view[2, 3]
        surface = world = None
        if self.surface_points > 0 or self.world_mesh:
            world = skin(mesh, pose, dtype=torch.float64)[0]  # (V, 3)
        if self.surface_points > 0:
            vertices = world @ to_camera[:3, :3].T + to_camera[:3, 3]
            seed = self.seed + zlib.crc32(sample_id.encode())  # independent of evaluation order
            surface = sample_surface(vertices.numpy(), mesh.faces, self.surface_points, seed)
        joints = (to_camera @ joint_matrices(mesh, pose)[0]).numpy()  # (J, 4, 4)
        names = tuple(mesh.node_names[n] or f"joint{j}" for j, n in enumerate(mesh.joint_nodes))
        extra = {}
        if self.world_mesh:
            extra = {"world_vertices": world.numpy(), "faces": np.asarray(mesh.faces, dtype=np.int64),
                     "view": view.numpy()}
        return GroundTruth(sample_id, dpm, meta, surface, joints, bind_positions(mesh.inverse_bind), names,
                           **extra)


def chamfer_metrics(name: str, pred: np.ndarray, target: np.ndarray, options: EvalOptions) -> dict[str, float]:
    """`chamfer_<name>_*`, `unit_chamfer_<name>_*` and (with ICP) `icp_...` of pred (N, 3) to target (M, 3)."""
    _, scale = unit_cube_transform(target)
    results = {"": chamfer(pred, target)}
    if options.icp:
        if len(pred):
            aligned = icp(pred, target, iterations=options.icp_iterations).aligned
            results["icp_"] = chamfer(aligned, target)
        else:
            results["icp_"] = results[""]  # an empty prediction cannot be aligned: inf as well
    out = {}
    for prefix, result in results.items():
        for unit, value in (("", result), ("unit_", result.scaled(scale))):
            for direction, d in zip(DIRECTIONS, (value.pred_to_target, value.target_to_pred, value.symmetric),
                                    strict=True):
                out[f"{prefix}{unit}chamfer_{name}_{direction}"] = d
    return out


def map_metrics(
    canonical: np.ndarray, posed: np.ndarray, keep: np.ndarray, occupied: np.ndarray, gt: GroundTruth
) -> dict[str, float]:
    """Per-pixel metrics of one prediction against the ground truth resampled to its resolution.

    Args:
        canonical, posed: (L, 3, H, W) predicted points; keep: (L, H, W) bool kept points;
        occupied: (L, H, W) bool predicted occupancy (for the IoU).
    """
    num_layers, _, h, w = canonical.shape
    dpm = nearest_resample(gt.dpm, (h, w))
    layers = min(num_layers, dpm.shape[2])
    truth = dpm[:, :, :layers]  # (H, W, l, 7)
    gt_alpha = hits(truth)
    valid = np.moveaxis(keep[:layers], 0, -1) & gt_alpha  # (H, W, l): correspondence known
    out: dict[str, float] = {}
    for name, pred, channels in (("canonical", canonical, slice(0, 3)), ("posed", posed, slice(3, 6))):
        points = np.moveaxis(pred[:layers].astype(np.float64), (0, 1), (2, 3))  # (H, W, l, 3)
        target = truth[..., channels]
        # Pooled over layers: every known pixel of every layer counts once.
        pooled = masked_point_error(points.reshape(1, -1, 1, 3), target.reshape(1, -1, 1, 3), valid.reshape(1, -1, 1))
        out[f"{name}_error"] = float(pooled[0])
        per_layer = masked_point_error(points, target, valid)
        out.update({f"{name}_error_l{k + 1}": float(v) for k, v in enumerate(per_layer)})
    iou = occupancy_iou(np.moveaxis(occupied[:layers], 0, -1), gt_alpha)
    out.update({f"iou_l{k + 1}": float(v) for k, v in enumerate(iou)})
    return out


def evaluate_prediction(
    canonical: np.ndarray, posed: np.ndarray, keep: np.ndarray, occupied: np.ndarray, gt: GroundTruth,
    options: EvalOptions,
) -> dict[str, float]:
    """Every point and map metric of one prediction (see the module docstring).

    Args:
        canonical, posed: (L, 3, H, W) float predicted maps, scene units; keep: (L, H, W) bool points kept
        by the inference rule; occupied: (L, H, W) bool predicted occupancy; gt: its ground truth.
    """
    points = np.moveaxis(posed, -3, -1)[keep].astype(np.float64)  # (N, 3)
    try:
        out = {"points": float(len(points))}
        layer_truth = gt.layer_points()
        out["gt_points"] = float(len(layer_truth))
        out.update(chamfer_metrics("layers", points, layer_truth, options))
        if gt.surface is not None:
            out.update(chamfer_metrics("surface", points, gt.surface, options))
        out.update(map_metrics(canonical, posed, keep, occupied, gt))
    except EvalError as err:
        raise EvalError(f"sample {gt.sample_id!r}: {err}") from err
    return out


def skeleton_metrics(path: Path, gt: GroundTruth) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:
    """Errors of an estimated skeleton (skeleton.json) against the ground-truth joint transforms.

    Returns:
        ({"skeleton_rotation_deg", "skeleton_position_error"}: means over joints (degrees, scene units),
        {joint name: (rotation error deg, position error)}).
    """
    try:
        transforms, _valid, names = load_skeleton_json(path)
    except SkeletonError as err:
        raise EvalError(str(err)) from err
    if gt.joints is None:
        raise EvalError(f"{path}: no ground-truth joints for sample {gt.sample_id!r}")
    if tuple(names) != gt.joint_names:
        raise EvalError(f"{path}: joints {names[:4]}... differ from the template's {list(gt.joint_names[:4])}...")
    rotation, position = joint_errors(transforms, gt.joints, gt.joint_positions)
    per_joint = {n: (float(r), float(p)) for n, r, p in zip(names, rotation, position, strict=True)}
    return {"skeleton_rotation_deg": float(rotation.mean()), "skeleton_position_error": float(position.mean())}, per_joint


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every metric over samples: NaN entries (not applicable) are skipped, an inf entry makes the
    mean inf, a metric without any finite entry is NaN."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    out = {}
    for key in keys:
        values = np.array([row.get(key, math.nan) for row in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        out[key] = float(values.mean()) if len(values) else math.nan
    return out
