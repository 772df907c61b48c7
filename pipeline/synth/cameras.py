"""Random cameras that keep the whole posed animal in frame, in the reference camera conventions.

A camera orbits the posed animal's bounding-box centre: azimuth, elevation, focal length (mm, 36 mm
sensor height) and a fill factor are drawn; the distance is chosen so the animal's bounding sphere
fills that fraction of the field of view, then increased step by step (deterministically) until
every posed vertex projects inside the image with a margin and lies between the near and far planes.
The world origin must lie in that depth range too: the reference subtracts the camera's z
translation from posed depth, so depth is only object-centred for an animal near the origin.

The camera is returned as the text of its reference camera file (camera-to-world, Blender Z-up) and
the view matrix *read back from that text*, so the generator renders exactly what a reader of the
dataset will reconstruct.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dualpm.camera import (
    FAR,
    NEAR,
    camera_pose_from_view,
    format_camera_txt,
    look_at,
    project_points,
    projection_from_focal,
    view_from_camera_pose,
)
from dualpm.errors import DualPMError


class FramingError(DualPMError):
    """No camera within the attempts keeps the animal in frame (message names the mesh/sample)."""


@dataclass(frozen=True)
class CameraRanges:
    """Ranges of the random camera parameters."""

    elevation_deg: tuple[float, float] = (-5.0, 40.0)
    focal_mm: tuple[float, float] = (35.0, 80.0)
    fill: tuple[float, float] = (0.6, 1.05)  # bounding-sphere radius / half field of view (angles)
    margin: float = 0.03  # of the image size, kept free on every side
    step: float = 1.08  # distance factor per attempt
    attempts: int = 40


@dataclass(frozen=True)
class SampledCamera:
    """A camera as written to (and read back from) the dataset."""

    text: str  # content of cameras/<id>_camera.txt
    camera_pose: np.ndarray  # (4, 4) float64 camera-to-world, Z-up, as parsed from `text`
    view: np.ndarray  # (4, 4) float64 world-to-camera (Y-up) from `camera_pose`
    focal_mm: float  # as written to the metadata file


def parse_camera_text(text: str) -> np.ndarray:
    """(4, 4) float64 matrix of a camera file's text (the format `format_camera_txt` writes)."""
    return np.array([line.split() for line in text.splitlines() if line.strip()], dtype=np.float64)


def in_frame(posed: torch.Tensor, view: np.ndarray, focal_mm: float, size: int, margin: float) -> bool:
    """Whether a camera sees every vertex inside the image margin, between near and far, and the origin.

    Args:
        posed: (V, 3) float64 posed vertices, world (scene units).
        view: (4, 4) float64 world-to-camera.
        focal_mm: focal length (mm, 36 mm sensor height); size: image side in pixels.
        margin: fraction of the image kept free on each side.
    """
    rot, trans = torch.from_numpy(view[:3, :3]), torch.from_numpy(view[:3, 3])
    cam = posed @ rot.T + trans  # (V, 3) camera looks down -Z
    depth = -cam[:, 2]
    if not torch.isfinite(cam).all() or depth.min() <= NEAR or depth.max() >= FAR:
        return False
    if not NEAR < -view[2, 3] < FAR:  # the origin's depth, the reference of "subtract depth"
        return False
    proj = projection_from_focal(torch.tensor(focal_mm, dtype=torch.float64))
    pixels, _ = project_points(cam, proj, size, size)
    lo, hi = margin * size, (1.0 - margin) * size
    return bool(((pixels >= lo) & (pixels <= hi)).all())


def frame_camera(
    posed: torch.Tensor, rng: np.random.Generator, size: int, ranges: CameraRanges, where: str
) -> SampledCamera:
    """Draw a camera that frames `posed`.

    Args:
        posed: (V, 3) float posed vertices in the Y-up world (scene units), any device.
        rng: the sample's generator (always consumes the same draws).
        size: image side in pixels.
        where: names the mesh/sample in the error message.
    Raises:
        FramingError: no camera within `ranges.attempts` distance steps frames it.
    """
    azimuth = rng.uniform(0.0, 2 * np.pi)
    elevation = np.radians(rng.uniform(*ranges.elevation_deg))
    focal = round(float(rng.uniform(*ranges.focal_mm)), 3)  # short, exact in the metadata YAML
    fill = rng.uniform(*ranges.fill)

    points = posed.detach().to("cpu", torch.float64)
    if not torch.isfinite(points).all():
        raise FramingError(f"{where}: posed vertices are not finite; the mesh cannot be framed")
    lo, hi = points.min(0).values, points.max(0).values
    centre = 0.5 * (lo + hi)
    radius = float((points - centre).norm(dim=1).max())
    half_fov = np.arctan(0.5 * 36.0 / focal)
    direction = torch.tensor(
        [np.sin(azimuth) * np.cos(elevation), np.sin(elevation), np.cos(azimuth) * np.cos(elevation)],
        dtype=torch.float64,
    )
    distance = max(radius / np.sin(min(fill * half_fov, 0.5 * np.pi)), 1e-6)
    for _ in range(ranges.attempts):
        view = look_at(centre + distance * direction, centre).numpy()
        camera = camera_through_file(view, focal)
        if in_frame(points, camera.view, focal, size, ranges.margin):
            return camera
        distance *= ranges.step
    raise FramingError(
        f"{where}: cannot frame the posed mesh (bounding-box centre {centre.numpy().round(3).tolist()}, "
        f"radius {radius:.3g}) with the reference cameras (near {NEAR}, far {FAR}, world origin in view "
        f"depth): it must be roughly metre-sized (dualpm-prep synth --mesh-scale auto sizes a rig) and near "
        "the world origin"
    )


def camera_through_file(view: np.ndarray, focal: float) -> SampledCamera:
    """The camera of a (4, 4) view as written to and read back from its file (float64 text round trip)."""
    text = format_camera_txt(camera_pose_from_view(torch.from_numpy(view)).numpy())
    pose = parse_camera_text(text)
    return SampledCamera(
        text=text, camera_pose=pose, view=view_from_camera_pose(torch.from_numpy(pose)).numpy(),
        focal_mm=focal,
    )
