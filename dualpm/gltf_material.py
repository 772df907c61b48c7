"""How a glTF rig looks: metallic-roughness base colour, per-vertex UVs and colours, textures decoded.

    surface = load_surface("fox.glb")         # vertices in the order of `dualpm.gltf.load_skinned_mesh`
    albedo = base_colour(surface, material, uv_sets, vertex_colour, footprint)

Read per primitive of the skinned mesh (`dualpm.gltf.mesh_primitives`, concatenated in file order):
TEXCOORD_n (float, or normalised unsigned bytes / shorts), COLOR_0 (RGB or RGBA), the primitive's
material. Per material: baseColorFactor, baseColorTexture (its `texCoord` set; the
KHR_texture_transform extension's offset, rotation, scale and texCoord override), alphaMode and
alphaCutoff, doubleSided. Textures: the sampler's wrap and filter modes; the image from a bufferView
(GLB), a data: URI, or a file beside the glTF (the same folder rules as buffers: `dualpm.gltf_io`),
decoded with Pillow (`dualpm.images.open_image`), sRGB decoded to linear. A primitive without a
material gets glTF's default (white, opaque). Only the base colour is read: metallic, roughness,
normal, occlusion and emissive maps are not used by the renders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dualpm.errors import DualPMError, GltfError
from dualpm.gltf import mesh_primitives
from dualpm.gltf_io import (
    FLOAT,
    UBYTE,
    USHORT,
    buffer_bytes,
    buffer_view_bytes,
    read_accessor,
    read_document,
    uri_bytes,
)
from dualpm.images import image_array, open_image
from dualpm.texture import MIN_FILTERS, NEAREST, WRAP_MODES, LINEAR, Texture, sample, srgb_to_linear

ALPHA_MODES = ("OPAQUE", "MASK", "BLEND")
MAX_UV_SETS = 4
TRANSFORM_EXTENSION = "KHR_texture_transform"


@dataclass(frozen=True)
class TextureRef:
    """A material's use of a texture: which one, which UV set, and the UV transform (3x3, uv' = M uv)."""

    texture: int
    texcoord: int
    transform: np.ndarray  # (3, 3) float64 homogeneous 2D transform; identity without the extension


@dataclass(frozen=True)
class Material:
    name: str
    base_color_factor: np.ndarray  # (4,) float32 linear RGBA
    base_color_texture: TextureRef | None
    alpha_mode: str = "OPAQUE"
    alpha_cutoff: float = 0.5
    double_sided: bool = False


DEFAULT_MATERIAL = Material("default", np.ones(4, dtype=np.float32), None)


@dataclass(frozen=True, eq=False)
class Surface:
    """Per-vertex appearance of a skinned mesh and its materials (V = the mesh's vertex count)."""

    uv: np.ndarray  # (V, S, 2) float32 texture coordinates per UV set (zeros where a primitive has none)
    colour: np.ndarray  # (V, 4) float32 linear COLOR_0 (ones where a primitive has none)
    material: np.ndarray  # (V,) int64 index into `materials` of the vertex's primitive
    materials: tuple[Material, ...]  # the file's materials, then DEFAULT_MATERIAL
    textures: tuple[Texture | None, ...]  # the file's textures (None: no image source)

    @property
    def has_material(self) -> bool:
        """The rig brings its own look: a material other than glTF's default, or vertex colours."""
        used = {int(m) for m in np.unique(self.material)}
        return any(self.materials[m] is not DEFAULT_MATERIAL for m in used) or bool((self.colour != 1).any())

    @property
    def alpha_masked(self) -> bool:
        return any(m.alpha_mode == "MASK" for m in self.materials)


def load_surface(path: str | os.PathLike) -> Surface:
    """The appearance of the skinned mesh in `path` (vertex order as `load_skinned_mesh`).

    Raises `GltfError` (or `DatasetError` for an undecodable image) naming the file and the object.
    """
    path = Path(path)
    doc, blob = read_document(path)
    buffers = [buffer_bytes(doc, i, blob, path) for i in range(len(doc.buffers))]
    prims = mesh_primitives(doc, path)
    materials = tuple(_material(doc, i, path) for i in range(len(doc.materials or []))) + (DEFAULT_MATERIAL,)
    sets = 1 + max([r.texcoord for m in materials if (r := m.base_color_texture)] + [0])
    if sets > MAX_UV_SETS:
        raise GltfError(f"{path}: a material uses TEXCOORD_{sets - 1}; at most {MAX_UV_SETS} sets are read")
    uvs, colours, owners = [], [], []
    for p, prim in enumerate(prims):
        where = f"primitive {p}"
        count = _count(doc, prim.attributes.POSITION, path, where)
        uv = np.zeros((count, sets, 2), dtype=np.float32)
        for s in range(sets):
            index = getattr(prim.attributes, f"TEXCOORD_{s}", None)
            if index is not None:
                kinds = {"VEC2": {FLOAT, UBYTE, USHORT}}
                uv[:, s] = _per_vertex(doc, buffers, index, f"{where} TEXCOORD_{s}", kinds, count, path)
        colour = np.ones((count, 4), dtype=np.float32)
        if prim.attributes.COLOR_0 is not None:
            kinds = {FLOAT, UBYTE, USHORT}
            values = _per_vertex(doc, buffers, prim.attributes.COLOR_0, f"{where} COLOR_0",
                                 {"VEC3": kinds, "VEC4": kinds}, count, path)
            colour[:, : values.shape[1]] = values
        material = len(materials) - 1 if prim.material is None else prim.material
        if not 0 <= material < len(materials) - 1 and prim.material is not None:
            raise GltfError(f"{path}: {where} refers to missing material {prim.material}")
        uvs.append(uv)
        colours.append(colour)
        owners.append(np.full(count, material, dtype=np.int64))
    textures = tuple(_texture(doc, buffers, i, path) for i in range(len(doc.textures or [])))
    for m in materials:
        ref = m.base_color_texture
        if ref is not None and not 0 <= ref.texture < len(textures):
            raise GltfError(f"{path}: material {m.name!r} refers to missing texture {ref.texture}")
    return Surface(uv=np.concatenate(uvs), colour=np.concatenate(colours), material=np.concatenate(owners),
                   materials=materials, textures=textures)


def _count(doc, index, path: Path, where: str) -> int:
    if index is None or not 0 <= index < len(doc.accessors):
        raise GltfError(f"{path}: {where} POSITION accessor {index} does not exist")
    return doc.accessors[index].count or 0


def _per_vertex(doc, buffers, index, what: str, allowed, count: int, path: Path) -> np.ndarray:
    values = read_accessor(doc, buffers, index, what, allowed, path)
    if values.dtype.kind != "f":
        raise GltfError(f"{path}: {what} has integer components but is not normalized")
    if len(values) != count:
        raise GltfError(f"{path}: {what} has {len(values)} entries for {count} vertices")
    if not np.isfinite(values).all():
        raise GltfError(f"{path}: {what} has NaN or infinite values")
    return values.astype(np.float32)


def _material(doc, index: int, path: Path) -> Material:
    mat = doc.materials[index]
    name = mat.name or f"material_{index}"
    where = f"material {index} ({name!r})"
    pbr = mat.pbrMetallicRoughness
    factor = np.ones(4, dtype=np.float32)
    ref = None
    if pbr is not None:
        if pbr.baseColorFactor is not None:
            factor = np.asarray(pbr.baseColorFactor, dtype=np.float32)
            if factor.shape != (4,) or not np.isfinite(factor).all():
                raise GltfError(f"{path}: {where} baseColorFactor must be 4 finite numbers")
        if pbr.baseColorTexture is not None:
            ref = _texture_ref(pbr.baseColorTexture, where, path)
    mode = mat.alphaMode or "OPAQUE"
    if mode not in ALPHA_MODES:
        raise GltfError(f"{path}: {where} alphaMode {mode!r} is not one of {', '.join(ALPHA_MODES)}")
    cutoff = 0.5 if mat.alphaCutoff is None else float(mat.alphaCutoff)
    return Material(name, factor, ref, mode, cutoff, bool(mat.doubleSided))


def _texture_ref(info, where: str, path: Path) -> TextureRef:
    if info.index is None:
        raise GltfError(f"{path}: {where} baseColorTexture has no index")
    texcoord = info.texCoord or 0
    transform = np.eye(3)
    ext = (info.extensions or {}).get(TRANSFORM_EXTENSION)
    if ext is not None:
        try:
            ox, oy = (float(v) for v in ext.get("offset", (0.0, 0.0)))
            sx, sy = (float(v) for v in ext.get("scale", (1.0, 1.0)))
            rot = float(ext.get("rotation", 0.0))
            texcoord = int(ext.get("texCoord", texcoord))
        except (TypeError, ValueError, AttributeError) as err:
            raise GltfError(f"{path}: {where} has a malformed {TRANSFORM_EXTENSION} ({err})") from err
        c, s = np.cos(rot), np.sin(rot)
        # KHR_texture_transform: uv' = T(offset) @ R(rotation) @ S(scale) @ [u, v, 1], with
        # u' = u cos r + v sin r, v' = v cos r - u sin r (its sample model's direction, as CesiumGltf)
        rotation = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])
        transform = np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]]) @ rotation @ np.diag([sx, sy, 1.0])
    if texcoord < 0:
        raise GltfError(f"{path}: {where} uses texCoord {texcoord}")
    return TextureRef(int(info.index), int(texcoord), transform)


