"""dino: DINOv2 patch tokens (transformers `Dinov2Model`, ViT-B/14 in the reference) from a local folder.

As in sd-dino, the descriptor of a 14-pixel patch is its token at the output of the last transformer
layer, before the final LayerNorm (sd-dino's "token" facet); the CLS token (and register tokens of
`Dinov2WithRegistersModel` folders) are dropped. Images are resized to `dino_image_size` (a multiple
of 14) and normalised with the ImageNet mean/std, giving a `dino_image_size / 14` square grid.
The dino extractor L2-normalises the tokens and reduces them to `dim` channels with one PCA.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dualpm.errors import ConfigError
from dualpm.features.base import (
    bind_spec,
    DINO_PATCH,
    FINAL,
    FeatureSpec,
    autocast,
    check_images,
    folder_fingerprint,
    imagenet_normalize,
    loading_errors,
    read_json_config,
    require_folder,
    weights_error,
)
from dualpm.features.pca import FeatureBasis
from dualpm.fileio import atomic_directory
from dualpm.images import resize_images

_MODEL_TYPES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}


class Dinov2Backbone:
    """A DINOv2 model giving last-layer patch tokens on a square grid.

    Construct with `check` (configs only, cheap) then `load` (weights), so that callers combining
    several models can validate all of them before loading any.
    """

    def __init__(self, path: str | os.PathLike, image_size: int):
        self.path = require_folder(path, "DINOv2 model")
        config = read_json_config(self.path / "config.json", "transformers DINOv2 model")
        model_type = config.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise ConfigError(
                f"{self.path}: holds a {model_type!r} model, expected a DINOv2 model (model_type 'dinov2')"
            )
        self.class_name = _MODEL_TYPES[model_type]
        patch = config.get("patch_size", DINO_PATCH)
        if patch != DINO_PATCH:
            raise ConfigError(f"{self.path}: DINOv2 patch size is {patch}, expected {DINO_PATCH}")
        if image_size % DINO_PATCH:
            raise ConfigError(f"DINOv2 input size must be a multiple of {DINO_PATCH}, got {image_size}")
        self.image_size = image_size
        self.hidden_size = int(config.get("hidden_size", 768))
        registers = model_type == "dinov2_with_registers"
        self.num_registers = int(config.get("num_register_tokens", 0)) if registers else 0
        self.grid = image_size // DINO_PATCH
        self.model = None

    def load(self, device: torch.device) -> Dinov2Backbone:
        import transformers

        cls = getattr(transformers, self.class_name)
        try:
            model, info = cls.from_pretrained(
                self.path, local_files_only=True, dtype=torch.float32, output_loading_info=True
            )
        except Exception as err:  # torch.load of a bad file raises about anything: see weights_error
            raise weights_error(self.path, self.class_name, err) from err
        problems = loading_errors(info)
        if problems:
            raise ConfigError(
                f"{self.path}: weights do not match the {self.class_name} config ({'; '.join(problems)})"
            )
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        return self

    def fingerprint(self) -> str:
        return folder_fingerprint([self.path])

    def tokens(self, images: Tensor, bf16: bool) -> Tensor:
        """Last-layer patch tokens.

        Args:
            images: (B, 3, H, W) float32 RGB in [0, 1], any size and device.
            bf16: bf16 autocast (CUDA only).
        Returns:
            (B, hidden_size, grid, grid) float32 on the model's device.
        """
        x = imagenet_normalize(resize_images(images.to(self.device, torch.float32), self.image_size))
        with autocast(self.device, bf16):
            hidden = self.model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        patches = hidden[:, 1 + self.num_registers :].float()  # drop CLS and registers
        b, n, c = patches.shape
        if n != self.grid * self.grid:
            raise RuntimeError(f"DINOv2 returned {n} patch tokens for a {self.grid}x{self.grid} grid")
        return patches.transpose(1, 2).reshape(b, c, self.grid, self.grid)  # (B,N,C) -> (B,C,g,g)


class DinoExtractor:
    """DINOv2 only: L2-normalised last-layer patch tokens, PCA-reduced to `spec.dim`.

    See `FeatureExtractor` for the interface.
    """

    def __init__(self, spec: FeatureSpec, device: torch.device):
        bind_spec(self, spec, device, "dino")
        backbone = Dinov2Backbone(spec.dino_path, spec.dino_image_size)
        if spec.dim > backbone.hidden_size:
            raise ConfigError(
                f"feature dim {spec.dim} exceeds the {backbone.hidden_size} channels of {backbone.path}"
            )
        self.backbone = backbone.load(self.device)
        self.model_id = backbone.fingerprint()
        self.raw_channels = backbone.hidden_size
        self.input_size = spec.dino_image_size
        self.stages = {FINAL: (backbone.hidden_size, spec.dim)}

    @property
    def grid(self) -> tuple[int, int]:
        return (self.backbone.grid, self.backbone.grid)

    def inner_features(self, images: Tensor) -> dict[str, Tensor]:
        return {}

    @torch.inference_mode()
    def extract_raw(
        self, images: Tensor, masks: Tensor | None = None, basis: FeatureBasis | None = None
    ) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, hidden_size, g, g) float32, unit L2 norm per pixel."""
        check_images(images, masks)
        return F.normalize(self.backbone.tokens(images, self.spec.cuda_bf16), dim=1)


def write_random_dinov2(folder: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Save a randomly initialised `Dinov2Model` in the transformers layout (tests, benchmarks).

    size: "tiny" (hidden 32, 2 layers) or "vitb14" (the ViT-B/14 configuration of the reference).
    The folder appears atomically and must not exist yet.
    """
    from transformers import Dinov2Config, Dinov2Model

    configs = {
        "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=56),
        "vitb14": dict(
            hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, image_size=518
        ),
    }
    if size not in configs:
        raise ConfigError(f"unknown random DINOv2 size {size!r}; choose one of {', '.join(configs)}")
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(Dinov2Config(patch_size=DINO_PATCH, **configs[size]))
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
    return folder
