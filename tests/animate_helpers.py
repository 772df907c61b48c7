"""Helpers of tests/test_animate*.py: rigs, known pose sequences, predictions stores, independent readers
(the GLB animation through pygltflib + numpy, BVH through a small parser written here) and the Khronos
glTF validator (npm package `gltf-validator`, run with node)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pygltflib
import pytest
import torch
from scipy.spatial.transform import Rotation

from datagen import tube_mesh
from dualpm.camera import look_at, projection_from_focal
from dualpm.gltf import SkinnedMesh, load_skinned_mesh, save_skinned_mesh
from dualpm.predictions import PredictedMaps, PredictionsWriter
from dualpm.render import render_dual_pointmaps
from dualpm.skinning import rest_pose, skin

REPO = Path(__file__).parents[1]
VALIDATOR = Path(os.environ.get("DUALPM_GLTF_VALIDATOR", REPO / ".ci" / "node" / "node_modules" / "gltf-validator"))
VALIDATE_JS = """
const fs = require("fs");
const validator = require(process.argv[1]);
validator.validateBytes(new Uint8Array(fs.readFileSync(process.argv[2])), {maxIssues: 1000})
  .then((r) => console.log(JSON.stringify({errors: r.issues.numErrors,
        messages: r.issues.messages.filter((m) => m.severity === 0)})))
  .catch((e) => { console.error(String(e)); process.exit(2); });
