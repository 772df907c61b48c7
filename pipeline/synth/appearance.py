"""Images of posed animals: fur-like albedo attached to the canonical surface, Lambert shading, backgrounds.

Albedo is a function of the canonical (rest-pose) position of the surface point, so the pattern moves
with the body like a coat: a per-animal base colour, a second colour in noise patches, spots or warped
stripes, and fine fur noise. The pattern is built from 3D value noise (a per-animal random lattice)
and is never a ramp of the coordinates themselves, which would let a network read the canonical map
off the pixels. Canonical coordinates are normalised by the rest bounding box first, so user meshes
in any unit get patterns of the same relative size.

Shading: posed per-vertex normals (area-weighted, interpolated by the renderer) against a light
direction fixed relative to the camera, plus an ambient term; both faces of a surface are lit (user
meshes may have inconsistent winding). Background: a vertical two-colour gradient with low-frequency
noise. Everything here is float32 torch on the CPU.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

PATTERNS = ("plain", "patches", "spots", "stripes")
_LATTICE = 32  # value-noise lattice side (periodic)


@dataclass(frozen=True, eq=False)
class Appearance:
    """Coat of one animal."""

    base: np.ndarray  # (3,) float32 linear RGB in [0, 1]
    second: np.ndarray  # (3,) float32 colour of patches / spots / stripes
    pattern: str  # one of PATTERNS
    frequency: float  # pattern features per normalised unit
    threshold: float  # in [0, 1]: higher covers less of the coat with the pattern
    stripe_axis: np.ndarray  # (3,) unit vector the stripes run across
    lattice: Tensor  # (_LATTICE,)*3 float32 random values in [0, 1]
    offset: np.ndarray  # (3,) float32 canonical-frame origin of the normalised coordinates
    extent: float  # normalising length (rest bounding-box diagonal / 2)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def sample_appearance(rng: np.random.Generator, rest_vertices: np.ndarray) -> Appearance:
    """A random coat for an animal whose bind-pose vertices are `rest_vertices` (V, 3)."""
    kind = rng.integers(4)  # brown/bay, grey/black/white, golden/sandy, reddish
    hue = [rng.uniform(0.04, 0.1), rng.uniform(0, 1), rng.uniform(0.09, 0.14), rng.uniform(0.0, 0.05)][kind]
    sat = [rng.uniform(0.35, 0.8), rng.uniform(0.0, 0.08), rng.uniform(0.3, 0.7), rng.uniform(0.5, 0.9)][kind]
    val = rng.uniform(0.12, 0.9)
    base = _hsv(hue, sat, val)
    # The second colour is much lighter or much darker, as in pinto coats or tabby stripes.
    light = rng.random() < 0.5
    second = _hsv(hue + rng.uniform(-0.03, 0.03), sat * rng.uniform(0.0, 0.5),
                  rng.uniform(0.8, 0.97) if light else rng.uniform(0.02, 0.15))
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    frequency = {"plain": 1.0, "patches": rng.uniform(1.5, 3.5), "spots": rng.uniform(6, 12),
                 "stripes": rng.uniform(4, 10)}[pattern]
    threshold = rng.random()
    axis = rng.normal(size=3)
    lattice = torch.from_numpy(rng.random((_LATTICE,) * 3, dtype=np.float32))
    lo, hi = rest_vertices.min(0), rest_vertices.max(0)
    return Appearance(
        base=base, second=second, pattern=pattern, frequency=float(frequency), threshold=float(threshold),
        stripe_axis=(axis / np.linalg.norm(axis)).astype(np.float32), lattice=lattice,
        offset=(0.5 * (lo + hi)).astype(np.float32), extent=float(max(0.5 * np.linalg.norm(hi - lo), 1e-9)),
    )


def value_noise(points: Tensor, lattice: Tensor) -> Tensor:
    """Smooth periodic 3D value noise in [0, 1].

    Args:
        points: (n, 3) float32 positions in lattice cells (period = lattice side).
        lattice: (R, R, R) float32 random values.
    Returns:
        (n,) float32, trilinear with smoothstep weights (C1 across cells).
    """
    size = lattice.shape[0]
    cell = torch.floor(points)
    frac = points - cell
    w = frac * frac * (3 - 2 * frac)  # smoothstep
    i0 = cell.long() % size
    i1 = (i0 + 1) % size
    flat = lattice.reshape(-1)
    out = torch.zeros(len(points), dtype=points.dtype)
    for corner in range(8):  # 8 corners of the cell, each vectorised over all points
        bits = [(corner >> k) & 1 for k in range(3)]
        idx = [i1[:, k] if b else i0[:, k] for k, b in enumerate(bits)]
        weight = torch.ones_like(out)
        for k, b in enumerate(bits):
            weight = weight * (w[:, k] if b else 1 - w[:, k])
        out = out + weight * flat[(idx[0] * size + idx[1]) * size + idx[2]]
    return out


def _fbm(points: Tensor, lattice: Tensor, octaves: int) -> Tensor:
    """Fractal sum of `octaves` noise layers (each twice the frequency, half the amplitude) in [0, 1]."""
    total, amplitude, norm = torch.zeros(len(points)), 1.0, 0.0
    for octave in range(octaves):
        # Shifting each octave decorrelates the layers that share one lattice.
        total = total + amplitude * value_noise(points * 2**octave + 7.31 * octave, lattice)
        norm += amplitude
        amplitude *= 0.5
    return total / norm


def albedo(app: Appearance, canonical: Tensor) -> Tensor:
    """Coat colour at canonical surface points.

    Args:
        canonical: (n, 3) float32 canonical (rest-pose) positions, scene units of the mesh.
    Returns:
        (n, 3) float32 linear RGB in [0, 1].
    """
    x = (canonical - torch.from_numpy(app.offset)) / app.extent  # the animal spans about [-1, 1]
    base, second = torch.from_numpy(app.base), torch.from_numpy(app.second)
    if app.pattern == "plain":
        amount = torch.zeros(len(x))
    elif app.pattern == "stripes":
        warp = _fbm(x * 2.0, app.lattice, 2)
        phase = (x @ torch.from_numpy(app.stripe_axis)) * app.frequency + 1.5 * warp
        amount = _smooth(0.5 + 0.5 * torch.sin(2 * np.pi * phase), 0.3 + 0.4 * app.threshold, 0.08)
    else:
        # fbm values gather around 0.5: patches cut near the middle, spots only at the peaks
        edge = 0.42 + 0.16 * app.threshold if app.pattern == "patches" else 0.6 + 0.08 * app.threshold
        octaves = 3 if app.pattern == "patches" else 2
        amount = _smooth(_fbm(x * app.frequency, app.lattice, octaves), edge, 0.03)
    colour = base + amount[:, None] * (second - base)
    fur = 0.8 + 0.4 * _fbm(x * 60.0 + 3.7, app.lattice, 2)  # fine strands
    return (colour * fur[:, None]).clamp(0.0, 1.0)


def _smooth(value: Tensor, edge: float, width: float) -> Tensor:
    t = ((value - edge) / width + 0.5).clamp(0.0, 1.0)
    return t * t * (3 - 2 * t)


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals.

    Args:
        vertices: (V, 3) float positions (scene units); faces: (F, 3) int64 counter-clockwise triangles.
    Returns:
        (V, 3) unit normals, dtype/device of `vertices` (zero for unreferenced vertices).
    """
    corners = vertices[faces]  # (F, 3 corners, 3)
    edge1, edge2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    face = torch.linalg.cross(edge1, edge2, dim=1)  # length = twice the area: area weighting
    normals = torch.zeros_like(vertices).index_add_(0, faces.reshape(-1), face.repeat_interleave(3, dim=0))
    return normals / normals.norm(dim=1, keepdim=True).clamp_min(1e-20)


