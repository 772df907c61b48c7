"""Per-sample output files: PLY point clouds, the picture sheet, and the fitted skeleton.

Everything is derived from the float16 maps as stored in predictions.zarr, so the files and what
dualpm-eval measures agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dualpm.data.source import Layout
from dualpm.errors import DualPMError
from dualpm.skeleton.joints import (
    JointFit,
    estimate_joint_transforms,
    joint_parents,
    repose_vertices,
    save_skeleton_json,
    skin_weights_at,
)
from dualpm.fileio import atomic_output
from dualpm.gltf import SkinnedMesh, load_skinned_mesh
from dualpm.infer import InferError
from dualpm.pointcloud import write_mesh_ply, write_ply
from dualpm.predictions import PredictedMaps, keep_mask, kept_points
from dualpm.viz import canonical_to_rgb, depth_to_rgb, image_grid

SKIN_MAX_DISTANCE = 0.5  # reference skeleton script: canonical points farther from the template are outliers
SHEET_CELL = 128  # smallest tile side of the sheets, pixels


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
