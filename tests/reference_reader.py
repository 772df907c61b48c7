"""How the reference code reads a dataset in the published layout, restated for tests.

The reference training code (DualPM/DualPM_Paper, `src/dualpm_paper`: `alt_dataset.RasterizeDataset`,
`utils.rescale_im_and_mask`, `utils.read_camera`, `skin.skin_mesh`; configs/test.yaml for the split)
is not a dependency of this project. These functions redo the operations it applies to each file,
written from their documented behaviour, so tests can check that what `dualpm-prep synth` writes
loads there unchanged (docs/dataset.md states the contract they encode):

    ids           stems of renders/*_rgb.png, cut at "_rgb"; train = lines of train_benchmark.txt with
                  whitespace stripped (exact strings), validation = every other id
    pose          np.load(...)["poses"] keeps the file's dtype; the node matrices built from it are
                  multiplied with the mesh's float64 matrices, which fails for anything but float64
    mask          np.array(PIL.Image.open(...)) -> torch.from_numpy; must be 2-D with max <= 1; then
                  bilinear resize of its float copy, inside where the result is >= 1
    rgb           np.array(PIL.Image.open(...)): (H, W, 3) uint8, bicubic-resized as a tensor
    camera        the text split at "\\n", empty lines dropped, each line split at single spaces
    metadata      yaml.safe_load; model_name names shapes/<model>/<model>_shape.gltf, focal_length a number
    shapes        every entry of shapes/ is a model folder; the glTF has one JOINTS_* and one WEIGHTS_*

Every function raises `ReferenceRefusal` where the reference would raise (an assert, a dtype error).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pygltflib
import torch
import torch.nn.functional as F
import yaml
from PIL import Image


class ReferenceRefusal(Exception):
    """The reference code would fail on this file."""


def ids(root: Path) -> list[str]:
    """Sample ids as the reference lists them: from the RGB renders."""
    return sorted(p.stem.split("_rgb")[0] for p in (root / "renders").glob("*_rgb.png"))


def train_val(root: Path) -> tuple[list[str], list[str]]:
    """(train, val) ids: train_benchmark.txt lines are included, everything else validates."""
    listed = {line.strip() for line in (root / "train_benchmark.txt").read_text().splitlines()}
    every = ids(root)
    return [i for i in every if i in listed], [i for i in every if i not in listed]


def pose_matrices(path: Path) -> torch.Tensor:
    """(N, 4, 4) node matrices of a pose file, combined with float64 mesh matrices as the reference does."""
    poses = torch.from_numpy(np.load(path)["poses"])  # the dtype of the file
    if poses.ndim != 2 or poses.shape[1] != 7:
        raise ReferenceRefusal(f"{path}: poses of shape {tuple(poses.shape)}")
    w, x, y, z = poses[:, :4].unbind(-1)
    scale = 2.0 / (poses[:, :4] ** 2).sum(-1)
    rotation = torch.stack([
        1 - scale * (y * y + z * z), scale * (x * y - z * w), scale * (x * z + y * w),
        scale * (x * y + z * w), 1 - scale * (x * x + z * z), scale * (y * z - x * w),
        scale * (x * z - y * w), scale * (y * z + x * w), 1 - scale * (x * x + y * y),
    ], -1).reshape(-1, 3, 3)  # (N, 9) -> (N, 3, 3)
    matrices = torch.zeros(len(poses), 4, 4, dtype=poses.dtype)
    matrices[:, :3, :3], matrices[:, :3, 3], matrices[:, 3, 3] = rotation, poses[:, 4:], 1
    inverse_bind = torch.eye(4, dtype=torch.float64).expand(len(poses), 4, 4)  # float64 in the reference
    try:
        return inverse_bind @ matrices
    except RuntimeError as err:  # "expected scalar type Double but found Float"
        raise ReferenceRefusal(f"{path}: {err}") from err


def mask(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) float32 0/1 mask at `size`, after the reference's checks and resize."""
    values = torch.from_numpy(np.array(Image.open(path)))
    if values.dim() != 2:
        raise ReferenceRefusal(f"{path}: mask must be 2D, got shape {tuple(values.shape)}")
    if not values.max() <= 1.0:
        raise ReferenceRefusal(f"{path}: mask must be in range [0,1], its maximum is {values.max()}")
    resized = F.interpolate(values[None, None].float(), size, mode="bilinear")[0, 0]
    return (resized >= 1.0).float()


def rgb(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) image at `size`, resized as the reference resizes it."""
    image = torch.from_numpy(np.array(Image.open(path)))
    if image.dim() != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
        raise ReferenceRefusal(f"{path}: expected an 8-bit RGB image, got {image.dtype} {tuple(image.shape)}")
    return F.interpolate(image.permute(2, 0, 1)[None], size, mode="bicubic")[0].permute(1, 2, 0)


def camera(path: Path) -> np.ndarray:
    """(4, 4) camera-to-world matrix, parsed the reference's way."""
    try:
        rows = [[float(v) for v in line.split(" ")] for line in path.read_text().split("\n") if line != ""]
    except ValueError as err:  # e.g. two spaces, a tab, a trailing space
        raise ReferenceRefusal(f"{path}: {err}") from err
    matrix = np.array(rows)
    if matrix.shape != (4, 4):
        raise ReferenceRefusal(f"{path}: camera of shape {matrix.shape}")
    return matrix


def metadata(path: Path, root: Path) -> dict:
    """The metadata mapping; its model must be a model folder with a .gltf shape."""
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("model_name"), str):
        raise ReferenceRefusal(f"{path}: no model_name")
    float(data["focal_length"])
    model = data["model_name"]
    if not (root / "shapes" / model / f"{model}_shape.gltf").is_file():
        raise ReferenceRefusal(f"{path}: no shapes/{model}/{model}_shape.gltf")
    return data


def shapes(root: Path) -> dict[str, np.ndarray]:
    """Model name -> (V, 3) float32 POSITION values read the reference's way (bufferView offset plus
    accessor offset into the buffer pygltflib finds); every entry of shapes/ must be a model folder
    whose glTF has one mesh, skin and primitive and a single JOINTS_*/WEIGHTS_* set."""
    names = {}
    for entry in sorted((root / "shapes").iterdir()):
        if not entry.is_dir():
            raise ReferenceRefusal(f"{entry}: a file in shapes/; the reference opens every entry as a model")
        gltf = pygltflib.GLTF2().load(str(entry / f"{entry.name}_shape.gltf"))
        if len(gltf.meshes) != 1 or len(gltf.skins) != 1 or len(gltf.meshes[0].primitives) != 1:
            raise ReferenceRefusal(f"{entry}: not one mesh, one skin, one primitive")
        attributes = gltf.meshes[0].primitives[0].attributes
        for kind in ("JOINTS_", "WEIGHTS_"):
            if sum(kind in name and getattr(attributes, name) is not None for name in dir(attributes)) != 1:
                raise ReferenceRefusal(f"{entry}: needs exactly one {kind}* attribute")
        accessor = gltf.accessors[attributes.POSITION]
        view = gltf.bufferViews[accessor.bufferView]
        data = gltf.get_data_from_buffer_uri(gltf.buffers[view.buffer].uri)
        start = view.byteOffset + accessor.byteOffset  # both must be numbers there
        names[entry.name] = np.frombuffer(data[start : start + 12 * accessor.count], "<f4").reshape(-1, 3)
    return names
