"""Light and background of the asset-appearance renders: several lights with shadows, HDRI, photos, jitter.

Per sample (`sample_scene_light`, all draws from the sample's LIGHT stream):
- two or three directional lights (key, fill, rim) around the camera's side of the animal, random
  colour temperature and intensity; the key light casts shadows: occlusion rays cast with Embree
  from every lit point towards it (the posed mesh is the only occluder). Fill and rim lights are
  unshadowed, as in studio practice, which keeps the shadow cost to one ray per visible pixel;
- ambient light from a sky colour above and a ground colour below (hemisphere light on the normal);
- with `--hdri DIR`: a random equirectangular image of DIR, turned about +Y, lights the animal
  diffusely (its order-2 spherical-harmonic irradiance, Ramamoorthi and Hanrahan 2001) plus a key
  light from its brightest direction (for shadows), and is what the camera sees behind the animal;
- behind the animal otherwise: a random photo of `--backgrounds DIR` (random crop, scale and
  horizontal flip), else the procedural gradient of `appearance.background`;
- colour jitter of the final image (brightness, contrast, saturation).

Images in DIR are decoded with `dualpm.images` as sRGB (PNG, JPEG, TIFF: low dynamic range).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dualpm.errors import ConfigError
from dualpm.images import open_image, rgb_array
from dualpm.render.embree import triangle_scene
from dualpm.texture import srgb_to_linear

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")
SHADOW_BIAS = 1e-3  # shadow rays start this far (scene units, ~0.04% of the animal) off the surface


def list_images(folder: Path, option: str) -> tuple[Path, ...]:
    """Image files of `folder` (sorted); `ConfigError` naming the option when there are none."""
    if not folder.is_dir():
        raise ConfigError(f"{option} {folder}: not a folder")
    files = tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
    if not files:
        raise ConfigError(f"{option} {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


@lru_cache(maxsize=16)
def _linear_image(path: Path, max_width: int) -> np.ndarray:
    """(H, W, 3) float32 linear RGB of an image file, at most `max_width` wide (cached per worker)."""
    image = open_image(path)
    if image.width > max_width:
        image = image.resize((max_width, max(1, round(image.height * max_width / image.width))), Image.BOX)
    return srgb_to_linear(rgb_array(image))


@dataclass(frozen=True, eq=False)
class Environment:
    """An equirectangular environment turned by `yaw` about +Y: u = longitude, v = polar angle."""

    image: np.ndarray  # (h, w, 3) float32 linear RGB as decoded (shared by the samples of a worker)
    yaw: float
    sh: np.ndarray  # (9, 3) SH coefficients of the image's radiance, in the image's frame (before the yaw)
    exposure: float = 1.0  # the sample's factor on the image's radiance

    def lookup(self, directions: np.ndarray) -> np.ndarray:
        """(n, 3) float32 radiance seen along world `directions` (n, 3) unit vectors (bilinear)."""
        d = _turn(directions, -self.yaw)
        h, w = self.image.shape[:2]
        u = (0.5 + np.arctan2(d[:, 0], -d[:, 2]) / (2 * np.pi)) * w - 0.5
        v = np.arccos(np.clip(d[:, 1], -1, 1)) / np.pi * h - 0.5
        u0, v0 = np.floor(u), np.floor(v)
        fu, fv = (u - u0)[:, None], (v - v0)[:, None]
        c0, c1 = u0.astype(np.int64) % w, (u0.astype(np.int64) + 1) % w
        r0, r1 = np.clip(v0.astype(np.int64), 0, h - 1), np.clip(v0.astype(np.int64) + 1, 0, h - 1)
        img = self.image
        top = img[r0, c0] * (1 - fu) + img[r0, c1] * fu
        bottom = img[r1, c0] * (1 - fu) + img[r1, c1] * fu
        return ((top * (1 - fv) + bottom * fv) * self.exposure).astype(np.float32)

    def irradiance(self, normals: np.ndarray) -> np.ndarray:
        """(n, 3) float32 irradiance / pi (diffuse radiance of a white surface) for world unit normals."""
        local = _turn(normals, -self.yaw)  # E(n) of the turned image = E(R^-1 n) of the image
        return (_sh_basis(local) * _COSINE_LOBE) @ self.sh * (self.exposure / np.pi)


def _turn(d: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * d[:, 0] + s * d[:, 2], d[:, 1], -s * d[:, 0] + c * d[:, 2]], axis=1)


def _sh_basis(d: np.ndarray) -> np.ndarray:
    """(n, 9) real spherical harmonics up to order 2 at unit directions (n, 3)."""
    x, y, z = d[:, 0], d[:, 1], d[:, 2]
    return np.stack([0.282095 * np.ones_like(x), 0.488603 * y, 0.488603 * z, 0.488603 * x, 1.092548 * x * y,
                     1.092548 * y * z, 0.315392 * (3 * z * z - 1), 1.092548 * x * z, 0.546274 * (x * x - y * y)],
                    axis=1)


# Convolution of radiance with the clamped cosine, per SH band (Ramamoorthi and Hanrahan 2001).
_COSINE_LOBE = np.array([np.pi] + [2 * np.pi / 3] * 3 + [np.pi / 4] * 5)


@lru_cache(maxsize=16)
def _environment_base(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Image, SH coefficients (9, 3), brightest direction (3,) and its luminance, in the image's frame."""
    image = _linear_image(path, 512)
    h, w = image.shape[:2]
    step = max(1, w // 64)
    low = image[::step, ::step]
    lh, lw = low.shape[:2]
    theta = (np.arange(lh) + 0.5) / lh * np.pi
    phi = ((np.arange(lw) + 0.5) / lw - 0.5) * 2 * np.pi
    t, p = np.meshgrid(theta, phi, indexing="ij")
    d = np.stack([np.sin(t) * np.sin(p), np.cos(t), -np.sin(t) * np.cos(p)], axis=-1).reshape(-1, 3)
    solid = (np.sin(t) * (np.pi / lh) * (2 * np.pi / lw)).reshape(-1, 1)
    sh = _sh_basis(d).T @ (low.reshape(-1, 3) * solid)  # (9, 3): projection onto the basis
    lum = image.mean(-1)
    r, c = np.unravel_index(int(np.argmax(lum)), lum.shape)
    theta_b, phi_b = (r + 0.5) / h * np.pi, ((c + 0.5) / w - 0.5) * 2 * np.pi
    bright = np.array([np.sin(theta_b) * np.sin(phi_b), np.cos(theta_b), -np.sin(theta_b) * np.cos(phi_b)])
    return image, sh, bright, float(lum.max())


def make_environment(path: Path, rng: np.random.Generator, exposure: float) -> Environment:
    """The image of `path` turned by a random yaw, at `exposure`."""
    image, sh, _, _ = _environment_base(path)
    return Environment(image=image, yaw=float(rng.uniform(0, 2 * np.pi)), sh=sh, exposure=exposure)


@dataclass(frozen=True, eq=False)
class SceneLight:
    directions: np.ndarray  # (k, 3) unit vectors towards each light, camera space
    colours: np.ndarray  # (k, 3) linear radiance of each light
    sky: np.ndarray  # (3,) ambient from above (world +Y)
    ground: np.ndarray  # (3,) ambient from below
    environment: Environment | None
    photo: Path | None
    crop: np.ndarray  # (4,) crop box fractions (x0, y0, size, flip)
    backdrop: object  # appearance.Lighting for the procedural background
    jitter: np.ndarray  # (3,) brightness, contrast, saturation factors


def _temperature(rng: np.random.Generator) -> np.ndarray:
    warm = rng.uniform(-1, 1)  # -1 bluish ... +1 warm
    return np.array([1 + 0.15 * warm, 1.0, 1 - 0.15 * warm])


def sample_scene_light(rng: np.random.Generator, view: np.ndarray, hdris: tuple[Path, ...],
                       photos: tuple[Path, ...], backdrop) -> SceneLight:
    """Draw the sample's lights, environment, background and jitter (see the module doc)."""
    rot = view[:3, :3]
    count = int(rng.integers(2, 4))
    dirs, colours = [], []
    for k in range(count):
        if k == 0:  # key: camera side, above
            theta, phi = np.radians(rng.uniform(15, 70)), rng.uniform(0, 2 * np.pi)
            d = np.array([np.sin(theta) * np.cos(phi), abs(np.sin(theta) * np.sin(phi)) + 0.2, np.cos(theta)])
            power = rng.uniform(1.6, 2.6)
        else:  # fill or rim: anywhere, weaker
            d = rng.normal(size=3)
            d[1] = abs(d[1])
            power = rng.uniform(0.2, 0.8)
        dirs.append(d / np.linalg.norm(d))
        colours.append(power * _temperature(rng))
    sky = rng.uniform(0.15, 0.45) * _temperature(rng) * np.array([0.9, 0.95, 1.1])
    ground = sky * rng.uniform(0.3, 0.8)
    environment = None
    if hdris:
        path = hdris[int(rng.integers(len(hdris)))]
        environment = make_environment(path, rng, float(rng.uniform(0.7, 1.4)))
        # key light from the environment's brightest direction (shadows), the rest from its SH
        _, _, bright, peak = _environment_base(path)
        dirs = [rot @ _turn(bright[None], environment.yaw)[0]]
        colours = [np.full(3, 0.8 * (environment.exposure * peak) ** 0.5)]
        sky = ground = np.zeros(3)
    photo = photos[int(rng.integers(len(photos)))] if photos else None
    crop = np.array([rng.random(), rng.random(), rng.uniform(0.5, 1.0), float(rng.random() < 0.5)])
    jitter = np.array([rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15), rng.uniform(0.75, 1.25)])
    return SceneLight(np.array(dirs), np.array(colours), sky, ground, environment, photo, crop, backdrop, jitter)


