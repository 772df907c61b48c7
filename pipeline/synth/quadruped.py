"""Procedural quadrupeds: a skeleton, a smooth watertight skinned surface, as a `SkinnedMesh`.

World frame (glTF, Y-up): the animal faces +Z, +Y is up and +X is the animal's left. In the rest
pose every bone frame is aligned with the world (identity rest rotations), so a joint's local X axis
is the body's lateral axis. Units are metres-like: a horse-sized animal is about 2 units long.
The rest mesh's bounding box is centred on the world origin (the reference's "subtract depth" makes
posed depth relative to the origin, so the animal must sit there); the ground is the lowest y.

Surface: each bone is one or more round cones (a capsule whose radius varies linearly). Cones of
one body part (a leg, the neck, the tail...) are joined by a plain union (minimum distance), parts by
a log-sum-exp smooth union that gives fillets; the field is sampled on a voxel grid, polygonised by
scikit-image's marching cubes (closed: the grid has an empty border) and decimated to the target
triangle count by fast-simplification (quadric edge collapse). Skin weights fall off with the
distance from a vertex to each joint's round cones, so they blend smoothly across joints; the four
strongest are kept, with the fifth subtracted first so a joint leaves the top four continuously.

Node layout of the mesh: node 0 is the mesh node (named after the model, a root, not a joint);
nodes 1.. are the joints, in `JOINT_NAMES` order, all of them skin joints. Joint names are the same
for every animal (only the geometry varies), so `pipeline.synth.poses` recognises them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import fast_simplification
import numpy as np
import trimesh
from skimage.measure import marching_cubes

from dualpm.gltf import SkinnedMesh

MAX_INFLUENCES = 4


@dataclass(frozen=True)
class QuadrupedShape:
    """Shape parameters of one animal (lengths in body-relative units before `scale`)."""

    scale: float  # overall size multiplier
    body_length: float  # pelvis to chest
    girth: float  # torso radius
    leg_length: float  # hip to ground
    leg_radius: float
    neck_length: float
    neck_angle: float  # radians above the horizontal
    head_size: float  # head length
    tail_length: float
    tail_angle: float  # radians below the horizontal


def sample_shape(rng: np.random.Generator) -> QuadrupedShape:
    """Draw the shape parameters of one animal (ranges span pony-, deer- and dog-like builds)."""
    u = rng.uniform
    return QuadrupedShape(
        scale=u(0.65, 1.05), body_length=u(0.8, 1.3), girth=u(0.2, 0.34), leg_length=u(0.6, 1.1),
        leg_radius=u(0.045, 0.075), neck_length=u(0.35, 0.9), neck_angle=np.radians(u(30, 60)),
        head_size=u(0.35, 0.6), tail_length=u(0.25, 0.9), tail_angle=np.radians(u(25, 70)),
    )


@dataclass(frozen=True)
class Rig:
    """Skeleton in the rest pose and the round cones that give it a body.

    J joints, S segments (a joint may own several, e.g. the pelvis owns the rump and the tail root).
    """

    names: tuple[str, ...]  # (J,)
    parents: np.ndarray  # (J,) int64 index into joints, -1 for the root
    positions: np.ndarray  # (J, 3) float64 rest positions (world)
    owner: np.ndarray  # (S,) int64 joint that moves segment s
    part: np.ndarray  # (S,) int64 body part: a plain union within a part, a smooth union across parts
    start: np.ndarray  # (S, 3) float64
    end: np.ndarray  # (S, 3) float64
    radius0: np.ndarray  # (S,) float64 radius at start
    radius1: np.ndarray  # (S,) float64 radius at end


LEGS = ("front_left", "front_right", "hind_left", "hind_right")
FRONT_LEG_JOINTS = ("shoulder", "elbow", "carpus", "fetlock")
HIND_LEG_JOINTS = ("hip", "stifle", "hock", "fetlock")
TAIL_JOINTS = 4


def _leg_joints(leg: str) -> tuple[str, ...]:
    return tuple(f"{leg}_{j}" for j in (FRONT_LEG_JOINTS if leg.startswith("front") else HIND_LEG_JOINTS))


JOINT_NAMES: tuple[str, ...] = (
    ("root", "pelvis", "spine_1", "spine_2", "chest", "neck_1", "neck_2", "head")
    + tuple(f"tail_{i + 1}" for i in range(TAIL_JOINTS))
    + sum((_leg_joints(leg) for leg in LEGS), ())
)


def build_rig(shape: QuadrupedShape) -> Rig:
    """Joint positions and body segments of the rest pose, centred on the origin (see module doc)."""
    s = shape
    g, lr, hs = s.girth, s.leg_radius, s.head_size
    joints: dict[str, tuple[str | None, np.ndarray]] = {}
    segments: list[tuple[str, int, np.ndarray, np.ndarray, float, float]] = []

    def joint(name: str, parent: str | None, pos) -> np.ndarray:
        joints[name] = (parent, np.asarray(pos, dtype=np.float64))
        return joints[name][1]

    def seg(owner: str, part: int, a, b, r0: float, r1: float) -> None:
        segments.append((owner, part, np.asarray(a, np.float64), np.asarray(b, np.float64), r0, r1))

    # Parts: chains whose consecutive cones share their end radius form one smooth tube with a plain
    # union; a smooth union across parts gives fillets (a smooth union inside a chain would bulge at
    # every joint, where neighbouring cones overlap).
    torso, neck_part, head_part, tail_part = 0, 1, 2, 3
    # Torso along +Z at the height the legs give it.
    height = s.leg_length + 0.25 * g
    half = 0.5 * s.body_length
    joint("root", None, [0, height, 0])
    pelvis = joint("pelvis", "root", [0, height, -half])
    spine1 = joint("spine_1", "pelvis", [0, height, -half / 3])
    spine2 = joint("spine_2", "spine_1", [0, height, half / 3])
    chest = joint("chest", "spine_2", [0, height, half])
    seg("pelvis", torso, pelvis, spine1, 0.92 * g, 0.97 * g)
    seg("spine_1", torso, spine1, spine2, 0.97 * g, 0.99 * g)
    seg("spine_2", torso, spine2, chest, 0.99 * g, 1.02 * g)

    # Neck rises forward from the front of the chest; the head points forward-down from its top.
    up_fwd = np.array([0, np.sin(s.neck_angle), np.cos(s.neck_angle)])
    neck1 = joint("neck_1", "chest", chest + [0, 0.3 * g, 0.45 * g])
    neck2 = joint("neck_2", "neck_1", neck1 + 0.5 * s.neck_length * up_fwd)
    head = joint("head", "neck_2", neck2 + 0.5 * s.neck_length * up_fwd)
    seg("chest", neck_part, chest, neck1, 0.9 * g, 0.6 * g)
    seg("neck_1", neck_part, neck1, neck2, 0.6 * g, 0.47 * g)
    seg("neck_2", neck_part, neck2, head, 0.47 * g, 0.36 * g)
    head_dir = np.array([0, -np.sin(np.radians(40)), np.cos(np.radians(40))])
    seg("head", head_part, head, head + hs * head_dir, 0.3 * hs, 0.19 * hs)
    for side in (1, -1):  # ears: short cones on top of the skull, each its own part
        base = head + [side * 0.12 * hs, 0.18 * hs, -0.02 * hs]
        tip = base + [side * 0.06 * hs, 0.28 * hs, -0.08 * hs]
        seg("head", 4 if side > 0 else 5, base, tip, 0.08 * hs, 0.05 * hs)

    # Tail from the top of the rump, drooping back, thinning by 0.8 per segment.
    back_down = np.array([0, -np.sin(s.tail_angle), -np.cos(s.tail_angle)])
    prev, pos = "pelvis", pelvis + [0, 0.4 * g, -0.75 * g]
    radius = 0.16 * g
    seg("pelvis", 6, pelvis, pos, 0.85 * g, radius)  # the rump, blended into torso and tail
    for i in range(TAIL_JOINTS):
        name = f"tail_{i + 1}"
        joint(name, prev, pos)
        nxt = pos + (s.tail_length / TAIL_JOINTS) * back_down
        seg(name, tail_part, pos, nxt, radius, radius * 0.8)
        prev, pos, radius = name, nxt, radius * 0.8

    # Legs: four segments each, small zig-zags so the rest pose already shows which way joints bend.
    lengths = s.leg_length * np.array([0.3, 0.3, 0.26, 0.14])
    for k, leg in enumerate(LEGS):
        front = leg.startswith("front")
        side = 1.0 if leg.endswith("left") else -1.0
        anchor = chest if front else pelvis
        zig = [-0.12, 0.05, 0.0, 0.1] if front else [0.2, -0.3, 0.0, 0.1]  # z offset per unit length
        radii = lr * np.array([1.9, 1.1, 0.85, 0.75, 0.9] if front else [2.1, 1.2, 0.85, 0.75, 0.9])
        pos = anchor + [side * 0.5 * g, -0.25 * g, 0.0]
        parent = "chest" if front else "pelvis"
        for i, name in enumerate(_leg_joints(leg)):
            joint(name, parent, pos)
            nxt = pos + lengths[i] * np.array([0.0, -1.0, zig[i]])
            seg(name, 7 + k, pos, nxt, radii[i], radii[i + 1])
            parent, pos = name, nxt

    index = {name: i for i, name in enumerate(JOINT_NAMES)}
    if set(index) != set(joints):
        raise RuntimeError(f"rig joints {sorted(joints)} do not match JOINT_NAMES")
    positions = np.stack([joints[n][1] for n in JOINT_NAMES]) * s.scale
    parents = np.array([index.get(joints[n][0], -1) for n in JOINT_NAMES], dtype=np.int64)
    owner, part, start, end, r0, r1 = zip(*segments, strict=True)
    start, end = np.stack(start) * s.scale, np.stack(end) * s.scale
    r0, r1 = np.array(r0) * s.scale, np.array(r1) * s.scale
    # Centre the body's bounding box (segments with their radii) on the origin.
    lo = np.minimum(start - r0[:, None], end - r1[:, None]).min(0)
    hi = np.maximum(start + r0[:, None], end + r1[:, None]).max(0)
    centre = 0.5 * (lo + hi)
    return Rig(
        names=JOINT_NAMES, parents=parents, positions=positions - centre,
        owner=np.array([index[o] for o in owner], dtype=np.int64), part=np.array(part, dtype=np.int64),
        start=start - centre, end=end - centre, radius0=r0, radius1=r1,
    )


def _segment_distance(points: np.ndarray, rig: Rig, s: int) -> np.ndarray:
    """Signed distance (approximate for tapered cones) from (..., 3) points to round cone s."""
    a, ab = rig.start[s], rig.end[s] - rig.start[s]
    t = np.clip(((points - a) @ ab) / max(ab @ ab, 1e-12), 0.0, 1.0)
    closest = a + t[..., None] * ab
    radius = rig.radius0[s] + t * (rig.radius1[s] - rig.radius0[s])
    return np.linalg.norm(points - closest, axis=-1) - radius


def implicit_surface(rig: Rig, voxel: float, blend: float) -> tuple[np.ndarray, np.ndarray]:
    """Polygonise the union of the rig's round cones (plain within a part, smooth across parts).

    Args:
        voxel: grid spacing (scene units); must resolve the thinnest segment.
        blend: smooth-union radius k (scene units): union = -k log(sum_parts exp(-d_part / k)).
    Returns:
        vertices (V, 3) float64 and faces (F, 3) int64 of a closed, outward-facing surface.
    """
    reach = 8.0 * blend  # a part farther than this changes the union by < k e^-8: skip it there
    lo = np.minimum(rig.start - rig.radius0[:, None], rig.end - rig.radius1[:, None]).min(0) - reach
    hi = np.maximum(rig.start + rig.radius0[:, None], rig.end + rig.radius1[:, None]).max(0) + reach
    lo -= 2 * voxel  # empty border: marching cubes closes the surface
    dims = np.ceil((hi - lo) / voxel).astype(int) + 4
    total = np.zeros(tuple(dims), dtype=np.float32)  # sum over parts of exp(-d_part / k)

    def box(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # grid index range around segments s
        a = np.minimum(rig.start[s] - rig.radius0[s, None], rig.end[s] - rig.radius1[s, None]).min(0) - reach
        b = np.maximum(rig.start[s] + rig.radius0[s, None], rig.end[s] + rig.radius1[s, None]).max(0) + reach
        first = np.maximum(np.floor((a - lo) / voxel).astype(int), 0)
        return first, np.minimum(np.ceil((b - lo) / voxel).astype(int) + 1, dims)

    for part in np.unique(rig.part):
        members = np.flatnonzero(rig.part == part)
        p0, p1 = box(members)
        dist = np.full(tuple(p1 - p0), reach, dtype=np.float32)  # plain union (min) within the part
        for s in members:
            i0, i1 = box(np.array([s]))
            axes = [lo[k] + voxel * np.arange(i0[k], i1[k]) for k in range(3)]
            grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (nx, ny, nz, 3)
            view = dist[i0[0] - p0[0]:i1[0] - p0[0], i0[1] - p0[1]:i1[1] - p0[1], i0[2] - p0[2]:i1[2] - p0[2]]
            np.minimum(view, _segment_distance(grid, rig, s), out=view)
        total[p0[0]:p1[0], p0[1]:p1[1], p0[2]:p1[2]] += np.exp(-dist / blend)
    field = -blend * np.log(np.maximum(total, np.exp(-reach / blend)))
    # A grid node (almost) on the surface puts the vertices of all its edges at one point: distinct
    # vertices that coincide once stored as float32, which tools that merge vertices see as a pinch.
    eps = np.float32(1e-3 * voxel)
    field = np.where(np.abs(field) < eps, np.where(field < 0, -eps, eps), field)
    verts, faces, _, _ = marching_cubes(field, level=0.0, spacing=(voxel,) * 3)
    return verts.astype(np.float64) + lo, faces.astype(np.int64)


def simplify(vertices: np.ndarray, faces: np.ndarray, target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Decimate to about `target_faces` triangles, keeping the surface closed and outward-facing.

    Returns (V, 3) float64 vertices and (F, 3) int64 faces with unreferenced vertices removed.
    """
    if len(faces) > target_faces:
        vertices, faces = fast_simplification.simplify(vertices, faces.astype(np.int32),
                                                       target_count=target_faces)
    # No vertex merging: the surface is closed by construction, and merging by position would turn
    # a place where two sheets touch into a non-manifold edge.
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    mesh.remove_unreferenced_vertices()
    if mesh.volume < 0:  # marching cubes' winding depends on the field's sign convention
        mesh.invert()
    return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)


