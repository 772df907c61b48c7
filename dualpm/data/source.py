"""Source datasets in the published DualPM layout (the input of `dualpm-prep render/features`).

```
ROOT/shapes/<model>/<model>_shape.gltf   (or .glb) one skinned triangle mesh
ROOT/poses/<id>_pose.npz                 key "poses": (num_nodes, 7) local [qw qx qy qz tx ty tz]
ROOT/cameras/<id>_camera.txt             4x4 camera-to-world, Blender Z-up world
ROOT/metadata/<id>_metadata.txt          YAML: model_name, focal_length (mm, 36 mm sensor height)
ROOT/renders/<id>_rgb.png                RGB image (optional)
ROOT/masks/<id>_mask.png                 object mask (optional)
ROOT/features/<id>_feat.png              packed precomputed features (optional)
ROOT/train_benchmark.txt                 the published split: training ids, one per line (optional)
ROOT/splits/<name>.txt                   our id lists, one id per line (optional: val.txt, train.txt)
```
The full contract (dtypes, value ranges, what the reference code accepts) is docs/dataset.md.

A sample exists when its pose file exists; its other files are read lazily and any problem raises
`DatasetError` naming the file, so a pipeline can record it as that sample's failure. Ids that are
integer multiples of 5000 are skipped (known corrupt in the published set); `dualpm-prep synth`
never produces them. Every file of the layout folders that is not taken (an invalid id, a skipped
multiple of 5000, no pose file for its id, a name of no known pattern, a hidden file) is listed in
`SourceDataset.skipped` with the reason, so the stages can report it instead of dropping it silently.

Splits (`SourceDataset.split_info`), first rule that applies:
    splits/val.txt or splits/train.txt   val = ids in val.txt; train = the others (only those in
                                         train.txt when it exists)
    train_benchmark.txt                  train = the ids it lists (exact strings, whitespace
                                         stripped, as the reference reads them); val = all others
    neither                              everything is train
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dualpm.camera import read_camera_txt
from dualpm.errors import DatasetError
from dualpm.store.manifest import SAMPLE_ID_RE, check_sample_id

SKIP_EVERY = 5000
SPLIT_FILE = "train_benchmark.txt"  # the published split: the training ids
# Per-sample files: folder -> name suffix after the id (`<id><suffix>`). The pose file defines a sample.
SAMPLE_FILES = {
    "poses": "_pose.npz",
    "cameras": "_camera.txt",
    "metadata": "_metadata.txt",
    "renders": "_rgb.png",
    "masks": "_mask.png",
    "features": "_feat.png",
}
_POSE_SUFFIX = SAMPLE_FILES["poses"]


def is_skipped_id(sample_id: str) -> bool:
    """True for ids the reference skips: integer multiples of `SKIP_EVERY` (including 0)."""
    return sample_id.isascii() and sample_id.isdigit() and int(sample_id) % SKIP_EVERY == 0


def _sort_key(sample_id: str) -> tuple[int, int | str]:
    if sample_id.isascii() and sample_id.isdigit():  # "\u00b2".isdigit() is True, int() refuses it
        return (0, int(sample_id))
    return (1, sample_id)


def id_problem(sample_id: str) -> str | None:
    """Why `sample_id` is not a valid sample id (naming the characters at fault), or None if it is.

    Follows `dualpm.store.manifest.check_sample_id`, whatever that rule is.
    """
    try:
        check_sample_id(sample_id, "file name")
        return None
    except DatasetError as err:
        rule = str(err).split(": ", 1)[-1]
    # A character is at fault when it is refused even after a plain leading letter.
    bad = sorted({c for c in sample_id if not SAMPLE_ID_RE.match("a" + c)})
    if bad:
        return f"{rule}: characters {', '.join(repr(c) for c in bad)} are not allowed"
    if sample_id and not SAMPLE_ID_RE.match(sample_id[0]):
        return f"{rule}: it may not start with {sample_id[0]!r}"
    return rule


@dataclass(frozen=True)
class SkippedFile:
    """A file in a layout folder that the scan did not take, and why."""

    path: str  # relative to the dataset root, e.g. "poses/bad id$_pose.npz"
    sample_id: str | None  # the id its name gives, None when the name has no known pattern
    kind: str  # one of SKIP_KINDS
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"file": self.path, "id": self.sample_id, "kind": self.kind, "reason": self.reason}


SKIP_KINDS = ("invalid-id", "multiple-of-5000", "no-pose", "unexpected-name", "hidden")


@dataclass(frozen=True)
class Splits:
    """The train/val partition of a dataset's ids and the rule that made it (JSON, for the manifest)."""

    train: list[str]
    val: list[str]
    rule: dict[str, Any]

    def as_dict(self) -> dict[str, list[str]]:
        return {"train": self.train, "val": self.val}