@dataclass(frozen=True)
class Lighting:
    """Per-sample light and background."""

    direction_camera: np.ndarray  # (3,) unit vector towards the light, camera space
    ambient: float
    intensity: float
    sky: np.ndarray  # (3,) background colour at the top
    ground: np.ndarray  # (3,) background colour at the bottom
    noise: np.ndarray  # (G, G) float32 low-resolution background noise in [-1, 1]
    noise_amount: float


def sample_lighting(rng: np.random.Generator) -> Lighting:
    """Light from the camera's side of the animal (up to 80 degrees off its axis) and a background."""
    theta = np.radians(rng.uniform(0, 80))
    phi = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.sin(theta) * np.cos(phi), np.abs(np.sin(theta) * np.sin(phi)), np.cos(theta)])
    sky = rng.uniform(0.05, 0.95, 3)
    ground = np.clip(sky * rng.uniform(0.3, 1.2, 3), 0, 1)
    return Lighting(
        direction_camera=direction, ambient=float(rng.uniform(0.1, 0.35)),
        intensity=float(rng.uniform(0.8, 1.2)),
        sky=sky.astype(np.float32), ground=ground.astype(np.float32),
        noise=rng.uniform(-1, 1, (6, 6)).astype(np.float32), noise_amount=float(rng.uniform(0.0, 0.15)),
    )


def background(light: Lighting, height: int, width: int) -> Tensor:
    """(H, W, 3) float32 background image in [0, 1], row 0 at the top."""
    t = torch.linspace(0.0, 1.0, height)[:, None, None]  # (H, 1, 1)
    image = torch.from_numpy(light.sky) * (1 - t) + torch.from_numpy(light.ground) * t  # (H, 1, 3)
    noise = torch.nn.functional.interpolate(
        torch.from_numpy(light.noise)[None, None], size=(height, width), mode="bicubic", align_corners=True
    )[0, 0]  # (H, W)
    return (image + light.noise_amount * noise[:, :, None]).clamp(0.0, 1.0)


def shade(
    layer: Tensor, app: Appearance, light: Lighting, view: Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Compose the RGB image and mask from the first rendered layer.

    Args:
        layer: (H, W, 10) float32 from `render_layers` with attributes [canonical xyz, world normal]:
            canonical (3), normal (3, world, unnormalised), posed camera-space xyz (3), alpha (1).
        view: (4, 4) world-to-camera matrix of the sample.
    Returns:
        rgb (H, W, 3) uint8 and mask (H, W) uint8 in {0, 255} (= alpha of layer 1).
    """
    height, width = layer.shape[:2]
    alpha = layer[..., 9] > 0
    hit = layer[alpha]  # (n, 10)
    rot = view[:3, :3].to(torch.float32)
    normal = hit[:, 3:6] @ rot.T  # camera space
    normal = normal / normal.norm(dim=1, keepdim=True).clamp_min(1e-12)
    to_eye = -hit[:, 6:9]
    flip = (normal * to_eye).sum(1) < 0  # lit from the side the camera sees
    normal = torch.where(flip[:, None], -normal, normal)
    lambert = (normal @ torch.from_numpy(light.direction_camera).to(torch.float32)).clamp_min(0.0)
    irradiance = light.ambient + (1 - light.ambient) * light.intensity * lambert
    colour = albedo(app, hit[:, :3]) * irradiance[:, None]
    image = background(light, height, width)
    image[alpha] = colour.clamp(0.0, 1.0)
    rgb = (image.pow(1 / 2.2) * 255 + 0.5).to(torch.uint8).numpy()  # linear -> display gamma
    mask = alpha.to(torch.uint8).mul(255).numpy()
    return rgb, mask