def background_image(light: SceneLight, rays_world: np.ndarray, size: int, procedural) -> np.ndarray:
    """(H, W, 3) float32 linear background: the environment, a photo crop, or `procedural()`.

    Args:
        rays_world: (H, W, 3) unit world directions of the pixel rays (needed with an environment only).
    """
    if light.environment is not None:
        # The panorama is magnified several times at any field of view we frame with: looked up at
        # the centres of 2 x 2 pixel blocks (their mean direction), then upsampled bilinearly.
        h, w = rays_world.shape[:2]
        if h % 2 or w % 2:
            return light.environment.lookup(rays_world.reshape(-1, 3)).reshape(h, w, 3)
        blocks = rays_world.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
        blocks /= np.linalg.norm(blocks, axis=-1, keepdims=True)
        low = light.environment.lookup(blocks.reshape(-1, 3)).reshape(h // 2, w // 2, 3)
        up = torch.nn.functional.interpolate(torch.from_numpy(low).permute(2, 0, 1)[None], size=(h, w),
                                             mode="bilinear", align_corners=False)
        return up[0].permute(1, 2, 0).numpy()
    if light.photo is not None:
        image = _linear_image(light.photo, 1024)
        h, w = image.shape[:2]
        side = max(1, int(light.crop[2] * min(h, w)))
        x0 = int(light.crop[0] * (w - side))
        y0 = int(light.crop[1] * (h - side))
        crop = image[y0 : y0 + side, x0 : x0 + side]
        if light.crop[3]:
            crop = crop[:, ::-1]
        channels = [np.asarray(Image.fromarray(np.ascontiguousarray(crop[..., c])).resize((size, size),
                                                                                            Image.BILINEAR))
                    for c in range(3)]
        return np.stack(channels, axis=-1).astype(np.float32)
    return np.asarray(procedural(), dtype=np.float32) ** np.float32(2.2)  # display -> linear


def occluded(verts_cam: np.ndarray, faces: np.ndarray, points: np.ndarray, normals: np.ndarray,
             directions: np.ndarray) -> np.ndarray:
    """Shadow test: is each point's ray towards each light blocked by the mesh?

    Args:
        verts_cam: (V, 3) posed vertices, camera space; faces: (F, 3) int.
        points: (n, 3) surface points (camera space); normals: (n, 3) unit normals facing the camera.
        directions: (k, 3) unit vectors towards the lights.
    Returns:
        (n, k) bool.
    """
    out = np.zeros((len(points), len(directions)), dtype=bool)
    if len(points) == 0:
        return out
    scene = triangle_scene(verts_cam, faces)  # the renderer's own scene when it just cast this mesh
    for k, d in enumerate(directions):
        facing = normals @ d > 0  # points facing away are unlit anyway: no ray needed
        if not facing.any():
            continue
        origin = points[facing] + SHADOW_BIAS * normals[facing]
        dirs = np.broadcast_to(d.astype(np.float32), origin.shape)
        prim, _, _, _ = scene.intersect(origin.astype(np.float32), dirs, 0.0, np.full(len(origin), np.inf, np.float32))
        out[np.flatnonzero(facing), k] = prim >= 0
    return out


def jitter_colours(image: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Brightness, contrast (about the mean) and saturation (about the grey) of (H, W, 3) display RGB."""
    brightness, contrast, saturation = factors
    x = image * brightness
    x = (x - x.mean()) * contrast + x.mean()
    grey = x.mean(-1, keepdims=True)
    return np.clip(grey + (x - grey) * saturation, 0.0, 1.0)