def describe_split_rule(rule: dict[str, Any]) -> str:
    """One line about a split rule recorded by `SourceDataset.split_info`."""
    name = rule.get("rule")
    if name == SPLIT_FILE:
        line = f"splits from {SPLIT_FILE}: train = its {rule['listed']} listed ids, val = all others"
        if rule.get("listed_without_sample"):
            line += (f"; {rule['listed_without_sample']} listed ids have no sample "
                     f"(e.g. {', '.join(repr(i) for i in rule['examples'])})")
        return line
    if name == "splits/":
        line = f"splits from {', '.join(rule['files'])}"
        return line + (f" ({SPLIT_FILE} ignored: splits/ takes precedence)" if rule.get("ignored") else "")
    return f"no split files (splits/val.txt, {SPLIT_FILE}): every sample is train"


@dataclass(frozen=True)
class Layout:
    """Paths of one dataset in the reference layout (no I/O)."""

    root: Path

    def mesh(self, model: str) -> Path:
        base = self.root / "shapes" / model / f"{model}_shape"
        glb = base.with_suffix(".glb")
        return glb if glb.exists() and not base.with_suffix(".gltf").exists() else base.with_suffix(".gltf")

    def file(self, folder: str, sample_id: str) -> Path:
        """`ROOT/<folder>/<id><suffix>` of one of `SAMPLE_FILES`."""
        return self.root / folder / f"{sample_id}{SAMPLE_FILES[folder]}"

    def pose(self, sample_id: str) -> Path:
        return self.file("poses", sample_id)

    def camera(self, sample_id: str) -> Path:
        return self.file("cameras", sample_id)

    def metadata(self, sample_id: str) -> Path:
        return self.file("metadata", sample_id)

    def rgb(self, sample_id: str) -> Path:
        return self.file("renders", sample_id)

    def mask(self, sample_id: str) -> Path:
        return self.file("masks", sample_id)

    def feature(self, sample_id: str) -> Path:
        return self.file("features", sample_id)

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


