"""Random plausible poses of a rigged animal, as reference pose files (local transform of every node).

Every skin joint gets a class from its name (`classify_joint`): the procedural quadrupeds use names
these rules recognise exactly, and user rigs (Mixamo-, Blender- or 3ds Max-style names such as
`mixamorig:LeftUpLeg`, `DEF-thigh.L`, `Bip01 L Calf`) mostly do too. Per class, a rotation is drawn
uniformly within limits about the axes of the *body* frame (lateral, up, forward) and applied in the
joint's own rest frame:

    ROOT (joints with no joint above them)   small pitch/roll; the whole-body yaw is added at the root
    SPINE  bend up/down and sideways, little twist      NECK  bend and turn
    HEAD   nod and turn                                 TAIL  free within a cone, little twist
    LEG_UPPER  swing mostly about the lateral axis (sagittal plane), small abduction and twist
    LEG_MIDDLE, LEG_LOWER  flexion one way (the way the joint bends, when known), little else
    OTHER  joints no rule recognises: small rotations about every axis (user rigs only)

Body frame: +Y is up (glTF). Forward is +Z for the procedural animals; for user rigs it points from
the joints' centroid to the head joints when the rig has some, and otherwise along the main
horizontal axis of the mesh, with an unknown sign, in which case flexion ranges are made symmetric.
Non-joint nodes keep their rest transform (the yaw also turns root nodes above the joints). Every
node keeps its rest translation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from dualpm.gltf import SkinnedMesh
from dualpm.skinning import global_matrices, rest_pose


class JointClass(IntEnum):
    NONE = 0  # not a skin joint: keeps its rest transform
    ROOT = 1
    SPINE = 2
    NECK = 3
    HEAD = 4
    TAIL = 5
    LEG_UPPER = 6
    LEG_MIDDLE = 7
    LEG_LOWER = 8
    OTHER = 9


# Degrees about the body's (lateral, up, forward) axes: (low, high) each. Positive rotation about the
# lateral axis (+X = the animal's left) swings a downward bone backwards and a forward bone down.
LIMITS_DEG: dict[JointClass, tuple[tuple[float, float], ...]] = {
    JointClass.NONE: ((0, 0), (0, 0), (0, 0)),
    JointClass.ROOT: ((-5, 5), (0, 0), (-4, 4)),
    JointClass.SPINE: ((-5, 5), (-6, 6), (-3, 3)),
    JointClass.NECK: ((-25, 30), (-25, 25), (-8, 8)),
    JointClass.HEAD: ((-30, 30), (-25, 25), (-10, 10)),
    JointClass.TAIL: ((0, 0), (0, 0), (-10, 10)),  # plus the cone below
    JointClass.LEG_UPPER: ((-25, 25), (-4, 4), (-6, 6)),
    JointClass.LEG_MIDDLE: ((-5, 45), (-3, 3), (-3, 3)),  # flexion for sign +1 (mirrored for -1)
    JointClass.LEG_LOWER: ((-10, 35), (-2, 2), (-2, 2)),
    JointClass.OTHER: ((-10, 10), (-10, 10), (-10, 10)),
}
TAIL_CONE_DEG = 35.0
UNKNOWN_FLEX_DEG = 20.0  # symmetric range of a leg joint whose bending direction is unknown

_WORDS = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_SIDES = {"l", "r", "left", "right", "lf", "rf", "lh", "rh", "fl", "fr", "hl", "hr", "bl", "br"}
_HEAD = {"head", "skull", "jaw", "ear", "ears", "nose", "muzzle", "snout", "eye", "mouth", "tongue", "lip",
         "horn", "antler", "cranium"}
_NECK = {"neck", "cervical"}
_SPINE = {"spine", "back", "chest", "pelvis", "hips", "hip", "torso", "body", "root", "cog", "ribs",
          "ribcage", "waist", "lumbar", "thorax", "abdomen", "belly", "sacrum"}
_LEG_UPPER = {"hip", "thigh", "upleg", "upperleg", "shoulder", "upperarm", "humerus", "femur", "clavicle",
              "scapula"}
_LEG_MIDDLE = {"knee", "stifle", "elbow", "forearm", "shin", "calf", "lowerleg", "tibia", "radius", "ulna",
               "hock", "ankle", "carpus", "wrist", "cannon", "metacarpus", "metatarsus", "leg", "arm"}
_LEG_LOWER = {"fetlock", "pastern", "foot", "toe", "toes", "hoof", "paw", "hand", "finger", "heel", "phalanx",
              "digit"}
# Which way a leg joint bends: +1 swings the distal bone backwards under positive lateral rotation.
_FLEX = {"elbow": -1, "carpus": 1, "wrist": 1, "knee": 1, "stifle": 1, "hock": -1, "ankle": -1,
         "fetlock": 1, "pastern": 1}


def name_words(name: str) -> list[str]:
    """Lower-case words of a node name, split at separators and camelCase ('mixamorig:LeftUpLeg' -> 4)."""
    return [w.lower() for w in _WORDS.findall(name)]


def classify_joint(name: str) -> tuple[JointClass, int]:
    """(class, flexion sign) of a joint from its name; (OTHER, 0) when no rule matches."""
    words = name_words(name)
    found = set(words)
    if "tail" in found:
        return JointClass.TAIL, 0
    if found & _HEAD:
        return JointClass.HEAD, 0
    if found & _NECK:
        return JointClass.NECK, 0
    sided = bool(found & _SIDES)
    flex = next((_FLEX[w] for w in words if w in _FLEX), 0)
    # "hip" alone is the pelvis in many rigs; with a side it is a leg's top joint.
    upper_limb = {"up", "upper"} & found and {"leg", "arm"} & found  # Mixamo's UpLeg, UpperArm...
    if (found & _LEG_UPPER and (sided or "hip" not in found)) or upper_limb:
        return JointClass.LEG_UPPER, flex
    if found & _LEG_LOWER:
        return JointClass.LEG_LOWER, flex
    if found & _LEG_MIDDLE:
        return JointClass.LEG_MIDDLE, flex
    if found & _SPINE:
        return JointClass.SPINE, 0
    return JointClass.OTHER, 0


def _rest_world(mesh: SkinnedMesh) -> np.ndarray:
    """(N, 4, 4) float64 node-to-world transforms of the rest pose."""
    return global_matrices(mesh, torch.tensor(rest_pose(mesh), dtype=torch.float64))[0].numpy()


def _polar_rotation(m: np.ndarray) -> np.ndarray:
    """Nearest rotations to (..., 3, 3) matrices (drops scale and shear)."""
    u, _, vt = np.linalg.svd(m)
    r = u @ vt
    flip = np.linalg.det(r) < 0
    u[flip, :, -1] *= -1
    return u @ vt


@dataclass(frozen=True)
class PoseSampler:
    """Draws (N, 7) poses of one mesh; build with `PoseSampler.for_mesh`.

    Arrays are per node (N nodes).
    """

    rest: np.ndarray  # (N, 7) float64 rest pose [qw qx qy qz tx ty tz]
    classes: np.ndarray  # (N,) int64 JointClass
    low: np.ndarray  # (N, 3) radians about the body axes
    high: np.ndarray  # (N, 3)
    to_joint: np.ndarray  # (N, 3, 3) maps a body-frame rotation into the node's rest frame: M^T R M
    yaw_roots: np.ndarray  # (K,) int64 root nodes that carry the whole-body yaw
    yaw: bool

    @classmethod
    def for_mesh(cls, mesh: SkinnedMesh, yaw: bool = True, forward: np.ndarray | None = None) -> PoseSampler:
        """Classify the joints of `mesh` and set up its limits.

        Args:
            forward: (3,) the body's forward direction in the rest pose (world), e.g. +Z for the
                procedural animals; None estimates it (see the module doc).
        """
        n = mesh.num_nodes
        is_joint = np.zeros(n, dtype=bool)
        is_joint[mesh.joint_nodes] = True
        classes = np.zeros(n, dtype=np.int64)
        flex = np.zeros(n, dtype=np.int64)
        for i in np.flatnonzero(is_joint):
            classes[i], flex[i] = classify_joint(mesh.node_names[i])
        # Joints with no joint above them are the roots of the skeleton; the top node above each
        # joint (itself when it is a root node) carries the whole-body yaw.
        skeleton_root = np.zeros(n, dtype=bool)
        top = np.zeros(n, dtype=bool)
        for i in np.flatnonzero(is_joint):
            p = mesh.parents[i]
            while p >= 0 and not is_joint[p]:
                p = mesh.parents[p]
            skeleton_root[i] = p < 0
            while mesh.parents[i] >= 0:
                i = mesh.parents[i]
            top[i] = True
        classes[skeleton_root] = JointClass.ROOT

        world = _rest_world(mesh)
        if forward is None:
            forward, known = _estimate_forward(mesh, world, classes)
            if not known:
                flex[:] = 0
        up = np.array([0.0, 1.0, 0.0])
        forward = np.asarray(forward, dtype=np.float64)
        forward = forward - (forward @ up) * up
        forward /= np.linalg.norm(forward)
        body = np.stack([np.cross(up, forward), up, forward])  # rows: lateral, up, forward (world)

        limits = np.radians(np.array([LIMITS_DEG[JointClass(c)] for c in classes]))  # (N, 3, 2)
        low, high = limits[..., 0].copy(), limits[..., 1].copy()
        legs = (classes == JointClass.LEG_MIDDLE) | (classes == JointClass.LEG_LOWER)
        mirrored = legs & (flex < 0)
        low[mirrored, 0], high[mirrored, 0] = -limits[mirrored, 0, 1], -limits[mirrored, 0, 0]
        unknown = legs & (flex == 0)
        low[unknown, 0], high[unknown, 0] = -np.radians(UNKNOWN_FLEX_DEG), np.radians(UNKNOWN_FLEX_DEG)

        # A rotation R_b about body axes is B^T R_b B in the world and G^T (B^T R_b B) G in the node's
        # rest frame (G its rest world rotation); with M = B G that is M^T R_b M.
        to_joint = body[None] @ _polar_rotation(world[:, :3, :3])
        return cls(rest=rest_pose(mesh).astype(np.float64), classes=classes, low=low, high=high,
                   to_joint=to_joint, yaw_roots=np.flatnonzero(top), yaw=yaw)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One pose: (N, 7) float64 `[qw, qx, qy, qz, tx, ty, tz]` per node (rest translations).

        Always consumes the same random draws, whatever the classes, so poses are reproducible.
        """
        n = len(self.classes)
        u = rng.random((n, 3))
        cone = rng.random((n, 2))
        yaw_angle = rng.uniform(-np.pi, np.pi)
        angles = self.low + u * (self.high - self.low)  # (N, 3) about lateral, up, forward
        delta = Rotation.from_euler("xyz", angles).as_matrix()  # extrinsic: Rz @ Ry @ Rx
        tail = self.classes == JointClass.TAIL
        if tail.any():  # free swing within a cone (uniform over its disc of axes), then the twist
            phi = 2 * np.pi * cone[tail, 0]
            theta = np.radians(TAIL_CONE_DEG) * np.sqrt(cone[tail, 1])
            axis = np.stack([np.cos(phi), np.sin(phi), np.zeros_like(phi)], axis=1)
            delta[tail] = Rotation.from_rotvec(axis * theta[:, None]).as_matrix() @ delta[tail]
        local_delta = np.swapaxes(self.to_joint, 1, 2) @ delta @ self.to_joint
        rest = Rotation.from_quat(np.roll(self.rest[:, :4], -1, axis=1))  # SciPy wants [x, y, z, w]
        rotation = rest * Rotation.from_matrix(local_delta)
        xyzw = rotation.as_quat()
        if self.yaw and len(self.yaw_roots):  # about +Y of the parent frame = the world, for a root
            turned = Rotation.from_rotvec([0.0, yaw_angle, 0.0]) * rotation[self.yaw_roots]
            xyzw[self.yaw_roots] = turned.as_quat()
        quat = np.roll(xyzw, 1, axis=1)  # -> [w, x, y, z]
        quat[quat[:, 0] < 0] *= -1  # one sign convention (w >= 0) for stored files
        return np.concatenate([quat, self.rest[:, 4:]], axis=1)


def _estimate_forward(mesh: SkinnedMesh, world: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, bool]:
    """Forward direction of a user rig and whether its sign is known (see the module doc)."""
    joints = world[mesh.joint_nodes, :3, 3]
    head = classes[mesh.joint_nodes] == JointClass.HEAD
    if head.any():
        direction = joints[head].mean(0) - joints.mean(0)
        direction[1] = 0.0
        if np.linalg.norm(direction) > 1e-6 * (np.ptp(joints, axis=0).max() + 1e-12):
            return direction, True
    xz = mesh.vertices[:, [0, 2]].astype(np.float64)
    xz -= xz.mean(0)
    _, vectors = np.linalg.eigh(xz.T @ xz)
    main = vectors[:, -1]  # largest spread
    return np.array([main[0], 0.0, main[1]]), False
