"""glTF 2.0 animation clips: read them, and sample a clip at any time as a pose (the library's one reader).

    clips = load_clips("fox.glb")                       # every animation of the file, in file order
    clip = clip_by_name(clips, "Walk")
    pose = sample_clip(clip, mesh, 0.5)                 # (N, 7) float64, as `dualpm.skinning` takes
    poses = sample_clip(clip, mesh, np.linspace(clip.start, clip.end, 30))   # (30, N, 7)

A pose is the LOCAL transform of every node, `[qw, qx, qy, qz, tx, ty, tz]` (real-first quaternion,
w >= 0), the format of the reference pose files. Nodes a clip does not animate keep their rest
rotation / translation. Interpolation follows the glTF 2.0 specification (section 3.11):

    STEP         the value of the last keyframe at or before t
    LINEAR       linear for translations; spherical linear (slerp, shortest arc) for rotations
    CUBICSPLINE  cubic Hermite spline from the keyframes' in-tangent, value and out-tangent (the
                 tangents scaled by the keyframe interval); rotations normalised afterwards

Before the first keyframe a channel holds its first value, after the last its last value. Scale and
morph-weight channels are read but not part of a pose (the pose format keeps every node's rest
scale: `dualpm.skinning`); `AnimationClip.animates_scale` says when a clip has them.

Rigs used at another size (`dualpm.gltf.scaled_mesh`) take `scale_clip(clip, factor)` so animated
translations follow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dualpm.errors import GltfError
from dualpm.gltf import SkinnedMesh
from dualpm.gltf_io import BYTE, FLOAT, SHORT, UBYTE, USHORT, buffer_bytes, read_accessor, read_document

PATHS = ("translation", "rotation", "scale", "weights")
INTERPOLATIONS = ("LINEAR", "STEP", "CUBICSPLINE")
_COMPONENTS = {"translation": 3, "rotation": 4, "scale": 3}


@dataclass(frozen=True, eq=False)
class Channel:
    """One animated property of one node.

    `values` is (K, C) for STEP / LINEAR and (K, 3, C) for CUBICSPLINE (in-tangent, value,
    out-tangent per keyframe); rotations are real-first `[w, x, y, z]`. Times in seconds, increasing.
    """

    node: int
    path: str  # "translation", "rotation" or "scale"
    interpolation: str  # one of INTERPOLATIONS
    times: np.ndarray  # (K,) float64 seconds
    values: np.ndarray  # (K, C) or (K, 3, C) float64


@dataclass(frozen=True, eq=False)
class AnimationClip:
    """One glTF animation: its channels (weights channels dropped) and time range in seconds."""

    name: str  # the animation's name, or "animation_<index>"
    index: int  # position in the file's `animations`
    channels: tuple[Channel, ...]
    start: float  # earliest keyframe time of any channel
    end: float  # latest keyframe time of any channel
    animates_scale: bool = False  # some channel animates a node's scale (not part of a pose)

    @property
    def duration(self) -> float:
        return self.end - self.start


def load_clips(path: str | os.PathLike, num_nodes: int | None = None) -> tuple[AnimationClip, ...]:
    """Every animation of a .gltf / .glb file, in file order (empty when it has none).

    Args:
        num_nodes: when given, channels must target nodes below it (the rig's node count).
    Raises:
        `GltfError` naming the file and the animation for anything malformed: missing samplers or
        accessors, times that are not increasing, wrong value counts, unknown interpolation.
    """
    path = Path(path)
    doc, blob = read_document(path)
    if not doc.animations:
        return ()
    buffers = [buffer_bytes(doc, i, blob, path) for i in range(len(doc.buffers))]
    nodes = len(doc.nodes) if num_nodes is None else num_nodes
    clips, names = [], set()
    for a, anim in enumerate(doc.animations):
        name = anim.name or f"animation_{a}"
        if name in names:
            name = f"{name}_{a}"
        names.add(name)
        where = f"animation {a} ({name!r})"
        channels, has_scale = [], False
        for c, channel in enumerate(anim.channels or []):
            target = channel.target
            if target is None or target.path not in PATHS:
                raise GltfError(f"{path}: {where} channel {c} has target path "
                                f"{getattr(target, 'path', None)!r}; expected one of {', '.join(PATHS)}")
            if target.path == "weights":
                continue  # morph targets: not part of a skinned pose
            if target.node is None:
                continue  # glTF allows channels without a node (for extensions): nothing to animate
            if not 0 <= target.node < nodes:
                raise GltfError(f"{path}: {where} channel {c} targets node {target.node}, "
                                f"but there are {nodes}")
            samplers = anim.samplers or []
            if channel.sampler is None or not 0 <= channel.sampler < len(samplers):
                raise GltfError(f"{path}: {where} channel {c} refers to missing sampler {channel.sampler}")
            channels.append(_read_channel(doc, buffers, samplers[channel.sampler], target.node, target.path,
                                          f"{where} channel {c}", path))
            has_scale |= target.path == "scale"
        posed = [ch for ch in channels if ch.path != "scale"]
        if not channels:
            continue  # an animation of morph weights only
        clips.append(AnimationClip(
            name=name, index=a, channels=tuple(posed), animates_scale=has_scale,
            start=float(min(ch.times[0] for ch in channels)), end=float(max(ch.times[-1] for ch in channels)),
        ))
    return tuple(clips)


def _read_channel(doc, buffers, sampler, node: int, target: str, where: str, path: Path) -> Channel:
    interpolation = sampler.interpolation or "LINEAR"
    if interpolation not in INTERPOLATIONS:
        raise GltfError(f"{path}: {where} has interpolation {interpolation!r}; expected one of "
                        f"{', '.join(INTERPOLATIONS)}")
    times = read_accessor(doc, buffers, sampler.input, f"{where} input", {"SCALAR": {FLOAT}}, path)[:, 0]
    times = times.astype(np.float64)
    if len(times) == 0:
        raise GltfError(f"{path}: {where} has no keyframes")
    if not np.isfinite(times).all() or (np.diff(times) <= 0).any():
        raise GltfError(f"{path}: {where} keyframe times are not finite and strictly increasing")
    comps = _COMPONENTS[target]
    kinds = {FLOAT} | ({BYTE, UBYTE, SHORT, USHORT} if target == "rotation" else set())
    vtype = {3: "VEC3", 4: "VEC4"}[comps]
    values = read_accessor(doc, buffers, sampler.output, f"{where} output", {vtype: kinds}, path)
    if values.dtype.kind != "f":
        raise GltfError(f"{path}: {where} output has integer components but is not normalized")
    per_key = 3 if interpolation == "CUBICSPLINE" else 1
    if len(values) != per_key * len(times):
        raise GltfError(f"{path}: {where} has {len(values)} output values for {len(times)} keyframes "
                        f"({interpolation} needs {per_key} per keyframe)")
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise GltfError(f"{path}: {where} output has NaN or infinite values")
    if target == "rotation":
        values = np.roll(values, 1, axis=-1)  # glTF [x, y, z, w] -> [w, x, y, z] (tangents alike)
        if interpolation != "CUBICSPLINE" and (np.linalg.norm(values, axis=1) < 1e-8).any():
            raise GltfError(f"{path}: {where} has a zero rotation quaternion")
    if per_key == 3:
        values = values.reshape(len(times), 3, comps)
    return Channel(node=node, path=target, interpolation=interpolation, times=times, values=values)


def clip_by_name(clips: tuple[AnimationClip, ...], name: str) -> AnimationClip:
    """The clip called `name`; `GltfError` listing the available names otherwise."""
    for clip in clips:
        if clip.name == name:
            return clip
    names = ", ".join(c.name for c in clips) or "none"
    raise GltfError(f"no animation clip named {name!r}; the rig has {names}")


def scale_clip(clip: AnimationClip, factor: float) -> AnimationClip:
    """`clip` for the rig scaled by `factor` (`dualpm.gltf.scaled_mesh`): translations (and their
    cubic tangents) times `factor`, rotations unchanged."""
    channels = tuple(
        replace(ch, values=ch.values * factor) if ch.path == "translation" else ch for ch in clip.channels
    )
    return replace(clip, channels=channels)


def sample_channel(channel: Channel, times: np.ndarray | float) -> np.ndarray:
    """Values of `channel` at `times` (seconds), interpolated as glTF defines.

    Args:
        times: float or (T,) float seconds, any range (clamped to the keyframes).
    Returns:
        (T, C) float64 (C = 3 translation, 4 rotation `[w, x, y, z]` unit, w >= 0); (C,) for a float.
    """
    scalar = np.ndim(times) == 0
    t = np.atleast_1d(np.asarray(times, dtype=np.float64))
    keys = channel.times
    cubic = channel.interpolation == "CUBICSPLINE"
    points = channel.values[:, 1] if cubic else channel.values  # (K, C) keyframe values
    if len(keys) == 1:
        out = np.repeat(points[:1], len(t), axis=0)
        return _finish(out, channel.path, scalar)
    # k: the keyframe interval [keys[k], keys[k+1]] holding t; s: the position within it in [0, 1]
    k = np.clip(np.searchsorted(keys, t, side="right") - 1, 0, len(keys) - 2)
    span = keys[k + 1] - keys[k]
    s = np.clip((t - keys[k]) / span, 0.0, 1.0)[:, None]
    a, b = points[k], points[k + 1]
    if channel.interpolation == "STEP":
        out = np.where(s >= 1.0, b, a)
    elif cubic:
        out_tangent, in_tangent = channel.values[k, 2], channel.values[k + 1, 0]
        s2, s3, d = s * s, s * s * s, span[:, None]
        out = ((2 * s3 - 3 * s2 + 1) * a + d * (s3 - 2 * s2 + s) * out_tangent
               + (-2 * s3 + 3 * s2) * b + d * (s3 - s2) * in_tangent)
    elif channel.path == "rotation":
        out = _slerp(a, b, s[:, 0])
    else:
        out = a + s * (b - a)
    return _finish(out, channel.path, scalar)


def _finish(out: np.ndarray, path: str, scalar: bool) -> np.ndarray:
    if path == "rotation":
        out = out / np.linalg.norm(out, axis=1, keepdims=True)
        out = np.where(out[:, :1] < 0, -out, out)  # one sign convention, as pose files store it
    return out[0] if scalar else out


def _slerp(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Shortest-arc spherical interpolation of unit quaternions (n, 4) at fractions s (n,)."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    dot = (a * b).sum(1)
    b = np.where(dot[:, None] < 0, -b, b)
    dot = np.abs(dot)
    theta = np.arccos(np.clip(dot, -1.0, 1.0))
    small = theta < 1e-6  # nearly equal: linear is exact to float64 rounding
    sin = np.where(small, 1.0, np.sin(theta))
    wa = np.where(small, 1 - s, np.sin((1 - s) * theta) / sin)
    wb = np.where(small, s, np.sin(s * theta) / sin)
    return wa[:, None] * a + wb[:, None] * b


def sample_clip(clip: AnimationClip, mesh: SkinnedMesh, times: np.ndarray | float) -> np.ndarray:
    """Poses of `mesh` from `clip` at `times` (seconds, in the clip's own time: `clip.start`..`clip.end`).

    Args:
        clip: from `load_clips` of the rig's file (`scale_clip` for a scaled rig).
        mesh: the rig the clip belongs to (rest transforms of nodes the clip does not animate).
        times: float or (T,) float seconds.
    Returns:
        (N, 7) float64 node-local `[qw, qx, qy, qz, tx, ty, tz]` for a float, (T, N, 7) for an array:
        the pose format of `dualpm.skinning` and the reference pose files.
    """
    scalar = np.ndim(times) == 0
    t = np.atleast_1d(np.asarray(times, dtype=np.float64))
    rest = np.concatenate([mesh.rest_rotation, mesh.rest_translation], axis=1).astype(np.float64)  # (N, 7)
    rest[rest[:, 0] < 0, :4] *= -1
    poses = np.repeat(rest[None], len(t), axis=0)  # (T, N, 7)
    for channel in clip.channels:
        if channel.node >= mesh.num_nodes:
            raise GltfError(f"{mesh.source or mesh.name}: clip {clip.name!r} targets node {channel.node}, "
                            f"but the rig has {mesh.num_nodes} nodes")
        columns = slice(0, 4) if channel.path == "rotation" else slice(4, 7)
        poses[:, channel.node, columns] = sample_channel(channel, t)
    return poses[0] if scalar else poses