# libyaml's safe loader where PyYAML was built with it (the wheels are): the same documents, ~10x faster,
# at one metadata file per sample (0.08 ms each through the pure-Python loader, 0.01 through libyaml)
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_metadata(path: str | os.PathLike) -> SampleMetadata:
    """Read and validate a metadata YAML file; raises `DatasetError` naming the file."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_SAFE_LOADER)
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
        ids = (_id_of(e.name, _POSE_SUFFIX) for e in os.scandir(self.root / "poses") if e.is_file())
        taken = (i for i in ids if i is not None and id_problem(i) is None and not is_skipped_id(i))
        self.ids: list[str] = sorted(taken, key=_sort_key)

    def __len__(self) -> int:
        return len(self.ids)

    @functools.cached_property
    def skipped(self) -> list[SkippedFile]:
        """Every file of the layout folders (`SAMPLE_FILES`) that belongs to no sample, with the reason.

        Listed by folder, then name. Computed on first use (one listing per folder).
        """
        taken = set(self.ids)
        out = []
        for folder, suffix in SAMPLE_FILES.items():
            if not (self.root / folder).is_dir():
                continue
            for entry in sorted(os.scandir(self.root / folder), key=lambda e: e.name):
                sample_id = _id_of(entry.name, suffix) if entry.is_file() else None
                if sample_id in taken:
                    continue
                path = f"{folder}/{entry.name}"
                if entry.name.startswith("."):
                    kind, reason = "hidden", "hidden file (its name starts with '.')"
                elif sample_id is None:
                    what = "a folder; expected files named" if entry.is_dir() else "the name does not match"
                    kind, reason = "unexpected-name", f"{what} <id>{suffix}"
                elif (problem := id_problem(sample_id)) is not None:
                    kind, reason = "invalid-id", problem
                elif is_skipped_id(sample_id):
                    kind, reason = "multiple-of-5000", (
                        f"id is a multiple of {SKIP_EVERY}: skipped, as the published set's are corrupt")
                else:
                    kind, reason = "no-pose", f"no pose file poses/{sample_id}{_POSE_SUFFIX}"
                out.append(SkippedFile(path, sample_id, kind, reason))
        return out

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
        listed = _read_lines(path)
        bad = [i for i in listed if id_problem(i) is not None]
        if bad:
            raise DatasetError(f"{path}: invalid sample ids {bad[:5]}")
        return listed

    def split_info(self) -> Splits:
        """Partition of `ids` into 'train' and 'val', by the first rule that applies (module doc).

        Ids listed in a split file that have no sample are ignored (`splits/`) or counted in the
        rule (`train_benchmark.txt`, where the lines are compared as exact strings, as the reference
        does). Raises `DatasetError` when train_benchmark.txt lists no sample at all.
        """
        val_file, train_file = self.split_ids("val"), self.split_ids("train")
        benchmark = self.root / SPLIT_FILE
        if val_file is not None or train_file is not None:
            val = set(val_file or [])
            allowed = set(train_file) if train_file is not None else None
            found = (("val", val_file), ("train", train_file))
            files = [f"splits/{name}.txt" for name, ids in found if ids is not None]
            rule = {"rule": "splits/", "files": files, "ignored": SPLIT_FILE if benchmark.exists() else None}
            return Splits(
                train=[i for i in self.ids if i not in val and (allowed is None or i in allowed)],
                val=[i for i in self.ids if i in val],
                rule=rule,
            )
        if benchmark.exists():
            listed = _read_lines(benchmark)
            have = set(self.ids)
            missing = [i for i in listed if i not in have]
            if len(missing) == len(listed):
                example = f" (first: {listed[0]!r})" if listed else ""
                like = self.ids[0] if self.ids else "000001"
                raise DatasetError(
                    f"{benchmark}: lists {len(listed)} training ids, none of which is a sample of {self.root}"
                    f"{example}; it must hold sample ids such as {like!r}, one per line (or remove it to "
                    "train on every sample)"
                )
            train = set(listed)
            rule = {"rule": SPLIT_FILE, "file": SPLIT_FILE, "listed": len(train),
                    "listed_without_sample": len(set(missing)), "examples": sorted(set(missing))[:5]}
            return Splits([i for i in self.ids if i in train], [i for i in self.ids if i not in train], rule)
        return Splits(list(self.ids), [], {"rule": "all-train"})

    def splits(self) -> dict[str, list[str]]:
        """`split_info()` as {'train': ids, 'val': ids}."""
        return self.split_info().as_dict()


def _id_of(name: str, suffix: str) -> str | None:
    """The id of a file named `<id><suffix>` (possibly invalid or empty), None for other names."""
    return name[: -len(suffix)] if name.endswith(suffix) and not name.startswith(".") else None


def _read_lines(path: Path) -> list[str]:
    """Non-empty lines of an id list, whitespace stripped. Raises `DatasetError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the id list ({err})") from err
    return [line.strip() for line in text.splitlines() if line.strip()]
