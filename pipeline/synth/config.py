"""What `dualpm-prep synth` generates: its config (`SynthConfig`, recorded in synth.json), the plan's types
(models, samples, splits), the summary, and the seeded random streams every draw comes from.

Determinism: every random draw comes from `numpy.random.default_rng([seed, PURPOSE, index])` (`rng`) with the
model index or the sample's integer id, never from shared state, so the bytes written do not depend on the
number of workers, the chunking or the order tasks finish in.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dualpm.errors import ConfigError, GltfError
from dualpm.render import BACKENDS
from pipeline.synth.cameras import CameraRanges
from pipeline.synth.lighting import list_images
from pipeline.synth.rig_assets import APPEARANCES, POSE_SOURCES

SYNTH_VERSION = 2  # bump when the same config would produce different data (2: float64 poses, 1-bit masks)
CONFIG_NAME = "synth.json"
FAILURES_NAME = "synth_failures.jsonl"
SUBFOLDERS = ("shapes", "poses", "cameras", "metadata", "renders", "masks", "splits")
FORWARD = (0.0, 0.0, 1.0)  # procedural animals face +Z (Y up, +X their left)
# `--mesh-scale auto` scales a user rig so its rest mesh's longest side is this long (scene units): the
# median of the procedural animals' (2.36 over seeds 0-7), whose framing the cameras are tuned for.
AUTO_MESH_SIZE = 2.4

# Purpose codes of the random streams: rng([seed, PURPOSE, model index or sample number]).
SHAPE, APPEARANCE, POSE, CAMERA, LIGHT, SPLIT, HELDOUT, CLIP, LOOK, SCENE, SEQUENCE = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11


@dataclass(frozen=True)
class SynthConfig:
    """What to generate.

    `record()` holds the fields that determine the bytes written; `backend` (the renderers agree but
    for rare silhouette pixels) and `chunk_size` do not, so a rerun may change them.
    """

    num_samples: int
    num_models: int = 4
    seed: int = 0
    image_size: int = 256
    faces: int = 20000  # triangles per procedural animal (user meshes are kept as they are)
    val_fraction: float = 0.1
    heldout_models: int = 0
    meshes: tuple[Path, ...] = ()  # user rigged glTF/GLB files instead of procedural animals
    mesh_scale: float | str = "auto"  # factor applied to every user rig, or "auto" (AUTO_MESH_SIZE)
    yaw: bool = True  # whole-body yaw about +Y at the root
    backend: str = "auto"
    chunk_size: int = 16  # samples per Ray task (all of one model)
    cameras: CameraRanges = field(default_factory=CameraRanges)
    sequence: int = 0  # frames per sequence (ordered smooth motion, pipeline/synth/sequence.py); 0: none
    appearance: str = "auto"  # APPEARANCES: auto = the rig's material when it has one, else procedural
    poses: str = "auto"  # POSE_SOURCES: auto = mixed when the rig has animation clips, else random
    hdri: Path | None = None  # folder of equirectangular images: light and background
    backgrounds: Path | None = None  # folder of photos behind the animal
    clip_jitter: float = 0.0  # degrees: random extra rotation of every joint of a clip pose (at most)

    def __post_init__(self):
        checks = [
            (self.num_samples >= 1, "num_samples must be at least 1"),
            (self.num_models >= 1, "num_models must be at least 1"),
            (self.image_size >= 8, "image_size must be at least 8 pixels"),
            (self.faces >= 500, "faces must be at least 500"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (0 <= self.heldout_models < self.num_models, "heldout_models must be below the number of models"),
            (self.chunk_size >= 1, "chunk_size must be at least 1"),
            (self.sequence == 0 or self.sequence >= 2, "sequence must be 0 (none) or at least 2 frames"),
            (self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}"),
            (not self.meshes or len(self.meshes) == self.num_models, "num_models must equal the mesh count"),
            (self.mesh_scale == "auto" or isinstance(self.mesh_scale, float) and 0 < self.mesh_scale < np.inf,
             "mesh_scale must be 'auto' or a positive number"),
            (self.appearance in APPEARANCES, f"appearance must be one of {', '.join(APPEARANCES)}"),
            (self.poses in POSE_SOURCES, f"poses must be one of {', '.join(POSE_SOURCES)}"),
            (0.0 <= self.clip_jitter <= 180.0, "clip_jitter must be in [0, 180] degrees"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"synth: {message}")

    def record(self) -> dict:
        """The content-determining settings, as stored in synth.json (JSON types)."""
        return {
            "num_samples": self.num_samples, "num_models": self.num_models, "seed": self.seed,
            "image_size": self.image_size, "faces": self.faces, "val_fraction": self.val_fraction,
            "heldout_models": self.heldout_models, "yaw": self.yaw,
            "meshes": [{"file": p.name, "sha256": _sha256(p)} for p in self.meshes],
            "mesh_scale": self.mesh_scale,
            "cameras": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.cameras).items()},
        } | ({"sequence": self.sequence} if self.sequence else {}) | self._look_record()

    def _look_record(self) -> dict:
        # Only where the look can differ from the procedural coat, so procedural datasets keep their record.
        if not (self.meshes or self.hdri or self.backgrounds or self.appearance != "auto" or self.poses != "auto"
                or self.clip_jitter):
            return {}
        folders = {key: None if folder is None else [p.name for p in list_images(folder, f"--{key}")]
                   for key, folder in (("hdri", self.hdri), ("backgrounds", self.backgrounds))}
        return {"appearance": self.appearance, "poses": self.poses, "clip_jitter": self.clip_jitter} | folders

    @property
    def scene_lights(self) -> bool:
        """The asset renderer's lights and backgrounds apply to every sample (an HDRI or photos given)."""
        return self.hdri is not None or self.backgrounds is not None


