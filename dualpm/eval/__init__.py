"""Evaluation geometry: Chamfer metrics (Animodel definitions), ICP alignment, skeleton fitting.

- `metrics`: Chamfer distance, unit-cube scaling, occupancy IoU, masked point error, surface sampling.
- `align`: weighted Kabsch-Umeyama, ICP with the benchmark's 180-degree flip.
- skeleton fitting lives in `dualpm.skeleton` (below eval); its per-joint names are re-exported here.
"""

from dualpm.eval.align import IcpResult, icp, kabsch_umeyama
from dualpm.eval.metrics import (
    ChamferResult,
    EvalError,
    chamfer,
    unit_cube_chamfer,
    masked_point_error,
    to_unit_cube,
    occupancy_iou,
    sample_surface,
    unit_cube_transform,
)
from dualpm.skeleton.joints import (
    JointFit,
    bind_positions,
    estimate_joint_transforms,
    joint_errors,
    joint_parents,
    load_skeleton_json,
    repose_vertices,
    save_skeleton_json,
    skin_weights_at,
)

__all__ = [
    "ChamferResult",
    "EvalError",
    "IcpResult",
    "JointFit",
    "bind_positions",
    "chamfer",
    "unit_cube_chamfer",
    "estimate_joint_transforms",
    "icp",
    "joint_errors",
    "joint_parents",
    "kabsch_umeyama",
    "load_skeleton_json",
    "masked_point_error",
    "to_unit_cube",
    "occupancy_iou",
    "repose_vertices",
    "sample_surface",
    "save_skeleton_json",
    "skin_weights_at",
    "unit_cube_transform",
]