def _texture(doc, buffers, index: int, path: Path) -> Texture | None:
    tex = doc.textures[index]
    if tex.source is None:
        return None
    if not 0 <= tex.source < len(doc.images or []):
        raise GltfError(f"{path}: texture {index} refers to missing image {tex.source}")
    image = doc.images[tex.source]
    what = f"image {tex.source}"
    if image.bufferView is not None:
        data = buffer_view_bytes(doc, buffers, image.bufferView, path, what)
    elif image.uri is not None:
        data = uri_bytes(image.uri, path, what)
    else:
        raise GltfError(f"{path}: {what} has neither a uri nor a bufferView")
    pixels = image_array(open_image(data, where=f"{path}: {what}"))
    rgba = _to_rgba(pixels)
    rgba[..., :3] = srgb_to_linear(rgba[..., :3])  # base colour textures are sRGB-encoded (glTF)
    wrap_s = wrap_t = 10497
    mag = min_ = None
    if tex.sampler is not None:
        if not 0 <= tex.sampler < len(doc.samplers or []):
            raise GltfError(f"{path}: texture {index} refers to missing sampler {tex.sampler}")
        smp = doc.samplers[tex.sampler]
        wrap_s, wrap_t = smp.wrapS or 10497, smp.wrapT or 10497
        mag, min_ = smp.magFilter, smp.minFilter
        if wrap_s not in WRAP_MODES or wrap_t not in WRAP_MODES or mag not in (None, NEAREST, LINEAR) \
                or min_ not in (None, *MIN_FILTERS):
            raise GltfError(f"{path}: sampler {tex.sampler} has an unknown wrap or filter mode")
    return Texture.from_rgba(rgba, (wrap_s, wrap_t), mag, min_)


