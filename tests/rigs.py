"""Tiny textured, animated glTF rigs for the appearance and animation tests (built with pygltflib + numpy).

`quad_rig` is a square of side 2 in the z = 0 plane (facing +Z), one root joint, UV u = (x + 1) / 2,
v = (1 - y) / 2 (image top-left at the square's top-left corner), split into `primitives` horizontal
bands, each its own primitive and material. `checker` is an 8 x 8 grid of distinct colours.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pygltflib
from PIL import Image

SQUARES = 8


def checker(texels_per_square: int = 4) -> np.ndarray:
    """(8 t, 8 t, 3) uint8: square (row i, column j) has colour (32 i + 16, 32 j + 16, 200 - 20 (i + j) % 8)."""
    i, j = np.meshgrid(np.arange(SQUARES), np.arange(SQUARES), indexing="ij")
    colours = np.stack([32 * i + 16, 32 * j + 16, 200 - 20 * ((i + j) % 8)], axis=-1).astype(np.uint8)
    return np.repeat(np.repeat(colours, texels_per_square, axis=0), texels_per_square, axis=1)


def png_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def quad_rig(path: Path, image: np.ndarray | None = None, embed: str = "glb", primitives: int = 1,
             uri: str = "checker.png", sampler: dict | None = None, transform: dict | None = None,
             factors: list[list[float]] | None = None, animations: list[dict] | None = None,
             alpha_cutoff: float | None = None) -> Path:
    """Write the quad rig to `path` (.glb for embed='glb', else .gltf with data: URIs).

    embed: "glb" (image in a bufferView), "data" (image as a data: URI), "file" (image written beside
    the file as `uri`, unless `uri` points elsewhere). animations: dicts with keys node, path,
    interpolation, times, values (flat per keyframe; glTF order, e.g. xyzw rotations).
    """
    blob = bytearray()
    gltf = pygltflib.GLTF2()

    def add(array: np.ndarray, kind: str, component: int = 5126) -> int:
        data = np.ascontiguousarray(array).tobytes()
        gltf.bufferViews.append(pygltflib.BufferView(buffer=0, byteOffset=len(blob), byteLength=len(data)))
        blob.extend(data + b"\0" * (-len(data) % 4))
        extra = {}
        if kind == "VEC3" and array.ndim == 2:
            extra = {"min": array.min(0).tolist(), "max": array.max(0).tolist()}
        gltf.accessors.append(pygltflib.Accessor(bufferView=len(gltf.bufferViews) - 1, componentType=component,
                                                 count=len(array), type=kind, **extra))
        return len(gltf.accessors) - 1

    prims = []
    edges = np.linspace(1.0, -1.0, primitives + 1)  # bands from the top down
    for p in range(primitives):
        y0, y1 = edges[p], edges[p + 1]
        pos = np.array([[-1, y0, 0], [1, y0, 0], [1, y1, 0], [-1, y1, 0]], dtype=np.float32)
        uv = np.stack([(pos[:, 0] + 1) / 2, (1 - pos[:, 1]) / 2], axis=1).astype(np.float32)
        faces = np.array([0, 2, 1, 0, 3, 2], dtype=np.uint32)  # counter-clockwise seen from +Z
        attrs = pygltflib.Attributes(
            POSITION=add(pos, "VEC3"), TEXCOORD_0=add(uv, "VEC2"),
            JOINTS_0=add(np.zeros((4, 4), np.uint16), "VEC4", 5123),
            WEIGHTS_0=add(np.tile(np.array([1, 0, 0, 0], np.float32), (4, 1)), "VEC4"),
        )
        prims.append(pygltflib.Primitive(attributes=attrs, indices=add(faces, "SCALAR", 5125), mode=4, material=p))
    ibm = add(np.eye(4, dtype=np.float32).reshape(1, 16), "MAT4")
    for p in range(primitives):
        info = None
        if image is not None and (factors is None or p == 0):
            info = pygltflib.TextureInfo(index=0)
            if transform is not None:
                info.extensions = {"KHR_texture_transform": transform}
        factor = factors[p] if factors else [1.0, 1.0, 1.0, 1.0]
        gltf.materials.append(pygltflib.Material(
            name=f"band{p}", pbrMetallicRoughness=pygltflib.PbrMetallicRoughness(
                baseColorFactor=factor, baseColorTexture=info),
            alphaMode="MASK" if alpha_cutoff is not None else None, alphaCutoff=alpha_cutoff))
    if image is not None:
        data = png_bytes(image)
        if embed == "glb":
            gltf.bufferViews.append(pygltflib.BufferView(buffer=0, byteOffset=len(blob), byteLength=len(data)))
            blob.extend(data + b"\0" * (-len(data) % 4))
            gltf.images.append(pygltflib.Image(bufferView=len(gltf.bufferViews) - 1, mimeType="image/png"))
        elif embed == "data":
            gltf.images.append(pygltflib.Image(uri="data:image/png;base64," + base64.b64encode(data).decode()))
        else:
            if "/" not in uri:
                (path.parent / uri).write_bytes(data)
            gltf.images.append(pygltflib.Image(uri=uri))
        gltf.samplers.append(pygltflib.Sampler(**(sampler or {})))
        gltf.textures.append(pygltflib.Texture(source=0, sampler=0))
    for anim in animations or []:
        times = add(np.asarray(anim["times"], np.float32), "SCALAR")
        values = np.asarray(anim["values"], np.float32)
        out = add(values, {3: "VEC3", 4: "VEC4"}[values.shape[1]])
        gltf.animations.append(pygltflib.Animation(
            name=anim.get("name"), samplers=[pygltflib.AnimationSampler(
                input=times, output=out, interpolation=anim.get("interpolation", "LINEAR"))],
            channels=[pygltflib.AnimationChannel(sampler=0, target=pygltflib.AnimationChannelTarget(
                node=anim.get("node", 0), path=anim["path"]))]))
    gltf.meshes.append(pygltflib.Mesh(name="quad", primitives=prims))
    gltf.skins.append(pygltflib.Skin(inverseBindMatrices=ibm, joints=[0]))
    gltf.nodes = [pygltflib.Node(name="root", children=[1]), pygltflib.Node(name="quad", mesh=0, skin=0)]
    gltf.scenes = [pygltflib.Scene(nodes=[0])]
    gltf.scene = 0
    if embed == "glb" or path.suffix == ".glb":
        gltf.buffers.append(pygltflib.Buffer(byteLength=len(blob)))
        gltf.set_binary_blob(bytes(blob))
        path.write_bytes(b"".join(gltf.save_to_bytes()))
    else:
        gltf.buffers.append(pygltflib.Buffer(
            uri="data:application/octet-stream;base64," + base64.b64encode(bytes(blob)).decode(),
            byteLength=len(blob)))
        path.write_text(gltf.gltf_to_json())
    return path


def textured_tube(path: Path, image: np.ndarray | None = None, clip: bool = True) -> Path:
    """`datagen.tube_mesh` saved as .gltf + .bin with TEXCOORD_0 (u along the tube, v around it), a
    material whose base colour texture is `image` (default `checker()`, a file `tube.png` beside it)
    and, with `clip`, an animation "Bend" turning bone1 by up to 40 degrees about z (LINEAR)."""
    from tests.datagen import tube_mesh

    mesh = tube_mesh("tube")
    v = mesh.vertices
    uv = np.stack([(v[:, 0] - v[:, 0].min()) / np.ptp(v[:, 0]),
                   (np.arctan2(v[:, 2], v[:, 1]) / (2 * np.pi)) % 1.0], axis=1)
    return texture_rig(path, mesh, uv, checker() if image is None else image, 2 if clip else None)


def texture_rig(path: Path, mesh, uv: np.ndarray, image: np.ndarray, clip_node: int | None) -> Path:
    """Save `mesh` as .gltf + .bin with TEXCOORD_0 = `uv` (V, 2), a material textured by `image`
    (`<stem>.png` beside it) and, for `clip_node`, a LINEAR clip "Bend" turning that node 0 -> 40 degrees
    about z over one second."""
    from dualpm.gltf import save_skinned_mesh

    save_skinned_mesh(mesh, path)
    gltf = pygltflib.GLTF2().load(str(path))
    bin_path = path.with_name(gltf.buffers[0].uri)
    blob = bytearray(bin_path.read_bytes())

    def add(array: np.ndarray, kind: str) -> int:
        data = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        gltf.bufferViews.append(pygltflib.BufferView(buffer=0, byteOffset=len(blob), byteLength=len(data)))
        blob.extend(data)
        gltf.accessors.append(pygltflib.Accessor(bufferView=len(gltf.bufferViews) - 1, componentType=5126,
                                                 count=len(array), type=kind))
        return len(gltf.accessors) - 1

    gltf.meshes[0].primitives[0].attributes.TEXCOORD_0 = add(uv, "VEC2")
    gltf.meshes[0].primitives[0].material = 0
    (path.parent / f"{path.stem}.png").write_bytes(png_bytes(image))
    gltf.images = [pygltflib.Image(uri=f"{path.stem}.png")]
    gltf.samplers = [pygltflib.Sampler()]
    gltf.textures = [pygltflib.Texture(source=0, sampler=0)]
    gltf.materials = [pygltflib.Material(name="coat", pbrMetallicRoughness=pygltflib.PbrMetallicRoughness(
        baseColorTexture=pygltflib.TextureInfo(index=0)))]
    if clip_node is not None:
        s = np.sin(np.radians(20.0))
        times = add(np.array([0.0, 1.0]), "SCALAR")
        values = add(np.array([[0, 0, 0, 1], [0, 0, s, np.sqrt(1 - s * s)]]), "VEC4")
        gltf.animations = [pygltflib.Animation(
            name="Bend", samplers=[pygltflib.AnimationSampler(input=times, output=values)],
            channels=[pygltflib.AnimationChannel(sampler=0, target=pygltflib.AnimationChannelTarget(
                node=clip_node, path="rotation"))])]
    gltf.buffers[0].byteLength = len(blob)
    bin_path.write_bytes(bytes(blob))
    path.write_text(gltf.gltf_to_json())
    return path
