"""One skinned triangle mesh from a glTF 2.0 file (.gltf + .bin / data: URIs, or .glb), and back.

The reference dataset stores every animal as a glTF with exactly one mesh, one primitive of
triangles and one skin (JOINTS_0 / WEIGHTS_0). `load_skinned_mesh` reads such a file with
`pygltflib` (the JSON) and NumPy (the binary buffers, decoded with strides, never element by
element), validates everything a broken export can get wrong, and returns a `SkinnedMesh`. Users'
rigs often split the skinned mesh into one primitive per material: those are concatenated in file
order (`mesh_primitives`); materials and textures are read by `dualpm.gltf_material`, animation
clips by `dualpm.animation`, the low-level parts (document, buffers, accessors) by `dualpm.gltf_io`.
`save_skinned_mesh` writes one primitive (the synthetic data generator uses it; the reference reader
accepts exactly one).

Conventions: quaternions are real-first `[w, x, y, z]` (glTF stores `[x, y, z, w]`); glTF matrices
are column-major in the file; node transforms compose as `T @ R @ S`. The bind-pose POSITION values
are the canonical coordinates of the dual point maps.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pygltflib

from dualpm.errors import GltfError
from dualpm.fileio import atomic_write_bytes, atomic_write_text
from dualpm.gltf_io import (
    ARRAY_BUFFER,
    ELEMENT_ARRAY_BUFFER,
    FLOAT,
    TRIANGLES,
    UBYTE,
    UINT,
    USHORT,
    buffer_bytes,
    decompose,
    read_accessor,
    read_document,
)

_WEIGHT_SUM_TOLERANCE = 1e-2


@dataclass(frozen=True, eq=False)
class SkinnedMesh:
    """A skinned triangle mesh and its node hierarchy (NumPy arrays, read-only).

    V vertices, F faces, K influences per vertex (4 per JOINTS_n set), J skin joints, N nodes
    (all nodes of the file, in glTF order; the mesh node is one of them).
    """

    name: str
    vertices: np.ndarray  # (V, 3) float32 bind-pose positions = canonical coordinates
    faces: np.ndarray  # (F, 3) int64 vertex indices, counter-clockwise front faces
    joints: np.ndarray  # (V, K) int64 indices into the skin's joint list (not node indices)
    weights: np.ndarray  # (V, K) float32, rows sum to 1
    joint_nodes: np.ndarray  # (J,) int64 node index of each skin joint
    inverse_bind: np.ndarray  # (J, 4, 4) float32 inverse bind matrices (column-vector convention)
    node_names: tuple[str, ...]  # (N,) "" for unnamed nodes
    parents: np.ndarray  # (N,) int64 parent node index, -1 for roots
    rest_translation: np.ndarray  # (N, 3) float32
    rest_rotation: np.ndarray  # (N, 4) float32 real-first [w, x, y, z]
    rest_scale: np.ndarray  # (N, 3) float32
    mesh_node: int  # index of the node that instantiates the mesh with the skin
    source: Path | None = None

    def __post_init__(self):
        # Coerce to the documented dtypes and freeze the arrays, so a mesh built in code (the
        # synthetic generator) is held to the same contract as one loaded from a file.
        casts = {
            "vertices": np.float32, "faces": np.int64, "joints": np.int64, "weights": np.float32,
            "joint_nodes": np.int64, "inverse_bind": np.float32, "parents": np.int64,
            "rest_translation": np.float32, "rest_rotation": np.float32, "rest_scale": np.float32,
        }
        for key, dtype in casts.items():
            array = np.array(getattr(self, key), dtype=dtype, copy=True)
            array.flags.writeable = False
            object.__setattr__(self, key, array)
        object.__setattr__(self, "node_names", tuple(str(n) for n in self.node_names))
        v, n, j = len(self.vertices), len(self.node_names), len(self.joint_nodes)
        expected = {
            "vertices": (v, 3), "faces": (len(self.faces), 3), "joints": (v, self.joints.shape[-1]),
            "weights": self.joints.shape, "joint_nodes": (j,), "inverse_bind": (j, 4, 4),
            "parents": (n,), "rest_translation": (n, 3), "rest_rotation": (n, 4), "rest_scale": (n, 3),
        }
        for key, shape in expected.items():
            if getattr(self, key).shape != shape:
                got = getattr(self, key).shape
                raise ValueError(f"SkinnedMesh {self.name!r}: {key} has shape {got}, expected {shape}")
        if not 0 <= self.mesh_node < n:
            raise ValueError(f"SkinnedMesh {self.name!r}: mesh_node {self.mesh_node} is not one of {n} nodes")
        if ((self.parents < -1) | (self.parents >= n)).any() or ((self.joint_nodes < 0) | (self.joint_nodes >= n)).any():
            raise ValueError(f"SkinnedMesh {self.name!r}: parent or joint node index out of range")
        node_depths(self.parents)  # raises on a cycle

    @property
    def num_vertices(self) -> int:
        return len(self.vertices)

    @property
    def num_nodes(self) -> int:
        return len(self.node_names)

    @property
    def num_joints(self) -> int:
        return len(self.joint_nodes)


def node_depths(parents: np.ndarray) -> np.ndarray:
    """Depth of every node in a forest given by its parent array (roots have depth 0).

    Args:
        parents: (N,) int parent index per node, -1 for roots.
    Returns:
        (N,) int64 depths. Raises `ValueError` if following parents never reaches a root (a cycle).
    """
    parents = np.asarray(parents, dtype=np.int64)
    depth = np.zeros(len(parents), dtype=np.int64)
    cursor = parents.copy()
    # Pointer chasing, vectorised over nodes: each step moves every unfinished node one level up.
    for _ in range(len(parents) + 1):
        alive = cursor >= 0
        if not alive.any():
            return depth
        depth += alive
        cursor = np.where(alive, parents[np.maximum(cursor, 0)], -1)
    raise ValueError("the node hierarchy has a cycle")


def scaled_mesh(mesh: SkinnedMesh, factor: float) -> SkinnedMesh:
    """`mesh` scaled uniformly by `factor` about the world origin, rig included (e.g. cm -> m: 0.01).

    Conjugating every node's local transform and every inverse bind matrix by the scale S (a uniform
    scale commutes with rotations and node scales) multiplies their translations by `factor`; with
    the bind-pose vertices scaled too, every pose whose translations are scaled likewise skins to
    exactly S @ (the unscaled result). Rotations, node scales and weights are unchanged. Computed in
    float64 and rounded once to float32, so scaling a rig by 100 and back gives the same bits.
    """
    if not (np.isfinite(factor) and factor > 0):
        raise GltfError(f"{mesh.source or mesh.name}: scale factor must be a positive number, got {factor}")
    inverse_bind = mesh.inverse_bind.astype(np.float64)
    inverse_bind[:, :3, 3] *= factor
    return replace(
        mesh, vertices=mesh.vertices.astype(np.float64) * factor, inverse_bind=inverse_bind,
        rest_translation=mesh.rest_translation.astype(np.float64) * factor,
    )


# ---------------------------------------------------------------------------------------------
# Loading


def load_skinned_mesh(path: str | os.PathLike) -> SkinnedMesh:
    """Load and validate the single skinned triangle mesh of a .gltf or .glb file.

    Raises `GltfError` naming the file for anything that is not exactly one mesh of triangle
    primitives (concatenated in file order) and one skin with valid joints, weights and inverse
    bind matrices.
    """
    path = Path(path)
    doc, blob = read_document(path)
    buffers = [buffer_bytes(doc, i, blob, path) for i in range(len(doc.buffers))]

    def accessor(index: int | None, what: str, allowed: dict[str, set[int]]) -> np.ndarray:
        return read_accessor(doc, buffers, index, what, allowed, path)

    prims = mesh_primitives(doc, path)
    if not doc.skins:
        raise GltfError(f"{path}: the file has no skin; a skinned mesh is required")
    if len(doc.skins) > 1:
        raise GltfError(f"{path}: the file has {len(doc.skins)} skins; exactly one skin is supported")
    mesh = doc.meshes[0]
    # Several primitives (one per material, as exporters write them) are concatenated in file order:
    # vertices of primitive p follow those of p - 1 and its indices are offset to match.
    parts_v, parts_j, parts_w, parts_f, offset = [], [], [], [], 0
    for p, prim in enumerate(prims):
        where = f"primitive {p}: " if len(prims) > 1 else ""
        attrs = prim.attributes
        v = accessor(attrs.POSITION, f"{where}POSITION", {"VEC3": {FLOAT}})
        _require_finite(v, "POSITION", path)
        j, w = _read_influences(attrs, accessor, len(v), path, where)
        parts_v.append(v)
        parts_j.append(j)
        parts_w.append(w)
        parts_f.append(_read_indices(prim, accessor, len(v), path, where) + offset)
        offset += len(v)
    vertices = np.concatenate(parts_v)
    width = max(j.shape[1] for j in parts_j)  # pad primitives with fewer JOINTS_n sets with zero weights
    joints = np.concatenate([np.pad(j, ((0, 0), (0, width - j.shape[1]))) for j in parts_j])
    weights = np.concatenate([np.pad(w, ((0, 0), (0, width - w.shape[1]))) for w in parts_w])
    indices = np.concatenate(parts_f)
    if len(indices) == 0:
        raise GltfError(f"{path}: the mesh has no triangles")

    parents, translation, rotation, scale = _read_nodes(doc, path)
    num_nodes = len(parents)
    skin = doc.skins[0]
    joint_nodes = np.asarray(skin.joints or [], dtype=np.int64)
    if len(joint_nodes) == 0:
        raise GltfError(f"{path}: the skin has no joints")
    if joint_nodes.min() < 0 or joint_nodes.max() >= num_nodes:
        raise GltfError(f"{path}: skin joint node index out of range for {num_nodes} nodes")
    if len(np.unique(joint_nodes)) != len(joint_nodes):
        raise GltfError(f"{path}: the skin lists a node more than once in its joints")
    if joints.max() >= len(joint_nodes):
        raise GltfError(
            f"{path}: vertex joint index {joints.max()} out of range for the skin's {len(joint_nodes)} joints"
        )
    if skin.inverseBindMatrices is None:
        inverse_bind = np.broadcast_to(np.eye(4, dtype=np.float32), (len(joint_nodes), 4, 4))
    else:
        flat = accessor(skin.inverseBindMatrices, "inverseBindMatrices", {"MAT4": {FLOAT}})
        if len(flat) != len(joint_nodes):
            raise GltfError(f"{path}: {len(flat)} inverse bind matrices for {len(joint_nodes)} skin joints")
        _require_finite(flat, "inverse bind matrices", path)
        inverse_bind = flat.reshape(-1, 4, 4).transpose(0, 2, 1)  # (J, 16) column-major -> (J, 4, 4)

    mesh_nodes = [i for i, node in enumerate(doc.nodes) if node.mesh is not None]
    if len(mesh_nodes) != 1:
        raise GltfError(f"{path}: {len(mesh_nodes)} nodes instantiate the mesh; exactly one is supported")
    if doc.nodes[mesh_nodes[0]].skin != 0:
        raise GltfError(f"{path}: the mesh node {mesh_nodes[0]} does not use the skin")

    return SkinnedMesh(
        name=mesh.name or path.stem,
        vertices=vertices,
        faces=indices,
        joints=joints,
        weights=weights,
        joint_nodes=joint_nodes,
        inverse_bind=inverse_bind,
        node_names=tuple(node.name or "" for node in doc.nodes),
        parents=parents,
        rest_translation=translation,
        rest_rotation=rotation,
        rest_scale=scale,
        mesh_node=mesh_nodes[0],
        source=path,
    )


def mesh_primitives(doc: pygltflib.GLTF2, path: Path) -> list[pygltflib.Primitive]:
    """The primitives that make the skinned mesh: all of the file's single mesh, each of triangles.

    `dualpm.gltf_material` reads per-vertex appearance from the same list in the same order.
    """
    if not doc.meshes:
        raise GltfError(f"{path}: the file has no mesh")
    if len(doc.meshes) > 1:
        raise GltfError(f"{path}: the file has {len(doc.meshes)} meshes; exactly one mesh is supported")
    prims = doc.meshes[0].primitives or []
    if not prims:
        raise GltfError(f"{path}: the mesh has no primitives")
    for p, prim in enumerate(prims):
        if prim.mode not in (None, TRIANGLES):
            raise GltfError(f"{path}: primitive {p} mode {prim.mode} is not TRIANGLES (4); "
                            "only triangles supported")
    return prims


def _read_indices(prim, accessor, num_vertices: int, path: Path, where: str) -> np.ndarray:
    """(F, 3) int64 triangle vertex indices of one primitive (local to it)."""
    if prim.indices is None:
        if num_vertices % 3:
            raise GltfError(f"{path}: {where}non-indexed primitive has {num_vertices} vertices, "
                            "not a multiple of 3")
        indices = np.arange(num_vertices, dtype=np.int64)
    else:
        indices = accessor(prim.indices, f"{where}indices", {"SCALAR": {UBYTE, USHORT, UINT}})
        indices = indices[:, 0].astype(np.int64)
        if len(indices) % 3:
            raise GltfError(f"{path}: {where}{len(indices)} indices is not a multiple of 3 (triangles)")
        if len(indices) and indices.max() >= num_vertices:
            raise GltfError(f"{path}: {where}index {indices.max()} out of range for {num_vertices} vertices")
    return indices.reshape(-1, 3)


def _read_influences(attrs, accessor, num_vertices: int, path: Path,
                     where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """JOINTS_n / WEIGHTS_n sets concatenated to (V, 4 * sets) arrays; weights renormalised."""
    joint_sets, weight_sets = [], []
    for n in range(64):  # glTF has no upper bound; 64 sets (256 influences) is far beyond real data
        j_index, w_index = getattr(attrs, f"JOINTS_{n}", None), getattr(attrs, f"WEIGHTS_{n}", None)
        if j_index is None and w_index is None:
            break
        if j_index is None or w_index is None:
            missing = "JOINTS" if j_index is None else "WEIGHTS"
            raise GltfError(f"{path}: {where}the primitive has no {missing}_{n} attribute; "
                            f"JOINTS_{n} and WEIGHTS_{n} must come in pairs")
        joint_sets.append(accessor(j_index, f"JOINTS_{n}", {"VEC4": {UBYTE, USHORT}}).astype(np.int64))
        weights = accessor(w_index, f"WEIGHTS_{n}", {"VEC4": {FLOAT, UBYTE, USHORT}})
        if weights.dtype != np.float32:
            raise GltfError(f"{path}: WEIGHTS_{n} has integer components but is not normalized")
        weight_sets.append(weights)
    if not joint_sets:
        raise GltfError(f"{path}: {where}the primitive has no JOINTS_0/WEIGHTS_0 attributes (not skinned)")
    for n, (j, w) in enumerate(zip(joint_sets, weight_sets, strict=True)):
        if len(j) != num_vertices or len(w) != num_vertices:
            raise GltfError(
                f"{path}: JOINTS_{n}/WEIGHTS_{n} have {len(j)}/{len(w)} entries for {num_vertices} vertices"
            )
    joints, weights = np.concatenate(joint_sets, axis=1), np.concatenate(weight_sets, axis=1)
    _require_finite(weights, "WEIGHTS", path)
    if (weights < 0).any():
        raise GltfError(f"{path}: negative skin weights")
    sums = weights.sum(axis=1, dtype=np.float64)
    bad = np.abs(sums - 1) > _WEIGHT_SUM_TOLERANCE
    if bad.any():
        v = int(np.argmax(bad))
        raise GltfError(f"{path}: skin weights of {int(bad.sum())} vertices do not sum to 1 "
                        f"(vertex {v} sums to {sums[v]:.4f})")
    # Exporters quantise weights; renormalise rows that are off by more than float32 rounding
    # (rows already summing to 1 stay bit-identical, so save -> load round trips exactly).
    off = np.abs(sums - 1) > 1e-6
    weights[off] = (weights[off] / sums[off, None]).astype(np.float32)
    return joints, weights


def _require_finite(values: np.ndarray, what: str, path: Path) -> None:
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise GltfError(f"{path}: {what} contain NaN or infinite values")


def _read_nodes(doc: pygltflib.GLTF2, path: Path) -> tuple[np.ndarray, ...]:
    """Parents (N,) and rest TRS (N,3), (N,4 wxyz), (N,3) of all nodes; matrices decomposed."""
    n = len(doc.nodes)
    parents = np.full(n, -1, dtype=np.int64)
    translation = np.zeros((n, 3), dtype=np.float64)
    rotation = np.tile(np.array([1.0, 0, 0, 0]), (n, 1))
    scale = np.ones((n, 3), dtype=np.float64)
    for i, node in enumerate(doc.nodes):
        for child in node.children or []:
            if not 0 <= child < n:
                raise GltfError(f"{path}: node {i} has child {child}, but there are only {n} nodes")
            if parents[child] != -1:
                raise GltfError(f"{path}: node {child} has two parents ({parents[child]} and {i})")
            parents[child] = i
        has_trs = any(x is not None for x in (node.translation, node.rotation, node.scale))
        if node.matrix is not None:
            if has_trs:
                raise GltfError(f"{path}: node {i} has both a matrix and translation/rotation/scale")
            translation[i], rotation[i], scale[i] = decompose(node.matrix, f"{path}: node {i} matrix")
        else:
            for value, out, size, key in (
                (node.translation, translation, 3, "translation"),
                (node.rotation, rotation, 4, "rotation"),
                (node.scale, scale, 3, "scale"),
            ):
                if value is None:
                    continue
                if len(value) != size:
                    raise GltfError(f"{path}: node {i} {key} has {len(value)} values, expected {size}")
                out[i] = value
            if node.rotation is not None:
                rotation[i] = np.roll(rotation[i], 1)  # glTF [x, y, z, w] -> [w, x, y, z]
    for key, values in (("translation", translation), ("rotation", rotation), ("scale", scale)):
        if not np.isfinite(values).all():
            raise GltfError(f"{path}: a node {key} has NaN or infinite values")
    if (np.linalg.norm(rotation, axis=1) < 1e-8).any():
        raise GltfError(f"{path}: a node rotation is the zero quaternion")
    try:
        node_depths(parents)
    except ValueError as err:
        raise GltfError(f"{path}: {err}") from err
    return parents, translation.astype(np.float32), rotation.astype(np.float32), scale.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Saving


def save_skinned_mesh(mesh: SkinnedMesh, path: str | os.PathLike) -> None:
    """Write `mesh` as a .gltf (+ sibling `<stem>.bin`) or .glb, chosen by the suffix of `path`.

    Joints are stored as UNSIGNED_SHORT, weights as FLOAT, indices as UNSIGNED_INT; more than 4
    influences become extra JOINTS_1/WEIGHTS_1... sets (padded with zero weights to a multiple
    of 4). Files appear atomically (the .bin first, then the .gltf that refers to it).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gltf", ".glb"):
        raise GltfError(f"{path}: cannot save a skinned mesh with suffix {path.suffix!r} (use .gltf or .glb)")
    if mesh.num_joints > 65536:
        raise GltfError(f"{path}: {mesh.num_joints} joints do not fit UNSIGNED_SHORT joint indices")

    sets = -(-mesh.joints.shape[1] // 4)  # ceil(K / 4)
    pad = sets * 4 - mesh.joints.shape[1]
    joints = np.pad(mesh.joints, ((0, 0), (0, pad))).astype("<u2")
    weights = np.pad(mesh.weights, ((0, 0), (0, pad))).astype("<f4")

    blob = bytearray()
    gltf = pygltflib.GLTF2()

    def add(array: np.ndarray, accessor_type: str, component: int, target: int | None, **extra) -> int:
        # Every array here is a multiple of 4 bytes long, so views stay 4-byte aligned.
        data = np.ascontiguousarray(array).tobytes()
        gltf.bufferViews.append(
            pygltflib.BufferView(buffer=0, byteOffset=len(blob), byteLength=len(data), target=target)
        )
        blob.extend(data)
        gltf.accessors.append(
            pygltflib.Accessor(
                bufferView=len(gltf.bufferViews) - 1, componentType=component,
                count=len(array), type=accessor_type, **extra,
            )
        )
        return len(gltf.accessors) - 1

    v = mesh.vertices.astype("<f4")
    attributes = {
        "POSITION": add(v, "VEC3", FLOAT, ARRAY_BUFFER,
                        min=v.min(axis=0).tolist(), max=v.max(axis=0).tolist()),
    }
    for s in range(sets):
        attributes[f"JOINTS_{s}"] = add(joints[:, 4 * s : 4 * s + 4], "VEC4", USHORT, ARRAY_BUFFER)
        attributes[f"WEIGHTS_{s}"] = add(weights[:, 4 * s : 4 * s + 4], "VEC4", FLOAT, ARRAY_BUFFER)
    indices = add(mesh.faces.reshape(-1).astype("<u4"), "SCALAR", UINT, ELEMENT_ARRAY_BUFFER)
    # (J, 4, 4) rows -> column-major (J, 16)
    ibm = add(mesh.inverse_bind.transpose(0, 2, 1).reshape(-1, 16).astype("<f4"), "MAT4", FLOAT, None)

    gltf.meshes.append(pygltflib.Mesh(
        name=mesh.name,
        primitives=[pygltflib.Primitive(attributes=pygltflib.Attributes(**attributes), indices=indices,
                                        mode=TRIANGLES)],
    ))
    gltf.skins.append(pygltflib.Skin(inverseBindMatrices=ibm, joints=mesh.joint_nodes.tolist()))
    for i in range(mesh.num_nodes):
        node = pygltflib.Node(
            name=mesh.node_names[i] or None,
            translation=mesh.rest_translation[i].tolist(),
            rotation=np.roll(mesh.rest_rotation[i], -1).tolist(),  # [w, x, y, z] -> glTF [x, y, z, w]
            scale=mesh.rest_scale[i].tolist(),
            children=np.flatnonzero(mesh.parents == i).tolist(),
        )
        if i == mesh.mesh_node:
            node.mesh, node.skin = 0, 0
        gltf.nodes.append(node)
    gltf.scenes.append(pygltflib.Scene(nodes=np.flatnonzero(mesh.parents < 0).tolist()))
    gltf.scene = 0
    gltf.asset = pygltflib.Asset(generator="dualpm", version="2.0")

    if suffix == ".glb":
        gltf.buffers.append(pygltflib.Buffer(byteLength=len(blob)))
        gltf.set_binary_blob(bytes(blob))
        atomic_write_bytes(path, b"".join(gltf.save_to_bytes()))
    else:
        bin_name = f"{path.stem}.bin"
        gltf.buffers.append(pygltflib.Buffer(uri=urllib.parse.quote(bin_name), byteLength=len(blob)))
        atomic_write_bytes(path.with_name(bin_name), bytes(blob))
        atomic_write_text(path, gltf.gltf_to_json())