def _to_rgba(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 4) float32 in [0, 1] from `image_array` output (grey, grey + alpha, RGB, RGBA; 8/16 bit)."""
    scale = 65535.0 if pixels.dtype in (np.uint16, np.int32) else 1.0 if pixels.dtype == bool else 255.0
    x = pixels.astype(np.float32) / np.float32(scale)
    if x.ndim == 2:
        x = x[..., None]
    if x.shape[-1] in (1, 2):  # grey (+ alpha)
        x = np.concatenate([np.repeat(x[..., :1], 3, axis=-1), x[..., 1:]], axis=-1)
    if x.shape[-1] == 3:
        x = np.concatenate([x, np.ones_like(x[..., :1])], axis=-1)
    return np.ascontiguousarray(np.clip(x, 0.0, 1.0))


def transformed_uv(ref: TextureRef, uv_sets: np.ndarray) -> np.ndarray:
    """Texture coordinates of a material's base colour texture.

    Args:
        uv_sets: (..., S, 2) float interpolated TEXCOORD sets.
    Returns:
        (..., 2) float64 after KHR_texture_transform (if any).
    """
    if ref.texcoord >= uv_sets.shape[-2]:
        raise DualPMError(f"texture uses TEXCOORD_{ref.texcoord} but only {uv_sets.shape[-2]} sets were read")
    uv = uv_sets[..., ref.texcoord, :].astype(np.float64)
    m = ref.transform
    return uv @ m[:2, :2].T + m[:2, 2]


def base_colour(surface: Surface, material: int, uv: np.ndarray | None, colour: np.ndarray,
                footprint: np.ndarray | None) -> np.ndarray:
    """Linear RGBA base colour of surface points of one material.

    Args:
        material: index into `surface.materials`.
        uv: (n, 2) float64 texture coordinates from `transformed_uv` (None without a texture).
        colour: (n, 4) float32 interpolated COLOR_0.
        footprint: (n,) pixel footprint in level-0 texels (`dualpm.texture.uv_footprint`).
    Returns:
        (n, 4) float32 = baseColorFactor * texture * COLOR_0 (glTF 2.0 metallic-roughness).
    """
    mat = surface.materials[material]
    out = colour.astype(np.float32) * mat.base_color_factor
    ref = mat.base_color_texture
    if ref is not None and uv is not None and surface.textures[ref.texture] is not None:
        out = out * sample(surface.textures[ref.texture], uv, footprint)
    return out