def is_clean_surface(vertices: np.ndarray, faces: np.ndarray) -> bool:
    """Closed, consistently wound, one piece, and no two vertices at one float32 position.

    The last point matters to readers that merge coincident vertices (e.g. `trimesh.load`): for
    them two sheets that touch would make a non-manifold edge.
    """
    merged = trimesh.Trimesh(vertices.astype(np.float32), faces, process=True)
    return (len(merged.vertices) == len(vertices) and merged.is_watertight and merged.is_winding_consistent
            and merged.body_count == 1)


def skin_weights(vertices: np.ndarray, rig: Rig, falloff: float) -> tuple[np.ndarray, np.ndarray]:
    """Smooth linear-blend weights from distances to each joint's segments.

    Args:
        vertices: (V, 3) rest positions.
        falloff: distance scale (scene units) over which a joint's influence decays by e.
    Returns:
        joints (V, 4) int64 joint indices (into `rig.names`) and weights (V, 4) float32 summing to 1.
    """
    num_joints = len(rig.names)
    dist = np.full((len(vertices), num_joints), np.inf)
    for s in range(len(rig.owner)):
        j = rig.owner[s]
        dist[:, j] = np.minimum(dist[:, j], _segment_distance(vertices, rig, s))
    affinity = np.exp(-(dist - dist.min(axis=1, keepdims=True)) / falloff)  # (V, J), 1 for the closest
    order = np.argsort(-affinity, axis=1, kind="stable")
    top = np.take_along_axis(affinity, order, axis=1)
    # Subtract the 5th strongest so a joint's weight reaches 0 before it leaves the top four: no jumps.
    fifth = top[:, MAX_INFLUENCES : MAX_INFLUENCES + 1] if num_joints > MAX_INFLUENCES else 0.0
    weights = np.maximum(top[:, :MAX_INFLUENCES] - fifth, 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    return order[:, :MAX_INFLUENCES].astype(np.int64), weights.astype(np.float32)


def make_quadruped(name: str, rng: np.random.Generator, target_faces: int) -> SkinnedMesh:
    """One random animal as a `SkinnedMesh` (node 0 the mesh node, nodes 1.. the `JOINT_NAMES`).

    Args:
        name: model name (mesh and mesh-node name).
        rng: source of the shape parameters (the geometry is otherwise deterministic).
        target_faces: triangle count after decimation (the result is within a few of it).
    """
    shape = sample_shape(rng)
    rig = build_rig(shape)
    # Marching cubes gives about 2.8 area / voxel^2 triangles; aim at 4x the target so decimation has
    # room, but resolve the thinnest part (radius >= 1.6 voxels). Small budgets cannot show thin
    # parts anyway: there the voxel follows the budget and thin parts are thickened to 1.6 voxels.
    length = np.linalg.norm(rig.end - rig.start, axis=1)
    area = np.sum(np.pi * (rig.radius0 + rig.radius1) * np.hypot(length, rig.radius0 - rig.radius1))
    thinnest = min(rig.radius0.min(), rig.radius1.min())
    voxel = max(thinnest / 1.6, float(np.sqrt(0.7 * area / target_faces)))
    thick = 1.6 * voxel
    rig = replace(rig, radius0=np.maximum(rig.radius0, thick), radius1=np.maximum(rig.radius1, thick))
    for attempt in range(4):  # a slightly finer grid samples the field elsewhere (deterministic retries)
        verts, faces = implicit_surface(rig, voxel=voxel * 0.97**attempt, blend=0.035 * shape.scale)
        verts, faces = simplify(verts, faces, target_faces)
        if is_clean_surface(verts, faces):
            break
    else:
        raise RuntimeError(f"{name}: could not polygonise a clean closed surface (shape {shape})")
    joints, weights = skin_weights(verts, rig, falloff=0.04 * shape.scale)

    num_joints = len(rig.names)
    parents = np.concatenate([[-1], np.where(rig.parents < 0, -1, rig.parents + 1)])  # node = joint + 1
    parent_pos = np.where(rig.parents[:, None] < 0, 0.0, rig.positions[np.maximum(rig.parents, 0)])
    translation = np.concatenate([np.zeros((1, 3)), rig.positions - parent_pos])
    inverse_bind = np.tile(np.eye(4), (num_joints, 1, 1))
    inverse_bind[:, :3, 3] = -rig.positions  # rest rotations are identity: bind = translate(position)
    return SkinnedMesh(
        name=name, vertices=verts, faces=faces, joints=joints, weights=weights,
        joint_nodes=np.arange(1, num_joints + 1), inverse_bind=inverse_bind,
        node_names=(name,) + rig.names, parents=parents, rest_translation=translation,
        rest_rotation=np.tile([1.0, 0.0, 0.0, 0.0], (num_joints + 1, 1)),
        rest_scale=np.ones((num_joints + 1, 3)),
        mesh_node=0,
    )