@dataclass(frozen=True)
class ModelSpec:
    index: int
    name: str
    source: Path | None  # user mesh file; None for a procedural animal
    scale: float = 1.0  # factor applied to the user mesh (resolved `mesh_scale`)


@dataclass(frozen=True)
class SampleSpec:
    id: str  # zero-padded number, e.g. "000123"
    number: int
    model: int
    sequence: int = -1  # with --sequence: the sequence's index and this sample's frame in it
    frame: int = -1


@dataclass(frozen=True)
class Plan:
    models: tuple[ModelSpec, ...]
    samples: tuple[SampleSpec, ...]
    val_ids: tuple[str, ...]
    val_models: tuple[str, ...]


@dataclass(frozen=True)
class SampleResult:
    id: str
    status: str  # "written", "skipped" or "failed"
    error: str | None = None


@dataclass(frozen=True)
class SynthSummary:
    written: int
    skipped: int
    failed: int
    models_written: int
    models_skipped: int
    seconds: float  # the whole run, Ray start-up and models included
    sample_seconds: float  # the sample phase alone

    @property
    def rate(self) -> float:
        """Samples written per second of the sample phase."""
        return self.written / self.sample_seconds if self.sample_seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"synth: {self.written} samples written, {self.skipped} skipped (already done), "
            f"{self.failed} failed; {self.models_written} models built, {self.models_skipped} kept; "
            f"{self.seconds:.1f} s in all, {self.rate:.1f} samples/s while sampling"
        )


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        raise GltfError(f"{path}: cannot read mesh file ({err})") from err


def rng(seed: int, purpose: int, index: int) -> np.random.Generator:
    """The random stream of one purpose and model index / sample number."""
    return np.random.default_rng([seed, purpose, index])


def sequence_rng(seed: int, purpose: int, sequence: int) -> np.random.Generator:
    """The random stream of one purpose of a sequence (`--sequence`)."""
    return np.random.default_rng([seed, SEQUENCE, purpose, sequence])


def sample_number(k: int) -> int:
    """Integer id of the k-th sample (0-based): 1, 2, ..., skipping multiples of 5000 (4999 per block)."""
    return k + 1 + k // 4999


def model_names(config: SynthConfig) -> list[str]:
    """`quadruped_000`... or names from the user mesh files (plain, unique folder names)."""
    if not config.meshes:
        return [f"quadruped_{i:03d}" for i in range(config.num_models)]
    names: list[str] = []
    for path in config.meshes:
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem).strip("_-") or "mesh"
        name, k = base, 1
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names
