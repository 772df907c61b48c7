"""Sequences for `dualpm-prep synth --sequence LEN`: ordered frames of smooth motion and a smoothly moving camera.

A sequence is LEN consecutive sample ids of one model. Its poses come from one *pose source*, a function

    source(mesh, sampler, rng, length) -> (length, num_nodes, 7) float64 node-local poses

`clip_pose_source` plays one of the rig's own glTF animation clips (`dualpm.animation`, the reader
`dualpm-animate` and `--poses clips` use too): a random clip from a random time, `CLIP_FPS` frames a
second, wrapping around the clip's end (walk and run cycles loop); `sequence_source` picks it for a rig
with clips as `--poses` says. `key_pose_source` (the default otherwise) draws a key pose every `KEY_FRAMES` frames with the model's `PoseSampler`
(no yaw: the whole-body yaw drifts smoothly instead, a random walk over the keys) and interpolates every
node's rotation with `scipy.spatial.transform.RotationSpline` (C2 on the rotation manifold, through the
keys); translations stay at rest. The camera frames the union of all frames' posed meshes (`frame_camera`), then
orbits the vertical axis through that union's centre at a constant rate (`ORBIT_DEG_PER_FRAME`, random
sign); a sequence whose orbit leaves a frame out of view keeps the first frame's camera throughout.
Lighting is one draw per sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial.transform import Rotation, RotationSpline

from dualpm.animation import AnimationClip, sample_clip
from dualpm.camera import look_at
from dualpm.gltf import SkinnedMesh
from dualpm.skinning import skin
from pipeline.synth.cameras import CameraRanges, SampledCamera, camera_through_file, frame_camera, in_frame
from pipeline.synth.poses import PoseSampler

KEY_FRAMES = 8  # frames between key poses
CLIP_FPS = 24.0  # frames per second of a sequence played from a clip
YAW_STEP_DEG = 20.0  # standard deviation of the whole-body yaw change between keys
ORBIT_DEG_PER_FRAME = 1.0

PoseSource = Callable[[SkinnedMesh, PoseSampler, np.random.Generator, int], np.ndarray]


def key_pose_source(mesh: SkinnedMesh, sampler: PoseSampler, rng: np.random.Generator, length: int) -> np.ndarray:
    """(length, N, 7) float64 poses: key poses every `KEY_FRAMES` frames, rotations splined between them.

    Always consumes the same draws for a given length, so sequences are reproducible.
    """
    keys = max(2, -(-(length - 1) // KEY_FRAMES) + 1)
    still = dataclasses.replace(sampler, yaw=False)
    key_poses = np.stack([still.sample(rng) for _ in range(keys)])  # (K, N, 7)
    yaw = rng.uniform(-np.pi, np.pi) + np.cumsum(rng.normal(0.0, np.radians(YAW_STEP_DEG), keys))
    rotations = Rotation.from_quat(np.roll(key_poses[..., :4], -1, axis=-1).reshape(-1, 4))
    rotations = rotations.as_matrix().reshape(keys, mesh.num_nodes, 3, 3)
    if sampler.yaw and len(sampler.yaw_roots):
        turn = Rotation.from_rotvec(np.outer(yaw, [0.0, 1.0, 0.0])).as_matrix()  # (K, 3, 3)
        rotations[:, sampler.yaw_roots] = turn[:, None] @ rotations[:, sampler.yaw_roots]
    times = np.arange(keys) * KEY_FRAMES
    frames = np.arange(length, dtype=np.float64)
    poses = np.repeat(key_poses[:1], length, axis=0)
    for node in range(mesh.num_nodes):
        spline = RotationSpline(times, Rotation.from_matrix(rotations[:, node]))
        quat = np.roll(spline(frames).as_quat(), 1, axis=1)
        poses[:, node, :4] = np.where(quat[:, :1] < 0, -quat, quat)
    return poses


def clip_pose_source(clips: Sequence[AnimationClip]) -> PoseSource:
    """A pose source playing one of `clips` (sampled as glTF defines it, `dualpm.animation.sample_clip`)."""

    def source(mesh: SkinnedMesh, sampler: PoseSampler, rng: np.random.Generator, length: int) -> np.ndarray:
        clip = clips[int(rng.integers(len(clips)))]
        duration = clip.end - clip.start
        offset = rng.uniform(0.0, duration) if duration > 0 else 0.0
        elapsed = offset + np.arange(length) / CLIP_FPS
        times = clip.start + (np.mod(elapsed, duration) if duration > 0 else 0.0 * elapsed)  # (length,) s
        return sample_clip(clip, mesh, times)

    return source


def sequence_source(poses: str, clips: Sequence[AnimationClip], rng: np.random.Generator) -> PoseSource:
    """The pose source of one sequence: `--poses` random -> key poses; clips -> the rig's clips; mixed or
    auto -> clips for half the sequences. A rig without clips always takes key poses."""
    if poses == "random" or not clips:
        return key_pose_source
    if poses in ("mixed", "auto") and rng.random() >= 0.5:
        return key_pose_source
    return clip_pose_source(clips)


def sequence_cameras(posed: torch.Tensor, rng: np.random.Generator, size: int, ranges: CameraRanges,
                     where: str) -> list[SampledCamera]:
    """One camera per frame, orbiting the frames' common centre (see the module doc).

    Args:
        posed: (F, V, 3) float posed vertices of every frame, Y-up world (scene units).
        rng: the sequence's camera generator.
    Raises:
        FramingError (from `frame_camera`) when not even a fixed camera frames the whole sequence.
    """
    points = posed.detach().to("cpu", torch.float64)
    base = frame_camera(points.reshape(-1, 3), rng, size, ranges, where)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    flat = points.reshape(-1, 3)
    centre = 0.5 * (flat.min(0).values + flat.max(0).values)
    eye = torch.linalg.solve(torch.from_numpy(base.view), torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    offset = eye[:3] - centre
    cameras = []
    for frame in range(len(points)):
        angle = np.radians(sign * ORBIT_DEG_PER_FRAME * frame)
        turn = torch.from_numpy(Rotation.from_rotvec([0.0, angle, 0.0]).as_matrix())
        camera = camera_through_file(look_at(centre + turn @ offset, centre).numpy(), base.focal_mm)
        if not in_frame(points[frame], camera.view, camera.focal_mm, size, ranges.margin):
            return [base] * len(points)
        cameras.append(camera)
    return cameras


@dataclass(frozen=True, eq=False)
class SequenceFrames:
    """A sequence's poses (F, N, 7) float64 and one camera per frame."""

    poses: np.ndarray
    cameras: list[SampledCamera]


def make_sequence(mesh: SkinnedMesh, sampler: PoseSampler, pose_rng: np.random.Generator,
                  camera_rng: np.random.Generator, length: int, size: int, ranges: CameraRanges, where: str,
                  source: PoseSource = key_pose_source) -> SequenceFrames:
    """Poses from `source` and the cameras that follow them."""
    poses = source(mesh, sampler, pose_rng, length)
    posed = skin(mesh, poses)  # (F, V, 3)
    return SequenceFrames(poses, sequence_cameras(posed, camera_rng, size, ranges, where))
