"""animation.glb: the user's own glTF document with one animation and a camera added (pygltflib + numpy).

Nothing of the document is rebuilt: meshes, skins, materials, textures, extensions and all other nodes
stay as they are. What changes, and why:

- every buffer is packed into the one GLB binary chunk (their bufferViews are re-pointed), and images
  stored as files beside the rig are embedded (a GLB carries everything; a relative URI would break
  once the file moves). URIs are read only inside the rig's folder (`fileio.safe_join`).
- an animated node that held a `matrix` gets the equivalent translation/rotation/scale (glTF forbids
  animating matrix nodes);
- one animation: per animated node a translation, rotation and scale channel, LINEAR samplers, one key per
  frame at `fps`; quaternions (glTF order x, y, z, w) kept in one hemisphere from key to key;
- one perspective camera and its node `dualpm_camera` (added to the scene's roots), whose translation is
  animated so that viewing through it reproduces each input view (see `dualpm.animate.fit.CameraTrack`;
  frames of different focal lengths: see `_add_camera`).
"""

from __future__ import annotations

import mimetypes
import os
import urllib.parse
from pathlib import Path

import numpy as np
import pygltflib

from dualpm.animate.fit import CameraTrack
from dualpm.camera import SENSOR_HEIGHT_MM
from dualpm.errors import GltfError
from dualpm.fileio import UnsafePathError, atomic_write_bytes, safe_join
from dualpm.gltf import load_skinned_mesh
from dualpm.gltf_io import read_gltf_document

ANIMATION_NAME = "dualpm"
CAMERA_NAME = "dualpm_camera"
_FLOAT = 5126
_IMAGE_TYPES = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"\xabKTX 20": "image/ktx2"}
# Core glTF, EXT_texture_webp and KHR_texture_basisu.
_IMAGE_MIMES = ("image/png", "image/jpeg", "image/webp", "image/ktx2")


def continuous_quaternions(quat: np.ndarray) -> np.ndarray:
    """Flip signs so that consecutive keys lie in one hemisphere (no 360-degree detour when interpolated).

    Args:
        quat: (F, ..., 4) quaternions over F frames (any component order).
    Returns:
        (F, ..., 4) same rotations, `dot(q[f], q[f-1]) >= 0` for every f >= 1.
    """
    quat = np.asarray(quat, dtype=np.float64)
    dots = np.einsum("f...i,f...i->f...", quat[1:], quat[:-1])
    steps = np.where(dots < 0, -1.0, 1.0)
    signs = np.concatenate([np.ones_like(steps[:1]), np.cumprod(steps, axis=0)])
    return quat * signs[..., None]


def animated_nodes(rest: np.ndarray, poses: np.ndarray, joint_nodes: np.ndarray) -> np.ndarray:
    """Nodes that get channels: every skin joint and every other node whose pose leaves its rest.

    Args:
        rest: (N, 7) rest poses; poses: (F, N, 7); joint_nodes: (J,) int node indices.
    Returns:
        sorted (A,) int64 node indices.
    """
    same_rotation = np.abs(np.einsum("fni,ni->fn", poses[..., :4], rest[:, :4])) > 1 - 1e-12
    same = same_rotation & np.isclose(poses[..., 4:], rest[:, 4:], rtol=0, atol=1e-9).all(axis=-1)
    moving = ~same.all(axis=0)
    moving[np.asarray(joint_nodes, dtype=np.int64)] = True
    return np.flatnonzero(moving)


