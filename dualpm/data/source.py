"""Source datasets in the published DualPM layout (the input of `dualpm-prep render/features`).

```
ROOT/shapes/<model>/<model>_shape.gltf   (or .glb) one skinned triangle mesh
ROOT/poses/<id>_pose.npz                 key "poses": (num_nodes, 7) local [qw qx qy qz tx ty tz]
ROOT/cameras/<id>_camera.txt             4x4 camera-to-world, Blender Z-up world
ROOT/metadata/<id>_metadata.txt          YAML: model_name, focal_length (mm, 36 mm sensor height)
ROOT/renders/<id>_rgb.png                RGB image (optional)
ROOT/masks/<id>_mask.png                 object mask (optional)
ROOT/features/<id>_feat.png              packed precomputed features (optional)
ROOT/splits/<name>.txt                   optional id lists, one id per line (e.g. val.txt)
```
A sample exists when its pose file exists; its other files are read lazily and any problem raises
`DatasetError` naming the file, so a pipeline can record it as that sample's failure. Ids that are
integer multiples of 5000 are skipped (known corrupt in the published set); `dualpm-prep synth`
never produces them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from dualpm.camera import read_camera_txt
from dualpm.errors import DatasetError
from dualpm.store.manifest import SAMPLE_ID_RE

SKIP_EVERY = 5000
_POSE_SUFFIX = "_pose.npz"


def is_skipped_id(sample_id: str) -> bool:
    """True for ids the reference skips: integer multiples of `SKIP_EVERY` (including 0)."""
    return sample_id.isdigit() and int(sample_id) % SKIP_EVERY == 0


def _sort_key(sample_id: str) -> tuple[int, int | str]:
    return (0, int(sample_id)) if sample_id.isdigit() else (1, sample_id)


@dataclass(frozen=True)
class Layout:
    """Paths of one dataset in the reference layout (no I/O)."""

    root: Path

    def mesh(self, model: str) -> Path:
        base = self.root / "shapes" / model / f"{model}_shape"
        glb = base.with_suffix(".glb")
        return glb if glb.exists() and not base.with_suffix(".gltf").exists() else base.with_suffix(".gltf")

    def pose(self, sample_id: str) -> Path:
        return self.root / "poses" / f"{sample_id}{_POSE_SUFFIX}"

    def camera(self, sample_id: str) -> Path:
        return self.root / "cameras" / f"{sample_id}_camera.txt"

    def metadata(self, sample_id: str) -> Path:
        return self.root / "metadata" / f"{sample_id}_metadata.txt"

    def rgb(self, sample_id: str) -> Path:
        return self.root / "renders" / f"{sample_id}_rgb.png"

    def mask(self, sample_id: str) -> Path:
        return self.root / "masks" / f"{sample_id}_mask.png"

    def feature(self, sample_id: str) -> Path:
        return self.root / "features" / f"{sample_id}_feat.png"

    def split(self, name: str) -> Path:
        return self.root / "splits" / f"{name}.txt"


@dataclass(frozen=True)
class SampleMetadata:
    """Contents of `metadata/<id>_metadata.txt`."""

    model_name: str
    focal_length: float  # millimetres, 36 mm sensor height


def format_metadata(meta: SampleMetadata) -> str:
    """YAML text of a metadata file."""
    return yaml.safe_dump({"model_name": meta.model_name, "focal_length": float(meta.focal_length)}, sort_keys=True)


def read_metadata(path: str | os.PathLike) -> SampleMetadata:
    """Read and validate a metadata YAML file; raises `DatasetError` naming the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise DatasetError(f"{path}: cannot read metadata ({err})") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: metadata must be a YAML mapping with model_name and focal_length")
    missing = [k for k in ("model_name", "focal_length") if k not in data]
    if missing:
        raise DatasetError(f"{path}: metadata is missing {', '.join(missing)}")
    model = str(data["model_name"])
    if not SAMPLE_ID_RE.match(model):
        raise DatasetError(f"{path}: model_name {model!r} is not a plain folder name")
    try:
        focal = float(data["focal_length"])
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{path}: focal_length {data['focal_length']!r} is not a number") from err
    if not np.isfinite(focal) or focal <= 0:
        raise DatasetError(f"{path}: focal_length must be a positive number of millimetres, got {focal}")
    return SampleMetadata(model_name=model, focal_length=focal)


@dataclass(frozen=True)
class SourceSample:
    """One sample's metadata and file paths (images and pose are read by their users)."""

    id: str
    model_name: str
    focal_length: float  # mm
    camera_pose: np.ndarray  # (4, 4) float64 camera-to-world, Z-up world
    pose_path: Path
    rgb_path: Path | None
    mask_path: Path | None
    feature_path: Path | None


class SourceDataset:
    """Read access to a dataset in the reference layout."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.layout = Layout(self.root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset folder does not exist")
        for sub in ("shapes", "poses", "cameras", "metadata"):
            if not (self.root / sub).is_dir():
                raise DatasetError(
                    f"{self.root}: not a DualPM dataset (missing folder '{sub}/'; expected shapes/, poses/, "
                    "cameras/, metadata/ as in the published layout)"
                )
        ids = [
            name[: -len(_POSE_SUFFIX)]
            for name in os.listdir(self.root / "poses")
            if name.endswith(_POSE_SUFFIX) and not name.startswith(".")
        ]
        self.ids: list[str] = sorted((i for i in ids if SAMPLE_ID_RE.match(i) and not is_skipped_id(i)), key=_sort_key)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def models(self) -> list[str]:
        """Model names with a folder under shapes/."""
        return sorted(p.name for p in (self.root / "shapes").iterdir() if p.is_dir() and not p.name.startswith("."))

    def sample(self, sample_id: str) -> SourceSample:
        """Metadata and paths of one sample; raises `DatasetError` naming the bad file."""
        lay = self.layout
        meta = read_metadata(lay.metadata(sample_id))
        camera = read_camera_txt(lay.camera(sample_id))

        def optional(p: Path) -> Path | None:
            return p if p.exists() else None

        return SourceSample(
            id=sample_id,
            model_name=meta.model_name,
            focal_length=meta.focal_length,
            camera_pose=camera,
            pose_path=lay.pose(sample_id),
            rgb_path=optional(lay.rgb(sample_id)),
            mask_path=optional(lay.mask(sample_id)),
            feature_path=optional(lay.feature(sample_id)),
        )

    def split_ids(self, name: str) -> list[str] | None:
        """Ids listed in `splits/<name>.txt` (None when the file does not exist)."""
        path = self.layout.split(name)
        if not path.exists():
            return None
        listed = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        bad = [i for i in listed if not SAMPLE_ID_RE.match(i)]
        if bad:
            raise DatasetError(f"{path}: invalid sample ids {bad[:5]}")
        return listed

    def splits(self) -> dict[str, list[str]]:
        """Partition of `ids` into 'train' and 'val' from `splits/val.txt` (all train without it).

        Ids in val.txt that have no sample are ignored; `splits/train.txt`, when present, limits
        the training split to the ids it lists.
        """
        val = set(self.split_ids("val") or [])
        train_only = self.split_ids("train")
        allowed = set(train_only) if train_only is not None else None
        out = {
            "train": [i for i in self.ids if i not in val and (allowed is None or i in allowed)],
            "val": [i for i in self.ids if i in val],
        }
        return out
