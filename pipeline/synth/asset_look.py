"""Images of a rig in its own glTF material (or a procedural coat) under `lighting.SceneLight`.

The renderer interpolates per-vertex attributes with each hit's barycentrics: canonical xyz and the
world normal (as the procedural path), then the TEXCOORD sets, COLOR_0 and the vertex's material
index (constant over a primitive, so the interpolated value is the index). Per material, the texture
coordinates go through KHR_texture_transform, the pixel footprint comes from the UV image
(`dualpm.texture.uv_footprint`: mip level, see there why not supersampling), and the base colour is
factor x texture x COLOR_0 (`dualpm.gltf_material.base_colour`). Alpha MASK: where the first surface's
alpha is below the cutoff the next peeled surface shows (up to `MASK_LAYERS`), else the background;
the mask file and the dual point maps stay geometric (layer 1 of the same pass), exactly as for
every other look. BLEND materials are drawn opaque.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dualpm.camera import pixel_rays
from dualpm.gltf_material import Surface, base_colour, transformed_uv
from dualpm.texture import uv_footprint
from pipeline.synth.lighting import SceneLight, background_image, jitter_colours, occluded

MASK_LAYERS = 4


@dataclass(frozen=True, eq=False)
class AssetLook:
    """Per-vertex appearance attributes of one rig (built once per model)."""

    surface: Surface
    attributes: Tensor  # (V, 2S + 5) float32: uv sets, colour RGBA, material index

    @classmethod
    def build(cls, surface: Surface) -> AssetLook:
        v = len(surface.material)
        attrs = np.concatenate([surface.uv.reshape(v, -1), surface.colour, surface.material[:, None]], axis=1)
        return cls(surface, torch.from_numpy(attrs.astype(np.float32)))

    @property
    def layers(self) -> int:
        return MASK_LAYERS if self.surface.alpha_masked else 1


def layer_albedo(look: AssetLook | None, coat: Callable[[Tensor], Tensor] | None, layer: np.ndarray,
                  hit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Albedo of the surface seen in one peeled layer.

    Args:
        layer: (H, W, C + 4) float32 numpy, one layer of `render_layers` (attributes as `shade_look`).
        hit: (H, W) bool pixels to colour.
    Returns:
        (H, W, 3) float32 linear albedo (0 elsewhere) and (H, W) bool: hit and not cut by alpha MASK.
    """
    h, w = hit.shape
    albedo = np.zeros((h, w, 3), dtype=np.float32)
    opaque = hit.copy()
    if look is None:
        albedo[hit] = coat(torch.from_numpy(layer[hit][:, :3])).numpy()
        return albedo, opaque
    surface = look.surface
    sets = surface.uv.shape[1]
    uv_sets = layer[..., 6 : 6 + 2 * sets].reshape(h, w, sets, 2)
    colour = layer[..., 6 + 2 * sets : 10 + 2 * sets]
    material = np.rint(layer[..., 10 + 2 * sets]).astype(np.int64)
    for m in np.unique(material[hit]):
        sel = hit & (material == m)
        mat = surface.materials[m]
        ref = mat.base_color_texture
        uv = footprint = None
        if ref is not None and surface.textures[ref.texture] is not None:
            uv_image = transformed_uv(ref, uv_sets)  # (H, W, 2)
            footprint = uv_footprint(uv_image, sel, surface.textures[ref.texture].size)[sel]
            uv = uv_image[sel]
        rgba = base_colour(surface, int(m), uv, colour[sel], footprint)
        albedo[sel] = rgba[:, :3]
        if mat.alpha_mode == "MASK":
            cut = np.zeros_like(sel)
            cut[sel] = rgba[:, 3] < mat.alpha_cutoff
            opaque &= ~cut
    return albedo, opaque


def shade_look(layers: Tensor, look: AssetLook | None, coat: Callable[[Tensor], Tensor] | None,
               light: SceneLight, view: np.ndarray, projection: Tensor, posed_cam: np.ndarray, faces: np.ndarray,
               procedural_background: Callable[[], Tensor]) -> np.ndarray:
    """The RGB image of one sample.

    Args:
        layers: (H, W, L, C + 4) float32 from `render_layers` with attributes [canonical (3), world
            normal (3), then `look.attributes`] (only the first 6 without a look).
        look: the rig's material, or None to use `coat` (canonical (n, 3) -> linear albedo (n, 3)).
        view: (4, 4) world-to-camera; projection: (4, 4) float64 of the sample.
        posed_cam: (V, 3) posed vertices in camera space (the occluders); faces (F, 3).
    Returns:
        (H, W, 3) uint8 display RGB (gamma 1/2.2, as the procedural path).
    """
    data = layers.numpy()
    h, w = data.shape[:2]
    # Work inside the bounding box of the first layer's hits (deeper layers lie within it, so no
    # pixel loses a neighbour that the footprint would use).
    rows_hit, cols_hit = np.nonzero(data[:, :, 0, -1] > 0)
    r0, c0 = (rows_hit.min(), cols_hit.min()) if rows_hit.size else (0, 0)
    r1, c1 = (rows_hit.max() + 1, cols_hit.max() + 1) if rows_hit.size else (0, 0)
    data = data[r0:r1, c0:c1]
    chosen = np.full(data.shape[:2], -1, dtype=np.int64)
    albedo = np.zeros((*data.shape[:2], 3), dtype=np.float32)
    for index in range(data.shape[2]):
        hit = (data[:, :, index, -1] > 0) & (chosen < 0)
        if not hit.any():
            continue
        colour, opaque = layer_albedo(look, coat, data[:, :, index], hit)
        take = hit & opaque
        chosen[take] = index
        albedo[take] = colour[take]
    visible = chosen >= 0
    rows, cols = np.nonzero(visible)
    hits = data[rows, cols, chosen[visible]]  # (n, C + 4)
    rot = view[:3, :3].astype(np.float64)
    normals = hits[:, 3:6].astype(np.float64) @ rot.T  # camera space
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    points = hits[:, -4:-1].astype(np.float64)
    flip = (normals * -points).sum(1) < 0  # the side the camera sees
    normals[flip] *= -1
    world_normals = normals @ rot  # R^T n
    if light.environment is not None:
        ambient = light.environment.irradiance(world_normals)
    else:
        up = 0.5 * (1 + world_normals[:, 1:2])
        ambient = light.ground * (1 - up) + light.sky * up
    lambert = np.clip(normals @ light.directions.T, 0, None)  # (n, k)
    lambert[:, 0] *= ~occluded(posed_cam, faces, points, normals, light.directions[:1])[:, 0]  # key light
    radiance = albedo[visible] * (ambient + lambert @ light.colours)
    rays_world = None
    if light.environment is not None:  # the camera sees the environment behind the animal
        _, directions, _ = pixel_rays(projection, h, w)
        rays_world = directions.numpy() @ rot  # (H, W, 3) camera -> world directions
    image = background_image(light, rays_world, h, lambda: procedural_background().numpy())
    image[r0:r1, c0:c1][visible] = radiance
    display = np.clip(image, 0, 1) ** (1 / 2.2)
    display = jitter_colours(display, light.jitter)
    return (display * 255 + 0.5).astype(np.uint8)
