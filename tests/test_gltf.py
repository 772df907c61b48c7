"""glTF/GLB loading and saving of one skinned mesh.

The test files are written here with pygltflib directly (not with `save_skinned_mesh`): a bar of
four quads skinned to two bones, with an interleaved vertex buffer (byteStride), non-zero
bufferView/accessor offsets, child nodes listed before their parents, a node given as a matrix.
"""

from __future__ import annotations

import base64
import math

import numpy as np
import pygltflib
import pytest
import torch
import trimesh

from dualpm.errors import GltfError
from dualpm.gltf import SkinnedMesh, load_skinned_mesh, node_depths, save_skinned_mesh, scaled_mesh
from dualpm.skinning import rest_pose, skin

COMPONENT = {np.dtype("u1"): 5121, np.dtype("u2"): 5123, np.dtype("u4"): 5125, np.dtype("f4"): 5126}

# Bar in the xy plane: vertex 2*i + r at (0.5 i, 0.2 r, 0), i = 0..4, r = 0..1.
POSITIONS = np.array([[0.5 * i, 0.2 * r, 0.0] for i in range(5) for r in range(2)], dtype=np.float32)
INDICES = np.array([[2 * q, 2 * q + 2, 2 * q + 3, 2 * q, 2 * q + 3, 2 * q + 1] for q in range(4)]).reshape(-1)
JOINTS = np.array([[0, 1, 0, 0]] * 10)
# Raw normalised UNSIGNED_BYTE weights: left half bone 0, right half bone 1, the middle shared.
# Vertex 5 sums to 254/255 (an exporter's rounding): within tolerance, renormalised on load.
WEIGHTS_U8 = np.array(
    [[255, 0, 0, 0]] * 4 + [[128, 127, 0, 0], [200, 54, 0, 0]] + [[0, 255, 0, 0]] * 4, dtype=np.uint8
)
# Nodes: 0 mesh node, 1 bone1 (child of 3), 2 armature (root, given as a matrix), 3 bone0 (child of 2).
NODE_NAMES = ("bar", "bone1", "armature", "bone0")
PARENTS = [-1, 3, -1, 2]
JOINT_NODES = [3, 1]
ARMATURE_T, ARMATURE_S = np.array([0.0, 1.0, 0.0]), np.array([1.0, 2.0, 3.0])
ARMATURE_Q = np.array([math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)])  # 90 deg about z, wxyz
# Asymmetric inverse bind matrices, so a transposition error cannot go unnoticed.
IBM = np.array(
    [
        [[1, 0, 0, -0.1], [0, 1, 0, -0.2], [0, 0, 1, -0.3], [0, 0, 0, 1]],
        [[1, 0, 0, -1.0], [0, 0, -1, 0.5], [0, 1, 0, 0.25], [0, 0, 0, 1]],
    ],
    dtype=np.float32,
)