"""


def validate_glb(path: Path) -> None:
    """Assert the Khronos glTF validator reports 0 errors (skips where node or the package is missing)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: cannot run the Khronos glTF validator")
    if not (VALIDATOR / "package.json").is_file():
        pytest.skip(f"the npm package gltf-validator is not installed at {VALIDATOR} "
                    "(`make test` installs it with npm; or set DUALPM_GLTF_VALIDATOR)")
    run = subprocess.run(["node", "-e", VALIDATE_JS, str(VALIDATOR), str(path)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["errors"] == 0, report["messages"][:5]


def known_poses(rig: SkinnedMesh, frames: int, seed: int = 0, max_angle: float = 0.6) -> np.ndarray:
    """(F, N, 7) float64: smooth random rotations of every joint (up to `max_angle` rad from rest), root moved."""
    rng = np.random.default_rng(seed)
    poses = np.repeat(rest_pose(rig)[None].astype(np.float64), frames, axis=0)
    t = np.linspace(0.0, 1.0, frames)[:, None]
    for node in rig.joint_nodes:
        axis = rng.normal(size=3)
        rotvec = (axis / np.linalg.norm(axis)) * max_angle * np.sin(np.pi * t + rng.uniform(0, 3))
        rest = Rotation.from_quat(np.roll(rig.rest_rotation[node].astype(np.float64), -1))
        poses[:, node, :4] = np.roll((Rotation.from_rotvec(rotvec) * rest).as_quat(), 1, axis=-1)
    root = rig.joint_nodes[0]
    poses[:, root, 4:] += 0.3 * np.concatenate([np.sin(3 * t), 0.5 * t, np.cos(2 * t) - 1], axis=1)
    return poses


def fancy_rig(folder: Path) -> Path:
    """The tube rig as .gltf + .bin with an image file beside it, node 2 stored as a matrix with scale 1.5
    and a rest rotation on node 3 (so conversions and embedding are exercised)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fancy.gltf"
    save_skinned_mesh(tube_mesh("fancy"), path)
    doc = json.loads(path.read_text())
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_euler("z", 20, degrees=True).as_matrix() * 1.5
    matrix[:3, 3] = doc["nodes"][2]["translation"]
    node = doc["nodes"][2]
    for key in ("translation", "rotation", "scale"):
        node.pop(key, None)
    node["matrix"] = matrix.T.reshape(-1).tolist()  # column-major
    doc["nodes"][3]["rotation"] = Rotation.from_euler("x", 30, degrees=True).as_quat().tolist()
    (folder / "tex 1.png").write_bytes(_tiny_png())
    doc["images"] = [{"uri": "tex%201.png", "name": "skin"}]
    doc["extras"] = {"author": "test"}
    path.write_text(json.dumps(doc))
    return path


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 100, 50)).save(buffer, format="PNG")
    return buffer.getvalue()


def read_glb_animation(path: Path, num_nodes: int) -> tuple[np.ndarray, dict, pygltflib.GLTF2]:
    """Poses (F, num_nodes, 7) read back from the GLB's first animation with pygltflib + numpy (nodes without
    channels at their rest TRS from the document), the channels {(node, path): (times, values)}, the doc."""
    doc = pygltflib.GLTF2().load(str(path))
    blob = doc.binary_blob()

    def accessor(index: int) -> np.ndarray:
        acc = doc.accessors[index]
        view = doc.bufferViews[acc.bufferView]
        width = {"SCALAR": 1, "VEC3": 3, "VEC4": 4}[acc.type]
        assert acc.componentType == 5126 and view.byteStride in (None, 4 * width)
        start = (view.byteOffset or 0) + (acc.byteOffset or 0)
        return np.frombuffer(blob, "<f4", acc.count * width, start).reshape(acc.count, width)

    animation = doc.animations[0]
    channels = {}
    for channel in animation.channels:
        sampler = animation.samplers[channel.sampler]
        channels[(channel.target.node, channel.target.path)] = (accessor(sampler.input)[:, 0],
                                                                accessor(sampler.output))
    frames = len(next(iter(channels.values()))[0])
    rest = load_skinned_mesh(path)
    poses = np.repeat(rest_pose(rest)[None, :num_nodes].astype(np.float64), frames, axis=0)
    for (node, kind), (_, values) in channels.items():
        if node >= num_nodes:
            continue
        if kind == "rotation":
            poses[:, node, :4] = np.roll(values, 1, axis=-1)  # glTF x, y, z, w -> w, x, y, z
        elif kind == "translation":
            poses[:, node, 4:] = values
    return poses, channels, doc


def parse_bvh(text: str) -> tuple[list[dict], np.ndarray, float]:
    """A small BVH reader: joints [{name, parent, offset, channels}] (End Sites as joints named 'End'
    without channels) in file order, the motion table (F, C) and the frame time."""
    tokens = text.split()
    joints: list[dict] = []
    stack: list[int] = []
    i = tokens.index("HIERARCHY") + 1
    while tokens[i] != "MOTION":
        token = tokens[i]
        if token in ("ROOT", "JOINT"):
            joints.append({"name": tokens[i + 1], "parent": stack[-1] if stack else -1, "channels": []})
            i += 2
        elif token == "End":
            joints.append({"name": "End", "parent": stack[-1], "channels": []})
            i += 2
        elif token == "{":
            stack.append(len(joints) - 1)
            i += 1
        elif token == "}":
            stack.pop()
            i += 1
        elif token == "OFFSET":
            joints[stack[-1]]["offset"] = np.array([float(x) for x in tokens[i + 1 : i + 4]])
            i += 4
        elif token == "CHANNELS":
            count = int(tokens[i + 1])
            joints[stack[-1]]["channels"] = tokens[i + 2 : i + 2 + count]
            i += 2 + count
        else:
            raise AssertionError(f"unexpected BVH token {token!r}")
    frames = int(tokens[i + 2])
    frame_time = float(tokens[i + 5])
    values = np.array([float(x) for x in tokens[i + 6 :]]).reshape(frames, -1)
    return joints, values, frame_time


def bvh_positions(joints: list[dict], values: np.ndarray) -> np.ndarray:
    """(F, len(joints), 3) world positions by BVH forward kinematics: global = parent @ T(offset + position
    channels) @ rotation channels multiplied in the listed order (intrinsic)."""
    axes = {"X": np.array([1.0, 0, 0]), "Y": np.array([0, 1.0, 0]), "Z": np.array([0, 0, 1.0])}
    out = np.zeros((len(values), len(joints), 3))
    for f, row in enumerate(values):
        column = 0
        world = []
        for j, joint in enumerate(joints):
            local = np.eye(4)
            local[:3, 3] = joint["offset"]
            position = np.zeros(3)
            rotation = np.eye(3)
            for name in joint["channels"]:
                value = row[column]
                column += 1
                if name.endswith("position"):
                    position["XYZ".index(name[0])] = value
                else:
                    rotation = rotation @ Rotation.from_rotvec(np.radians(value) * axes[name[0]]).as_matrix()
            local[:3, :3] = rotation
            local[:3, 3] += position  # root: OFFSET + position channels
            parent = world[joint["parent"]] if joint["parent"] >= 0 else np.eye(4)
            world.append(parent @ local)
            out[f, j] = world[-1][:3, 3]
        assert column == row.size
    return out


def write_predictions(folder: Path, rig: SkinnedMesh, poses: np.ndarray, focal: float | np.ndarray = 50.0,
                      size: int = 48,
                      distance: float = 5.0, layers: int = 2, ids: list[str] | None = None,
                      attrs: dict | None = None, unseen: tuple[int, ...] = ()) -> tuple[np.ndarray, list[str]]:
    """A predictions store holding the exact dual point maps of `rig` in `poses` (an oracle), seen by cameras
    at `distance` with some elevation, except frames `unseen` (no occupied pixel); returns the views
    (F, 4, 4) and the ids."""
    frames = len(poses)
    ids = ids or [f"frame{i + 1}" for i in range(frames)]
    angle = np.linspace(0.2, 0.5, frames)
    eye = torch.tensor(np.stack([distance * np.sin(angle), 0.3 * distance * np.ones(frames),
                                 distance * np.cos(angle)], 1))
    view = look_at(eye, torch.zeros_like(eye))
    posed = skin(rig, poses, dtype=torch.float64)
    projection = projection_from_focal(torch.as_tensor(np.broadcast_to(focal, (frames,)).copy(), dtype=torch.float64))
    out = render_dual_pointmaps(torch.tensor(rig.vertices, dtype=torch.float64), posed, torch.tensor(rig.faces),
                                view, projection, size, layers, backend="cpu", workers=1).numpy()
    alpha = out[..., 6]  # (F, H, W, L)
    alpha[list(unseen)] = 0.0
    posed_maps = out[..., 3:6]  # camera space minus view[2, 3], as the model predicts
    maps = PredictedMaps(
        canonical=np.moveaxis(out[..., 0:3], (3, 4), (1, 2)).astype(np.float16),  # (F, L, 3, H, W)
        posed=np.moveaxis(posed_maps, (3, 4), (1, 2)).astype(np.float16),
        occupancy=np.moveaxis(alpha, 3, 1).astype(np.float16),
        confidence=np.moveaxis(np.where(alpha > 0, 10.0, 1.0), 3, 1).astype(np.float16),
        mask=(alpha[..., 0] > 0).astype(np.uint8),
    )
    store = PredictionsWriter(folder / "predictions.zarr", layers, (size, size))
    store.append(ids, maps)
    store.finish({"mode": "oracle", **(attrs or {})})
    return view.numpy(), ids