def export_glb(
    rig_path: str | os.PathLike,
    out_path: str | os.PathLike,
    poses: np.ndarray,
    fps: float,
    scale: float = 1.0,
    camera: CameraTrack | None = None,
) -> dict:
    """Write the rig at `rig_path` with the poses as its animation to `out_path` (.glb, atomically).

    Args:
        rig_path: the user's .gltf/.glb (one skinned mesh, as `dualpm.gltf.load_skinned_mesh` accepts).
        poses: (F, N, 7) float node-local `[qw qx qy qz tx ty tz]` of ALL N nodes of the document, in
            units of `scale` times the rig's own (e.g. a rig scaled by `synth --mesh-scale`).
        fps: keys per second (> 0).
        scale: fitted units per rig unit; translations (and the camera) are divided by it.
        camera: the input views (depths in fitted units), or None for no camera.
    Returns:
        a summary {"frames", "animated_nodes", "camera_node", "embedded_images"}.
    """
    rig_path = Path(rig_path)
    mesh = load_skinned_mesh(rig_path)  # validates the skin and gives rest TRS of every node
    doc, buffers = read_gltf_document(rig_path)
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (len(doc.nodes), 7) or len(poses) == 0:
        raise GltfError(f"{rig_path}: poses of shape {poses.shape} do not fit its {len(doc.nodes)} nodes "
                        f"(expected (frames, {len(doc.nodes)}, 7))")
    if not (fps > 0 and scale > 0):
        raise GltfError(f"{rig_path}: fps and scale must be positive, got {fps} and {scale}")
    blob = bytearray()
    _pack_buffers(doc, buffers, blob)
    embedded = _embed_images(doc, rig_path, blob)

    def add(array: np.ndarray, kind: str, **extra) -> int:
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        doc.bufferViews.append(pygltflib.BufferView(buffer=0, byteOffset=len(blob), byteLength=len(data)))
        blob.extend(data)  # float32 arrays only: offsets stay 4-byte aligned
        doc.accessors.append(pygltflib.Accessor(bufferView=len(doc.bufferViews) - 1, componentType=_FLOAT,
                                                count=len(array), type=kind, **extra))
        return len(doc.accessors) - 1

    frames = len(poses)
    times = np.arange(frames, dtype=np.float64) / fps
    time_acc = add(times, "SCALAR", min=[float(times[0].astype("f4"))], max=[float(times[-1].astype("f4"))])
    rest = np.concatenate([mesh.rest_rotation, mesh.rest_translation], axis=1).astype(np.float64)
    nodes = animated_nodes(rest, poses, mesh.joint_nodes)
    quat = poses[:, nodes, :4] / np.linalg.norm(poses[:, nodes, :4], axis=-1, keepdims=True)
    quat = continuous_quaternions(np.roll(quat, -1, axis=-1))  # real-first -> glTF x, y, z, w
    translation = poses[:, nodes, 4:] / scale
    samplers, channels = [], []
    for k, node in enumerate(nodes):
        gltf_node = doc.nodes[node]
        if gltf_node.matrix is not None:  # glTF: animated nodes must use TRS
            gltf_node.matrix = None
            gltf_node.translation = mesh.rest_translation[node].tolist()
            gltf_node.rotation = np.roll(mesh.rest_rotation[node], -1).tolist()
            gltf_node.scale = mesh.rest_scale[node].tolist()
        node_scale = np.broadcast_to(mesh.rest_scale[node], (frames, 3))
        for path, values, kind in (("translation", translation[:, k], "VEC3"),
                                   ("rotation", quat[:, k], "VEC4"), ("scale", node_scale, "VEC3")):
            samplers.append(pygltflib.AnimationSampler(input=time_acc, output=add(values, kind),
                                                       interpolation="LINEAR"))
            target = pygltflib.AnimationChannelTarget(node=int(node), path=path)
            channels.append(pygltflib.AnimationChannel(sampler=len(samplers) - 1, target=target))
    camera_node = None
    if camera is not None:
        camera_node = _add_camera(doc, camera, frames, scale, add, time_acc, samplers, channels)
    doc.animations.append(pygltflib.Animation(name=ANIMATION_NAME, samplers=samplers, channels=channels))
    doc.buffers = [pygltflib.Buffer(byteLength=len(blob))]
    doc.set_binary_blob(bytes(blob))
    atomic_write_bytes(out_path, b"".join(doc.save_to_bytes()))
    return {"frames": frames, "animated_nodes": len(nodes), "camera_node": camera_node,
            "embedded_images": embedded}