def armature_matrix() -> np.ndarray:
    c, s = math.cos(math.pi / 2), math.sin(math.pi / 2)
    m = np.eye(4)
    m[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(ARMATURE_S)
    m[:3, 3] = ARMATURE_T
    return m


def build(
    *,
    positions=POSITIONS,
    joints=JOINTS.astype(np.uint8),
    weights=WEIGHTS_U8,
    indices=INDICES.astype(np.uint16),
    ibm=IBM,
    armature=None,
) -> tuple[pygltflib.GLTF2, bytes]:
    """A glTF document and its binary buffer; `indices=None` makes a non-indexed primitive."""
    vertex = np.dtype([("p", "<f4", 3), ("j", joints.dtype, 4), ("w", weights.dtype, 4)])
    assert vertex.itemsize % 4 == 0
    interleaved = np.zeros(len(positions), dtype=vertex)
    interleaved["p"], interleaved["j"], interleaved["w"] = positions, joints, weights
    # Buffer: 8 bytes of padding, IBMs (column-major), interleaved vertices, indices.
    parts = [b"\xff" * 8, ibm.transpose(0, 2, 1).astype("<f4").tobytes(), interleaved.tobytes()]
    offsets = np.cumsum([0] + [len(p) for p in parts])
    views = [
        pygltflib.BufferView(buffer=0, byteOffset=int(offsets[1]), byteLength=len(parts[1])),
        pygltflib.BufferView(buffer=0, byteOffset=int(offsets[2]), byteLength=len(parts[2]),
                             byteStride=vertex.itemsize, target=34962),
    ]
    accessors = [
        pygltflib.Accessor(bufferView=0, componentType=5126, count=len(ibm), type="MAT4"),
        pygltflib.Accessor(bufferView=1, byteOffset=0, componentType=5126, count=len(positions), type="VEC3",
                           min=np.nanmin(positions, 0).tolist(), max=np.nanmax(positions, 0).tolist()),
        pygltflib.Accessor(bufferView=1, byteOffset=vertex.fields["j"][1],
                           componentType=COMPONENT[joints.dtype], count=len(positions), type="VEC4"),
        pygltflib.Accessor(bufferView=1, byteOffset=vertex.fields["w"][1],
                           componentType=COMPONENT[weights.dtype], normalized=weights.dtype.kind == "u",
                           count=len(positions), type="VEC4"),
    ]
    index_accessor = None
    if indices is not None:
        # Two junk elements before the indices exercise the accessor's own byteOffset.
        data = np.concatenate([[7, 7], indices]).astype(indices.dtype).tobytes()
        data += b"\0" * (-len(data) % 4)
        views.append(
            pygltflib.BufferView(buffer=0, byteOffset=int(offsets[3]), byteLength=len(data), target=34963)
        )
        accessors.append(pygltflib.Accessor(bufferView=2, byteOffset=2 * indices.dtype.itemsize,
                                            componentType=COMPONENT[indices.dtype], count=len(indices),
                                            type="SCALAR"))
        parts.append(data)
        index_accessor = 4
    blob = b"".join(parts)
    matrix = armature_matrix() if armature is None else armature
    gltf = pygltflib.GLTF2(
        scene=0,
        scenes=[pygltflib.Scene(nodes=[0, 2])],
        nodes=[
            pygltflib.Node(name="bar", mesh=0, skin=0, translation=[5.0, 0.0, 0.0]),
            pygltflib.Node(name="bone1", translation=[1.0, 0.0, 0.0], rotation=[0.0, 0.6, 0.0, 0.8]),
            pygltflib.Node(name="armature", matrix=matrix.T.reshape(-1).tolist(), children=[3]),
            pygltflib.Node(name="bone0", children=[1]),
        ],
        meshes=[pygltflib.Mesh(name="bar", primitives=[pygltflib.Primitive(
            attributes=pygltflib.Attributes(POSITION=1, JOINTS_0=2, WEIGHTS_0=3), indices=index_accessor)])],
        skins=[pygltflib.Skin(joints=JOINT_NODES, inverseBindMatrices=0)],
        accessors=accessors,
        bufferViews=views,
        buffers=[pygltflib.Buffer(byteLength=len(blob))],
    )
    return gltf, blob


def write(gltf: pygltflib.GLTF2, blob: bytes, path, container: str = "bin"):
    """Write as .gltf + external .bin (name with a space, percent-encoded), data: URI, or .glb."""
    if container == "glb":
        path = path.with_suffix(".glb")
        gltf.buffers[0].uri = None
        gltf.set_binary_blob(blob)
        path.write_bytes(b"".join(gltf.save_to_bytes()))
        return path
    path = path.with_suffix(".gltf")
    if container == "datauri":
        gltf.buffers[0].uri = "data:application/octet-stream;base64," + base64.b64encode(blob).decode()
    elif gltf.buffers[0].uri is None:
        gltf.buffers[0].uri = "bar%20data.bin"
        (path.parent / "bar data.bin").write_bytes(blob)
    path.write_text(gltf.gltf_to_json())
    return path


@pytest.mark.parametrize(
    "container,joints_dtype,weights_dtype,indices_dtype",
    [
        ("bin", "u1", "u1", "u1"),
        ("glb", "u2", "u1", "u2"),
        ("datauri", "u1", "u2", "u4"),
        ("bin", "u2", "f4", "u2"),
    ],
)
def test_load_every_field(tmp_path, container, joints_dtype, weights_dtype, indices_dtype):
    if weights_dtype == "u2":
        weights = (WEIGHTS_U8.astype(np.float64) / 255 * 65535).round().astype(np.uint16)
        raw = weights / 65535.0
    elif weights_dtype == "f4":
        weights = (WEIGHTS_U8 / 255.0).astype(np.float32)
        raw = weights.astype(np.float64)
    else:
        weights, raw = WEIGHTS_U8, WEIGHTS_U8 / 255.0
    joints, indices = JOINTS.astype(joints_dtype), INDICES.astype(indices_dtype)
    gltf, blob = build(joints=joints, weights=weights, indices=indices)
    path = write(gltf, blob, tmp_path / "bar", container)

    mesh = load_skinned_mesh(path)

    assert mesh.name == "bar" and mesh.source == path and mesh.mesh_node == 0
    np.testing.assert_array_equal(mesh.vertices, POSITIONS)
    assert mesh.vertices.dtype == np.float32
    np.testing.assert_array_equal(mesh.faces, INDICES.reshape(-1, 3))
    assert mesh.faces.dtype == np.int64 and mesh.joints.dtype == np.int64
    np.testing.assert_array_equal(mesh.joints, JOINTS)
    np.testing.assert_allclose(mesh.weights, raw / raw.sum(1, keepdims=True), rtol=0, atol=1e-7)
    np.testing.assert_allclose(mesh.weights.sum(1), 1, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(mesh.joint_nodes, JOINT_NODES)
    np.testing.assert_array_equal(mesh.inverse_bind, IBM)
    assert mesh.node_names == NODE_NAMES
    np.testing.assert_array_equal(mesh.parents, PARENTS)
    np.testing.assert_allclose(mesh.rest_translation, [[5, 0, 0], [1, 0, 0], ARMATURE_T, [0, 0, 0]],
                               atol=1e-7)
    np.testing.assert_allclose(mesh.rest_rotation, [[1, 0, 0, 0], [0.8, 0, 0.6, 0], ARMATURE_Q, [1, 0, 0, 0]],
                               atol=1e-7)
    np.testing.assert_allclose(mesh.rest_scale, [[1, 1, 1], [1, 1, 1], ARMATURE_S, [1, 1, 1]], atol=1e-6)
    assert (mesh.num_vertices, mesh.num_nodes, mesh.num_joints) == (10, 4, 2)


def test_non_indexed_and_absent_inverse_binds(tmp_path):
    faces = INDICES.reshape(-1, 3)
    gltf, blob = build(positions=POSITIONS[INDICES], joints=JOINTS[INDICES].astype(np.uint8),
                       weights=WEIGHTS_U8[INDICES], indices=None)
    gltf.skins[0].inverseBindMatrices = None
    mesh = load_skinned_mesh(write(gltf, blob, tmp_path / "flat"))
    np.testing.assert_array_equal(mesh.vertices, POSITIONS[INDICES])
    np.testing.assert_array_equal(mesh.faces, np.arange(faces.size).reshape(-1, 3))
    np.testing.assert_array_equal(mesh.inverse_bind, np.broadcast_to(np.eye(4), (2, 4, 4)))


def test_node_depths():
    np.testing.assert_array_equal(node_depths(np.array([-1, 3, -1, 2, 1])), [0, 2, 0, 1, 3])
    with pytest.raises(ValueError, match="cycle"):
        node_depths(np.array([1, 0, -1]))


# ---- saving -----------------------------------------------------------------------------------


def assert_same_mesh(a: SkinnedMesh, b: SkinnedMesh) -> None:
    assert a.name == b.name and a.node_names == b.node_names and a.mesh_node == b.mesh_node
    for key in ("vertices", "faces", "joints", "weights", "joint_nodes", "inverse_bind", "parents",
                "rest_translation", "rest_rotation", "rest_scale"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)
        assert getattr(a, key).dtype == getattr(b, key).dtype, key


@pytest.mark.parametrize("suffix", [".gltf", ".glb"])
def test_save_load_round_trip_and_trimesh(tmp_path, suffix):
    gltf, blob = build()
    original = load_skinned_mesh(write(gltf, blob, tmp_path / "src"))
    out = tmp_path / "out" / f"saved{suffix}"
    save_skinned_mesh(original, out)

    assert_same_mesh(load_skinned_mesh(out), original)
    expected = {"saved.gltf", "saved.bin"} if suffix == ".gltf" else {"saved.glb"}
    assert {p.name for p in out.parent.iterdir()} == expected  # no temporaries left behind

    scene = trimesh.load(out, process=False)
    (geometry,) = scene.geometry.values()
    np.testing.assert_array_equal(np.asarray(geometry.vertices, dtype=np.float32), original.vertices)
    np.testing.assert_array_equal(geometry.faces, original.faces)


@pytest.mark.parametrize("factor", [100.0, 0.01, 2.54])
def test_scaled_mesh_skins_to_the_scaled_result(tmp_path, factor):
    # The test rig has a rotated, non-uniformly scaled armature node: a uniform scale still commutes.
    gltf, blob = build()
    mesh = load_skinned_mesh(write(gltf, blob, tmp_path / "src"))
    big = scaled_mesh(mesh, factor)
    rng = np.random.default_rng(1)
    pose = rest_pose(mesh).astype(np.float64)
    pose[:, :4] = rng.normal(size=(mesh.num_nodes, 4))  # any rotations, rest translations
    big_pose = pose.copy()
    big_pose[:, 4:] *= factor  # a pose of the scaled rig: its translations scale too
    expected = factor * skin(mesh, pose, dtype=torch.float64)
    got = skin(big, big_pose, dtype=torch.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * factor)
    np.testing.assert_array_equal(big.rest_scale, mesh.rest_scale)
    np.testing.assert_array_equal(big.rest_rotation, mesh.rest_rotation)
    np.testing.assert_array_equal(big.inverse_bind[:, :3, :3], mesh.inverse_bind[:, :3, :3])
    with pytest.raises(GltfError, match="positive"):
        scaled_mesh(mesh, -1.0)


def test_save_more_than_four_influences(tmp_path):
    rng = np.random.default_rng(0)
    v, k = 12, 6
    weights = rng.random((v, k)).astype(np.float32)
    weights /= weights.sum(1, keepdims=True)
    mesh = SkinnedMesh(
        name="six", vertices=rng.random((v, 3)), faces=np.arange(v).reshape(-1, 3),
        joints=rng.integers(0, 3, (v, k)), weights=weights, joint_nodes=[1, 2, 3],
        inverse_bind=np.tile(np.eye(4), (3, 1, 1)), node_names=("six", "a", "b", "c"), parents=[-1, -1, 1, 2],
        rest_translation=rng.random((4, 3)), rest_rotation=np.tile([1, 0, 0, 0], (4, 1)),
        rest_scale=np.ones((4, 3)), mesh_node=0,
    )
    path = tmp_path / "six.gltf"
    save_skinned_mesh(mesh, path)
    raw = pygltflib.GLTF2.load(path)
    assert raw.meshes[0].primitives[0].attributes.JOINTS_1 is not None
    loaded = load_skinned_mesh(path)
    # Two sets of 4: the 2 padding slots carry zero weight.
    assert loaded.joints.shape == (v, 8)
    np.testing.assert_array_equal(loaded.joints[:, :k], mesh.joints)
    np.testing.assert_array_equal(loaded.weights[:, :k], mesh.weights)
    np.testing.assert_array_equal(loaded.weights[:, k:], 0)


def test_save_refuses_unknown_suffix(tmp_path):
    gltf, blob = build()
    mesh = load_skinned_mesh(write(gltf, blob, tmp_path / "src"))
    with pytest.raises(GltfError, match="suffix"):
        save_skinned_mesh(mesh, tmp_path / "mesh.obj")


@pytest.mark.parametrize(
    "weights,parents,phrase",
    [(np.zeros((3, 3)), [-1, 0], "weights has shape"), (np.zeros((3, 4)), [1, 0], "cycle")],
)
def test_inconsistent_mesh_is_refused(weights, parents, phrase):
    with pytest.raises(ValueError, match=phrase):
        SkinnedMesh(
            name="x", vertices=np.zeros((3, 3)), faces=[[0, 1, 2]], joints=np.zeros((3, 4)),
            weights=weights, joint_nodes=[0], inverse_bind=np.eye(4)[None], node_names=("x", "j"),
            parents=parents, rest_translation=np.zeros((2, 3)), rest_rotation=[[1, 0, 0, 0]] * 2,
            rest_scale=np.ones((2, 3)), mesh_node=0,
        )


# ---- bad inputs ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(GltfError, match="not found"):
        load_skinned_mesh(tmp_path / "nope.gltf")


@pytest.mark.parametrize(
    "name,content,phrase",
    [
        ("a.gltf", b"hello", "not a glTF file"),
        ("a.gltf", b'{"meshes": []}', "no 'asset'"),
        ("a.glb", b"\x00" * 64, "not a glTF binary"),
        ("a.obj", b"v 0 0 0", "expected suffix"),
    ],
)
def test_not_gltf(tmp_path, name, content, phrase):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(GltfError, match=phrase):
        load_skinned_mesh(tmp_path / name)


def edit_and_load(tmp_path, edit, container="bin", **arrays):
    gltf, blob = build(**arrays)
    edit(gltf)
    return load_skinned_mesh(write(gltf, blob, tmp_path / "bad", container))


def _set(obj, **values):
    for key, value in values.items():
        setattr(obj, key, value)


def _second_mesh(g):
    g.meshes.append(g.meshes[0])


def _second_primitive_lines(g):
    g.meshes[0].primitives.append(pygltflib.Primitive(attributes=g.meshes[0].primitives[0].attributes, mode=1))


def _sparse(g):
    g.accessors[1].sparse = pygltflib.Sparse(count=1, indices=pygltflib.AccessorSparseIndices(
        bufferView=0, componentType=5123), values=pygltflib.AccessorSparseValues(bufferView=0))


@pytest.mark.parametrize(
    "edit,phrase",
    [
        (lambda g: (_set(g, skins=[]), _set(g.nodes[0], skin=None)), "no skin"),
        (lambda g: _set(g, meshes=[]), "no mesh"),
        (_second_mesh, "2 meshes"),
        (_second_primitive_lines, "primitive 1 mode 1"),
        (lambda g: _set(g.meshes[0].primitives[0], mode=1), "not TRIANGLES"),
        (lambda g: _set(g.meshes[0].primitives[0].attributes, JOINTS_0=None), "no JOINTS_0"),
        (lambda g: _set(g.meshes[0].primitives[0].attributes, WEIGHTS_0=None), "no WEIGHTS_0"),
        (lambda g: _set(g.meshes[0].primitives[0].attributes, JOINTS_0=None, WEIGHTS_0=None), "not skinned"),
        (_sparse, "sparse"),
        (lambda g: _set(g.nodes[3], children=[1, 2]), "cycle"),
        (lambda g: _set(g.nodes[0], children=[3]), "two parents"),
        (lambda g: _set(g.nodes[0], mesh=None), "0 nodes instantiate the mesh"),
        (lambda g: _set(g.skins[0], joints=[3, 3]), "more than once"),
        (lambda g: _set(g.accessors[1], count=11), "outside its bufferView"),
    ],
)
def test_bad_structure(tmp_path, edit, phrase):
    with pytest.raises(GltfError, match=phrase):
        edit_and_load(tmp_path, edit)


def _corrupt(array, index, value):
    array = array.copy()
    array[index] = value
    return array


@pytest.mark.parametrize(
    "arrays,phrase",
    [
        ({"positions": _corrupt(POSITIONS, (3, 1), np.nan)}, "POSITION contain NaN"),
        ({"weights": _corrupt((WEIGHTS_U8 / 255).astype(np.float32), (2, 0), np.inf)}, "WEIGHTS contain NaN"),
        ({"ibm": _corrupt(IBM, (1, 0, 3), np.nan)}, "inverse bind matrices contain NaN"),
        ({"joints": _corrupt(JOINTS.astype(np.uint8), (7, 2), 2)}, "joint index 2 out of range"),
        ({"weights": _corrupt(WEIGHTS_U8, (0, 0), 240)}, "do not sum to 1"),
        ({"weights": _corrupt((WEIGHTS_U8 / 255).astype(np.float32), (0, 1), -0.5)}, "negative"),
        ({"indices": _corrupt(INDICES.astype(np.uint16), 5, 10)}, "index 10 out of range"),
        ({"armature": np.diag([1.0, -1.0, 1.0, 1.0])}, "negative"),
        ({"armature": np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])}, "shear"),
    ],
)
def test_bad_values(tmp_path, arrays, phrase):
    with pytest.raises(GltfError, match=phrase):
        edit_and_load(tmp_path, lambda g: None, **arrays)


@pytest.mark.parametrize(
    "uri,phrase",
    [
        ("../outside.bin", "escapes"),
        ("sub/../../outside.bin", "escapes"),
        ("/etc/outside.bin", "absolute"),
        ("http://example.com/outside.bin", "URL scheme 'http'"),
        ("file:///etc/passwd", "URL scheme 'file'"),
        ("data:application/octet-stream,abc", "not base64"),
        ("missing.bin", "not found"),
    ],
)
def test_bad_buffer_uri(tmp_path, uri, phrase):
    gltf, blob = build()
    (tmp_path / "outside.bin").write_bytes(blob)  # exists, but outside the glTF's folder
    folder = tmp_path / "model"
    folder.mkdir()
    gltf.buffers[0].uri = uri
    with pytest.raises(GltfError, match=phrase):
        load_skinned_mesh(write(gltf, blob, folder / "bar"))


def test_short_buffer(tmp_path):
    gltf, blob = build()
    (tmp_path / "short.bin").write_bytes(blob[:-8])
    gltf.buffers[0].uri = "short.bin"
    with pytest.raises(GltfError, match="less than its byteLength"):
        load_skinned_mesh(write(gltf, blob, tmp_path / "bar"))
