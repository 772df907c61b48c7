"""What every feature extractor shares: the spec, the interface, image loading, fitting and extraction.

A `FeatureSpec` says how features are produced (extractor, model folders, sizes, timestep, weights,
output channels). It is recorded in the dataset manifest and in checkpoints (`to_dict`/`from_dict`
round-trip through JSON) and `require_match` refuses features produced another way.

Extraction has two halves:

* `extract_raw(images)`: the extractor's own features before the final PCA, on its feature grid.
  sd-dino applies its three per-block PCAs inside this step, so it needs the fitted basis.
* the `FeatureBasis` (pca.py): every PCA stage of the extractor (`extractor.stages`), fitted once on
  a sample of the dataset by `fit_basis` / `load_or_fit_basis` before the parallel run, stored with
  the dataset and used by every worker. `extract` runs both halves and returns `(B, dim, h, w)`.

Images enter as `(B, 3, H, W)` float32 in [0, 1] of any size; each model resizes them to its own
input size (a plain resize, never a crop or pad, so feature pixels stay aligned with the image).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dualpm.errors import ConfigError, DatasetError, describe_load_error
from dualpm.features.pca import FeatureBasis, PCABasis

EXTRACTORS = ("sd-dino", "dino", "rgb", "precomputed")
SPEC_VERSION = 1
DINO_PATCH = 14  # every DINOv2 model uses 14-pixel patches
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BASIS_FORMAT = "dualpm-feature-basis"
FINAL = "final"  # name of the last PCA stage (raw features -> `dim` channels)

# Fields each extractor uses besides `extractor`, `dim` and `grid`; any other field must keep its default.
_FIELDS_OF = {
    "sd-dino": (
        "sd_path", "dino_path", "sd_image_size", "dino_image_size", "timestep", "prompt", "noise_seed",
        "sd_pca_dims", "sd_weight", "dino_weight", "cuda_bf16",
    ),
    "dino": ("dino_path", "dino_image_size", "cuda_bf16"),
    "rgb": ("rgb_mask_channel",),
    "precomputed": (),
}
# Fields that say where or how fast features were computed, not what they are.
_EXECUTION_FIELDS = ("sd_path", "dino_path", "cuda_bf16")


@dataclass(frozen=True)
class FeatureSpec:
    """How features are produced; fully describes a feature column.

    extractor:        "sd-dino" (Stable Diffusion decoder + DINOv2, as in sd-dino/ODISE-DINO),
                      "dino" (DINOv2 only), "rgb" (resized pixels: demos and machines without
                      weights), or "precomputed" (the published dataset's packed `_feat.png` files).
    dim:              output channels (None: 64; rgb: 3, or 4 with the mask channel).
    grid:             side of the square output feature grid (None: derived; dino and sd-dino give
                      dino_image_size / 14; rgb defaults to 64; precomputed must state it).
    sd_path:          local diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    dino_path:        local transformers Dinov2Model folder.
    sd_image_size:    side the image is resized to for Stable Diffusion (pixels).
    dino_image_size:  side the image is resized to for DINOv2 (pixels, a multiple of 14).
    timestep:         diffusion timestep the image latent is noised to (0..999).
    prompt:           text prompt of the UNet (empty in sd-dino's default setting).
    noise_seed:       seed of the one noise tensor shared by all images (same image -> same features).
    sd_pca_dims:      PCA components kept of the three decoder blocks (up_blocks 0, 1, 2).
    sd_weight, dino_weight: factors applied to the L2-normalised SD and DINO parts before concatenation.
    rgb_mask_channel: rgb only: append the object mask as a 4th channel.
    cuda_bf16:        use bf16 autocast on CUDA (CPU always computes in float32).
    """

    extractor: str
    dim: int | None = None
    grid: int | None = None
    sd_path: str | None = None
    dino_path: str | None = None
    sd_image_size: int = 960
    dino_image_size: int = 840
    timestep: int = 100
    prompt: str = ""
    noise_seed: int = 42
    sd_pca_dims: tuple[int, int, int] = (256, 256, 256)
    sd_weight: float = 1.0
    dino_weight: float = 1.0
    rgb_mask_channel: bool = False
    cuda_bf16: bool = True

    def __post_init__(self) -> None:
        kind = self.extractor
        if kind not in EXTRACTORS:
            raise ConfigError(f"feature extractor {kind!r} is unknown; choose one of {', '.join(EXTRACTORS)}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in _FIELDS_OF["sd-dino"] + ("rgb_mask_channel",):
            if name not in _FIELDS_OF[kind] and getattr(self, name) != defaults[name]:
                raise ConfigError(f"feature option {name} does not apply to extractor {kind!r}")
        _check_type("sd_path", self.sd_path, (str, type(None)))
        _check_type("dino_path", self.dino_path, (str, type(None)))
        _check_type("prompt", self.prompt, str)
        _check_type("rgb_mask_channel", self.rgb_mask_channel, bool)
        _check_type("cuda_bf16", self.cuda_bf16, bool)
        for name in ("sd_image_size", "dino_image_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("noise_seed", self.noise_seed, 0)
        _check_int("timestep", self.timestep, 0)
        dims = tuple(self.sd_pca_dims) if isinstance(self.sd_pca_dims, (list, tuple)) else None
        if dims is None or len(dims) != 3:
            raise ConfigError(f"feature option sd_pca_dims must be 3 integers, got {self.sd_pca_dims!r}")
        for d in dims:
            _check_int("sd_pca_dims", d, 1)
        object.__setattr__(self, "sd_pca_dims", dims)
        for name in ("sd_weight", "dino_weight"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not np.isfinite(value) or value < 0:
                raise ConfigError(f"feature option {name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if kind == "sd-dino" and self.sd_weight == 0 and self.dino_weight == 0:
            raise ConfigError("feature options sd_weight and dino_weight cannot both be 0")
        if kind in ("sd-dino", "dino"):
            if kind == "sd-dino" and not self.sd_path:
                raise ConfigError(
                    "extractor 'sd-dino' needs sd_path: a local diffusers Stable Diffusion folder"
                )
            if not self.dino_path:
                raise ConfigError(f"extractor {kind!r} needs dino_path: a local transformers DINOv2 folder")
            if self.dino_image_size % DINO_PATCH:
                raise ConfigError(
                    f"feature option dino_image_size must be a multiple of {DINO_PATCH}, "
                    f"got {self.dino_image_size}"
                )
            self._settle("grid", self.dino_image_size // DINO_PATCH, derived=True)
            self._settle("dim", 64, derived=False)
        elif kind == "rgb":
            self._settle("grid", 64, derived=False)
            self._settle("dim", 3 + int(self.rgb_mask_channel), derived=True)
        else:  # precomputed
            if self.grid is None:
                raise ConfigError("extractor 'precomputed' needs grid: the side of the packed feature tiles")
            self._settle("dim", 64, derived=False)
        _check_int("grid", self.grid, 1)
        _check_int("dim", self.dim, 1)

    def _settle(self, name: str, value: int, derived: bool) -> None:
        # Fill a None field; a derived field may be stated only with its derived value.
        current = getattr(self, name)
        if current is None:
            object.__setattr__(self, name, value)
        elif derived and current != value:
            raise ConfigError(
                f"feature option {name}={current!r} contradicts the other options (they give {value})"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields this extractor uses (plus `spec_version`)."""
        out: dict[str, Any] = {
            "spec_version": SPEC_VERSION, "extractor": self.extractor, "dim": self.dim, "grid": self.grid
        }
        for name in _FIELDS_OF[self.extractor]:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        """Inverse of `to_dict`; raises `ConfigError` for unknown keys, versions or bad values."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"feature spec must be a mapping, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("spec_version", SPEC_VERSION)
        if version != SPEC_VERSION:
            raise ConfigError(
                f"feature spec version {version!r} is not supported (this code reads {SPEC_VERSION})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"feature spec has unknown options: {', '.join(unknown)}")
        if "extractor" not in data:
            raise ConfigError("feature spec is missing 'extractor'")
        return cls(**data)

    def identity(self) -> dict[str, Any]:
        """`to_dict` without the fields that only say where/how fast (model paths, bf16 switch)."""
        return {k: v for k, v in self.to_dict().items() if k not in _EXECUTION_FIELDS}

    def require_match(self, other: FeatureSpec, context: str) -> None:
        """Raise `ConfigError` unless `other` produces the same features as this spec.

        Model folders may differ (machines mount them in different places); the weights themselves
        are compared through `model_id` fingerprints in the basis, see `check_basis`.
        """
        mine, theirs = self.identity(), other.identity()
        keys = sorted(set(mine) | set(theirs))
        diffs = [f"{k}: {mine.get(k)!r} vs {theirs.get(k)!r}" for k in keys if mine.get(k) != theirs.get(k)]
        if diffs:
            raise ConfigError(f"{context}: features were produced differently ({'; '.join(diffs)})")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"feature option {name} must be an integer >= {minimum}, got {value!r}")


def _check_type(name: str, value: Any, types: type | tuple[type, ...]) -> None:
    if not isinstance(value, types):
        raise ConfigError(f"feature option {name} has the wrong type ({type(value).__name__}): {value!r}")


class FeatureExtractor(Protocol):
    """An image feature extractor (sd-dino, dino, rgb); built by `registry.build_extractor`.

    stages: the PCA stages of its basis, in fitting order, name -> (input channels, kept channels);
            "final" (raw features -> `spec.dim`) is last when present. rgb has none.
    """

    spec: FeatureSpec
    device: torch.device
    model_id: str  # fingerprint of the weights it loaded ("" when it has none)
    raw_channels: int  # channels of `extract_raw`
    input_size: int  # largest model input side: a good size to batch images at
    stages: dict[str, tuple[int, int]]

    @property
    def grid(self) -> tuple[int, int]: ...

    def inner_features(self, images: Tensor) -> dict[str, Tensor]:
        """Inputs of the inner PCA stages (all stages but "final"): name -> (B, C, h_s, w_s) float32."""
        ...

    def extract_raw(
        self, images: Tensor, masks: Tensor | None = None, basis: FeatureBasis | None = None
    ) -> Tensor:
        """Features before the final PCA: (B, raw_channels, *grid) float32 on `device`."""
        ...


def bind_spec(extractor: object, spec: FeatureSpec, device: torch.device | str, kind: str) -> None:
    """Set an extractor's `spec` and `device` after checking that `spec` asks for `kind` features."""
    if spec.extractor != kind:
        raise ConfigError(f"{type(extractor).__name__} cannot produce {spec.extractor!r} features")
    extractor.spec = spec
    extractor.device = torch.device(device)


# ---------------------------------------------------------------------------------------------
# Image batches


def imagenet_normalize(images: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> ImageNet mean/std normalised, same shape/device."""
    mean = images.new_tensor(IMAGENET_MEAN)[None, :, None, None]
    std = images.new_tensor(IMAGENET_STD)[None, :, None, None]
    return (images - mean) / std


def check_images(images: Tensor, masks: Tensor | None) -> None:
    """Shape checks of the tensors handed to an extractor (programming errors, hence ValueError)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if masks is not None and (masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[0] != images.shape[0]):
        shapes = f"images {tuple(images.shape)}, masks {tuple(masks.shape)}"
        raise ValueError(f"masks must be (B, 1, H, W) with the images' batch size; got {shapes}")


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; plain float32 elsewhere."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Model folders


def folder_fingerprint(folders: Iterable[Path]) -> str:
    """Cheap identity of model folders: names, sizes, and first/last MiB of every file.

    Reading whole multi-GB weight files would cost minutes; different weights differ within the
    first and last MiB of their files in practice. Hidden files and caches are ignored.
    """
    digest = hashlib.sha256()
    chunk = 1 << 20
    for folder in folders:
        folder = Path(folder)
        files = sorted(
            p for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
        for file in files:
            size = file.stat().st_size
            digest.update(f"{folder.name}/{file.relative_to(folder).as_posix()}:{size}\n".encode())
            with open(file, "rb") as fh:
                digest.update(fh.read(chunk))
                if size > 2 * chunk:
                    fh.seek(size - chunk)
                    digest.update(fh.read(chunk))
    return "sha256:" + digest.hexdigest()


def require_folder(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is a folder, else `ConfigError` naming it and what it should hold."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"{folder}: {what} folder does not exist (weights are only read from local folders)"
        )
    return folder


def read_json_config(path: Path, what: str) -> dict[str, Any]:
    """A model's config.json as a dict; `ConfigError` naming the file when missing or malformed."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"{path.parent}: not a {what} folder (no {path.name})") from err
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read {what} config ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} config must be a JSON object")
    return data


# Weight files torch.load reads (a pickle inside); from_pretrained prefers .safetensors (no code in it).
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weights_error(folder: Path, what: str, err: Exception) -> ConfigError:
    """The `ConfigError` for a `from_pretrained` of `what` from `folder` that raised `err`.

    A pickle weights file that `torch.load(weights_only=True)` refused (it would build other objects
    than tensors, e.g. run code) is named, with what was refused: transformers raises torch's error as
    it is, naming no file, and diffusers wraps it in an OSError naming the file but not why. Any other
    error (torch's unpickler raises IndexError, KeyError, ... on bytes that are no torch file) is
    given with its type.
    """
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, pickle.UnpicklingError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return ConfigError(f"{folder}: cannot load {what} weights ({describe_load_error(err)})")
    files = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_WEIGHTS)
    where = files[0] if len(files) == 1 else f"{folder} ({', '.join(p.name for p in files) or 'no pickle file'})"
    return ConfigError(
        f"{where}: {what} weights: {describe_load_error(cause)}; use the model's .safetensors files"
    )


def loading_errors(info: Mapping[str, Any]) -> list[str]:
    """Problems in a from_pretrained(output_loading_info=True) report (missing/mismatched weights)."""
    problems = []
    for key in ("missing_keys", "mismatched_keys", "error_msgs"):
        items = sorted(str(i) for i in info.get(key) or [])
        if items:
            more = " ..." if len(items) > 5 else ""
            problems.append(f"{key.replace('_', ' ')}: {', '.join(items[:5])}{more}")
    return problems


# ---------------------------------------------------------------------------------------------
# Basis fitting and extraction

Sample = Callable[[], Iterable[tuple[Tensor, Tensor | None]]]


def _rows(features: Tensor, masks: Tensor | None, per_image: int, gen: torch.Generator) -> Tensor:
    """Up to `per_image` random feature vectors per image, inside the object mask when one is given.

    features: (B, C, h, w); masks: (B, 1, H, W) in [0, 1] or None. Returns (N, C) float32 on the CPU.
    Pixels inside the mask are preferred because the network only sees features there (the
    reference multiplies its input by the mask); images with an empty mask use all pixels.
    """
    b, c, h, w = features.shape
    flat = features.detach().float().flatten(2).transpose(1, 2).cpu()  # (B,C,h,w) -> (B,h*w,C)
    inside = None
    if masks is not None:
        inside = (F.interpolate(masks.float(), size=(h, w), mode="area") > 0.5).flatten(1).cpu()  # (B, h*w)
    out = []
    for i in range(b):
        candidates = torch.arange(h * w)
        if inside is not None and bool(inside[i].any()):
            candidates = candidates[inside[i]]
        pick = candidates[torch.randperm(len(candidates), generator=gen)[:per_image]]
        out.append(flat[i, pick])
    return torch.cat(out)


def fit_basis(
    extractor: FeatureExtractor, sample: Sample, *, seed: int = 0, rows_per_image: int = 1024
) -> FeatureBasis:
    """Fit every PCA stage of `extractor` on a sample of the dataset.

    Args:
        extractor: from `build_extractor`.
        sample: called once per stage group, returns an iterable of (images, masks) batches:
            images (B, 3, H, W) float32 in [0, 1]; masks (B, 1, H, W) in [0, 1] or None.
            sd-dino iterates twice (its block PCAs must exist before the final PCA's inputs do).
        seed: seeds pixel sampling and `torch.pca_lowrank`, so a refit gives the same basis.
        rows_per_image: feature vectors taken per image and stage (bounds memory).
    Returns:
        a `FeatureBasis` whose metadata records the spec, the weights' fingerprint and the fit settings.
    """
    if rows_per_image < 1:
        raise ConfigError(f"rows_per_image must be >= 1, got {rows_per_image}")
    stages: dict[str, PCABasis] = {}
    inner = [name for name in extractor.stages if name != FINAL]
    groups = ([inner] if inner else []) + ([[FINAL]] if FINAL in extractor.stages else [])
    for group in groups:
        gen = torch.Generator().manual_seed(seed)
        rows: dict[str, list[Tensor]] = {name: [] for name in group}
        partial = FeatureBasis(stages=dict(stages), meta={})
        for images, masks in sample():
            check_images(images, masks)
            if group == [FINAL]:
                feats = {FINAL: extractor.extract_raw(images, masks, partial)}
            else:
                feats = extractor.inner_features(images)
            for name in group:
                rows[name].append(_rows(feats[name], masks, rows_per_image, gen))
        for name in group:
            if not rows[name]:
                raise DatasetError("the sample for fitting the feature basis is empty")
            stages[name] = PCABasis.fit(torch.cat(rows[name]), extractor.stages[name][1], seed=seed)
    meta = {
        "format": BASIS_FORMAT,
        "spec": json.dumps(extractor.spec.to_dict(), sort_keys=True),
        "model_id": extractor.model_id,
        "seed": str(seed),
        "rows_per_image": str(rows_per_image),
    }
    return FeatureBasis(stages=stages, meta=meta)


def check_basis(basis: FeatureBasis, extractor: FeatureExtractor, source: str = "feature basis") -> None:
    """Raise `ConfigError` unless `basis` was fitted for this extractor (spec, weights, stage shapes)."""
    if basis.meta.get("format") != BASIS_FORMAT or "spec" not in basis.meta:
        raise ConfigError(f"{source}: not a DualPM feature basis (no '{BASIS_FORMAT}' metadata)")
    try:
        fitted = FeatureSpec.from_dict(json.loads(basis.meta["spec"]))
    except ValueError as err:
        raise ConfigError(f"{source}: unreadable spec in metadata ({err})") from err
    fitted.require_match(extractor.spec, source)
    if basis.meta.get("model_id", "") != extractor.model_id:
        raise ConfigError(
            f"{source}: fitted with other model weights ({basis.meta.get('model_id')}) than the ones loaded "
            f"({extractor.model_id}); refit the basis or point the spec at the original weights"
        )
    shapes = {name: tuple(b.components.shape) for name, b in basis.stages.items()}
    if shapes != dict(extractor.stages):
        raise ConfigError(
            f"{source}: PCA stages {shapes} do not fit this extractor, which needs {extractor.stages}"
        )


def load_or_fit_basis(
    path: str | os.PathLike,
    extractor: FeatureExtractor,
    sample: Sample,
    *,
    seed: int = 0,
    rows_per_image: int = 1024,
) -> FeatureBasis:
    """The basis stored at `path` (checked against `extractor`), or a new one fitted and saved there.

    A rerun reuses the stored basis, so every shard of a dataset, in every run, uses the same one.
    A stored basis for different features raises `ConfigError` instead of being overwritten.
    """
    path = Path(path)
    if path.exists():
        basis = FeatureBasis.load(path)
        check_basis(basis, extractor, source=str(path))
        return basis
    basis = fit_basis(extractor, sample, seed=seed, rows_per_image=rows_per_image)
    basis.save(path)
    return basis


def extract(
    extractor: FeatureExtractor, basis: FeatureBasis, images: Tensor, masks: Tensor | None = None
) -> Tensor:
    """Features of a batch of images, with every PCA stage of `basis` applied.

    Args:
        extractor: from `build_extractor`.
        basis: from `fit_basis` / `load_or_fit_basis` / `FeatureBasis.load` for this extractor.
        images: (B, 3, H, W) float32 RGB in [0, 1], any size and device.
        masks: (B, 1, H, W) float in [0, 1] or None; only rgb with `rgb_mask_channel` uses it.
    Returns:
        (B, spec.dim, *extractor.grid) float32 on `extractor.device`.
    """
    check_basis(basis, extractor)
    check_images(images, masks)
    raw = extractor.extract_raw(images, masks, basis)
    # Outside inference mode these ops return ordinary tensors, which callers may modify in place.
    return basis.stages[FINAL].project(raw) if FINAL in basis.stages else raw.clone()