def _pack_buffers(doc: pygltflib.GLTF2, buffers: list[bytes], blob: bytearray) -> None:
    """Concatenate all buffers (4-byte aligned) into `blob` and re-point every bufferView at it."""
    offsets = []
    for data, buffer in zip(buffers, doc.buffers, strict=True):
        offsets.append(len(blob))
        blob.extend(data[: buffer.byteLength])
        blob.extend(b"\0" * (-len(blob) % 4))
    for view in doc.bufferViews:
        view.byteOffset = (view.byteOffset or 0) + offsets[view.buffer]
        view.buffer = 0


def _embed_images(doc: pygltflib.GLTF2, rig_path: Path, blob: bytearray) -> int:
    """Images given as files beside the rig become bufferViews of the GLB (data: URIs stay)."""
    count = 0
    for index, image in enumerate(doc.images):
        if image.uri is None or image.uri.startswith("data:"):
            continue
        try:
            file = safe_join(rig_path.parent, urllib.parse.unquote(image.uri))
        except UnsafePathError as err:
            raise GltfError(f"{rig_path}: image {index}: {err}") from err
        if not file.is_file():
            raise GltfError(f"{rig_path}: image {index} file {image.uri!r} not found")
        data = file.read_bytes()
        mime = next((m for magic, m in _IMAGE_TYPES.items() if data.startswith(magic)), None)
        if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            mime = "image/webp"
        mime = mime or image.mimeType or mimetypes.guess_type(file.name)[0]
        if mime not in _IMAGE_MIMES:
            raise GltfError(f"{rig_path}: image {index} {image.uri!r} is not PNG, JPEG, WebP or KTX2 "
                            f"({mime}); a GLB can only embed those")
        doc.bufferViews.append(pygltflib.BufferView(buffer=0, byteOffset=len(blob), byteLength=len(data)))
        blob.extend(data)
        blob.extend(b"\0" * (-len(blob) % 4))
        image.uri, image.bufferView, image.mimeType = None, len(doc.bufferViews) - 1, mime
        count += 1
    return count


def _add_camera(doc, camera: CameraTrack, frames: int, scale: float, add, time_acc: int,
                samplers: list, channels: list) -> int:
    if len(camera.depth) != frames:
        raise GltfError(f"camera track has {len(camera.depth)} frames, the poses {frames}")
    # One glTF camera has one field of view: the median focal length f. A frame of another focal length f_k
    # is seen from distance d_k f / f_k instead, which keeps the object's size in the image (exact when
    # all frames share one focal length, as a video does).
    focal = float(np.median(camera.focal_mm))
    distance = -np.asarray(camera.depth, dtype=np.float64) / scale * focal / np.asarray(camera.focal_mm)
    yfov = 2.0 * np.arctan(SENSOR_HEIGHT_MM / (2.0 * focal))
    doc.cameras.append(pygltflib.Camera(
        type="perspective", name=CAMERA_NAME,
        perspective=pygltflib.Perspective(aspectRatio=float(camera.aspect), yfov=float(yfov),
                                          znear=float(0.01 * distance.min()),
                                          zfar=float(100 * distance.max())),
    ))
    position = np.zeros((frames, 3))
    position[:, 2] = distance  # the camera sits at (0, 0, -view[2, 3]) looking down -Z
    doc.nodes.append(pygltflib.Node(name=CAMERA_NAME, camera=len(doc.cameras) - 1,
                                    translation=position[0].tolist()))
    node = len(doc.nodes) - 1
    if not doc.scenes:
        roots = sorted(set(range(node)) - {c for n in doc.nodes for c in (n.children or [])})
        doc.scenes.append(pygltflib.Scene(nodes=roots))
        doc.scene = 0
    doc.scenes[doc.scene or 0].nodes.append(node)
    samplers.append(pygltflib.AnimationSampler(input=time_acc, output=add(position, "VEC3"),
                                               interpolation="LINEAR"))
    channels.append(pygltflib.AnimationChannel(
        sampler=len(samplers) - 1, target=pygltflib.AnimationChannelTarget(node=node, path="translation")))
    return node
