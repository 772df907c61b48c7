"""sd-dino (ODISE-DINO): Stable Diffusion decoder features fused with DINOv2 patch tokens.

What is computed, following sd-dino (Zhang et al., "A Tale of Two Features", its defaults):

1. The image is resized to `sd_image_size` (960), scaled to [-1, 1] and encoded by the VAE; the
   latent is the posterior mean times the VAE scaling factor (deterministic, as in ODISE).
2. The latent is noised to `timestep` (100) with the DDPM schedule of the folder's scheduler config
   (`scheduler/`; without one, SD's scaled-linear betas 0.00085..0.012 over 1000 steps). The noise is
   one seeded tensor (`noise_seed`) shared by every image, so the same image gives the same features.
3. The UNet runs once with the embedding of `prompt` (empty by default) from the folder's CLIP text
   encoder and tokenizer (`text_encoder/`, `tokenizer/`, padded to the tokenizer's max length, as the
   diffusers pipelines do). ODISE's implicit captioner (a CLIP image encoder with learned projection
   weights) is not implemented: those trained weights are not available, and sd-dino's default
   setting uses the empty prompt too.
4. Three decoder features are captured with forward hooks. sd-dino (ODISE `LdmExtractor`,
   `decoder_only`, output blocks 2, 5, 8) takes the decoder state entering the last layer of each of the
   three lowest-resolution decoder levels, before its skip concatenation. In diffusers terms that is
   the output of the second-to-last layer (resnet, then its cross-attention when the block has one)
   of `up_blocks[0]`, `[1]` and `[2]`: stages `sd_up0` (1/64 of the image, 1280 channels in SD 1.5),
   `sd_up1` (1/32, 1280) and `sd_up2` (1/16, 640). The UNet is stopped right after the third one.
5. Each block is reduced by its own PCA (`sd_pca_dims`, 256 each), resized bilinearly to the DINO grid
   and concatenated finest first (up2, up1, up0), as sd-dino does.
6. DINOv2 last-layer patch tokens at `dino_image_size` (840 -> a 60 x 60 grid, the same grid as
   SD's 960 / 16).
7. The SD part and the DINO part are L2-normalised per pixel separately, multiplied by
   `sd_weight`/`dino_weight` and concatenated; the final PCA of the basis reduces them to `dim`.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dualpm.errors import ConfigError
from dualpm.features.base import (
    bind_spec,
    FINAL,
    FeatureSpec,
    autocast,
    check_images,
    folder_fingerprint,
    loading_errors,
    read_json_config,
    require_folder,
    weights_error,
)
from dualpm.features.dino import Dinov2Backbone
from dualpm.features.pca import FeatureBasis
from dualpm.images import resize_images

SD_STAGES = ("sd_up0", "sd_up1", "sd_up2")
_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "model.safetensors",
    "pytorch_model.bin",
)
# Stable Diffusion's training noise schedule (the default when a folder has no scheduler/).
_SD_SCHEDULE = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)


class _Stop(Exception):
    """Raised by the last feature hook: the rest of the UNet is not needed."""


def _init_default(cls: type, key: str) -> Any:
    # diffusers writes every config key, but older folders may omit ones left at the class default.
    return inspect.signature(cls.__init__).parameters[key].default


def _diffusers_config(folder: Path, class_name: str) -> dict[str, Any]:
    config = read_json_config(folder / "config.json", f"diffusers {class_name}")
    found = config.get("_class_name")
    if found != class_name:
        raise ConfigError(f"{folder}: holds a {found!r} model, expected a diffusers {class_name}")
    return config


def _variant(folder: Path) -> str | None:
    # Some published SD folders only ship half-precision weight files (`*.fp16.safetensors`).
    if any((folder / name).exists() for name in _WEIGHT_NAMES):
        return None
    return "fp16" if any(folder.glob("*.fp16.*")) else None


class SdDinoExtractor:
    """Stable Diffusion decoder features + DINOv2 tokens; see the module docstring and `FeatureExtractor`."""

    def __init__(self, spec: FeatureSpec, device: torch.device):
        from diffusers import AutoencoderKL, UNet2DConditionModel

        bind_spec(self, spec, device, "sd-dino")
        root = require_folder(
            spec.sd_path, "Stable Diffusion (diffusers layout: unet/, vae/, text_encoder/, tokenizer/)"
        )
        self.root = root

        # --- Every config check happens before any weights are loaded. ---
        unet_cfg = _diffusers_config(root / "unet", "UNet2DConditionModel")
        vae_cfg = _diffusers_config(root / "vae", "AutoencoderKL")
        text_cfg = read_json_config(root / "text_encoder" / "config.json", "CLIP text encoder")
        if text_cfg.get("model_type") != "clip_text_model":
            raise ConfigError(
                f"{root / 'text_encoder'}: holds a {text_cfg.get('model_type')!r} model, "
                "expected a CLIP text encoder"
            )
        require_folder(root / "tokenizer", "CLIP tokenizer")
        has_scheduler = (root / "scheduler").is_dir()
        if has_scheduler:
            read_json_config(root / "scheduler" / "scheduler_config.json", "diffusers scheduler")
        self.dino = Dinov2Backbone(spec.dino_path, spec.dino_image_size)

        def unet(key: str) -> Any:
            return unet_cfg.get(key, _init_default(UNet2DConditionModel, key))

        def vae(key: str) -> Any:
            return vae_cfg.get(key, _init_default(AutoencoderKL, key))

        if vae("latent_channels") != unet("in_channels"):
            raise ConfigError(
                f"{root}: VAE latent channels ({vae('latent_channels')}) "
                f"!= UNet input channels ({unet('in_channels')})"
            )
        text_hidden = text_cfg.get("hidden_size", 512)
        if unet("cross_attention_dim") != text_hidden:
            raise ConfigError(
                f"{root}: UNet cross-attention dim ({unet('cross_attention_dim')}) "
                f"!= text encoder hidden size ({text_hidden})"
            )
        up_types = list(unet("up_block_types"))
        if len(up_types) < 3:
            raise ConfigError(f"{root / 'unet'}: UNet has {len(up_types)} decoder blocks, sd-dino needs 3")
        channels = list(reversed(unet("block_out_channels")))[:3]  # up block i outputs reversed(block_out)[i]
        for name, k, c in zip(SD_STAGES, spec.sd_pca_dims, channels, strict=True):
            if k > c:
                raise ConfigError(
                    f"sd_pca_dims: cannot keep {k} PCA components of the {c} channels of {name}"
                )
        self.vae_factor = 2 ** (len(vae("block_out_channels")) - 1)
        factor = self.vae_factor * 2 ** (len(unet("down_block_types")) - 1)
        if spec.sd_image_size % factor:
            raise ConfigError(
                f"sd_image_size must be a multiple of {factor} for {root}, got {spec.sd_image_size}"
            )
        self.raw_channels = sum(spec.sd_pca_dims) + self.dino.hidden_size
        if spec.dim > self.raw_channels:
            raise ConfigError(
                f"feature dim {spec.dim} exceeds the {self.raw_channels} channels sd-dino produces"
            )
        self.stages = {name: (c, k) for name, k, c in zip(SD_STAGES, spec.sd_pca_dims, channels, strict=True)}
        self.stages[FINAL] = (self.raw_channels, spec.dim)
        self.input_size = max(spec.sd_image_size, spec.dino_image_size)

        # --- Load. ---
        self.unet = self._load_diffusers(UNet2DConditionModel, root / "unet")
        self.vae = self._load_diffusers(AutoencoderKL, root / "vae")
        self.scheduler = self._load_scheduler(root, has_scheduler)
        steps = self.scheduler.config.num_train_timesteps
        if not 0 <= spec.timestep < steps:
            raise ConfigError(f"timestep {spec.timestep} is outside the scheduler's 0..{steps - 1}")
        # (1, L, C), computed once; the text encoder is not kept.
        self.prompt_embeds = self._embed_prompt(root, spec.prompt)
        self.dino.load(self.device)
        self.model_id = folder_fingerprint(
            [root / sub for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
             if (root / sub).is_dir()]
            + [self.dino.path]
        )
        latent_side = spec.sd_image_size // self.vae_factor
        gen = torch.Generator().manual_seed(spec.noise_seed)
        noise = torch.randn(1, vae("latent_channels"), latent_side, latent_side, generator=gen)
        self.noise = noise.to(self.device)
        self._captured: dict[str, Tensor] = {}
        for i, name in enumerate(SD_STAGES):
            block = self.unet.up_blocks[i]
            layers = getattr(block, "attentions", None) or block.resnets
            layers[-2].register_forward_hook(self._hook(name, last=i == len(SD_STAGES) - 1))

    @property
    def grid(self) -> tuple[int, int]:
        return (self.dino.grid, self.dino.grid)

    def _load_diffusers(self, cls: type, folder: Path) -> torch.nn.Module:
        try:
            model, info = cls.from_pretrained(
                folder,
                local_files_only=True,
                torch_dtype=torch.float32,
                variant=_variant(folder),
                output_loading_info=True,
                low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
            )
        except Exception as err:  # torch.load of a bad file raises about anything: see weights_error
            raise weights_error(folder, cls.__name__, err) from err
        problems = loading_errors(info)
        if problems:
            raise ConfigError(
                f"{folder}: weights do not match the {cls.__name__} config ({'; '.join(problems)})"
            )
        return model.to(self.device).eval().requires_grad_(False)

    def _load_scheduler(self, root: Path, has_scheduler: bool):
        from diffusers import DDPMScheduler

        if not has_scheduler:
            return DDPMScheduler(**_SD_SCHEDULE)
        # Only the training noise schedule is used; SD folders usually name PNDM/DDIM here, which share it.
        try:
            return DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
        except (OSError, TypeError, ValueError, NotImplementedError) as err:
            raise ConfigError(f"{root / 'scheduler'}: unusable noise schedule ({err})") from err

    def _embed_prompt(self, root: Path, prompt: str) -> Tensor:
        from transformers import AutoTokenizer, CLIPTextModel

        try:
            tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise ConfigError(f"{root / 'tokenizer'}: cannot load the CLIP tokenizer ({err})") from err
        try:
            encoder, info = CLIPTextModel.from_pretrained(
                root / "text_encoder", local_files_only=True, dtype=torch.float32, output_loading_info=True
            )
        except Exception as err:  # torch.load of a bad file raises about anything: see weights_error
            raise weights_error(root / "text_encoder", "CLIPTextModel", err) from err
        problems = loading_errors(info)
        if problems:
            raise ConfigError(
                f"{root / 'text_encoder'}: weights do not match the config ({'; '.join(problems)})"
            )
        length = tokenizer.model_max_length
        if length > encoder.config.max_position_embeddings:
            raise ConfigError(
                f"{root}: tokenizer max length {length} exceeds the text encoder's "
                f"{encoder.config.max_position_embeddings} positions"
            )
        ids = tokenizer(
            prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.inference_mode():
            embeds = encoder.to(self.device).eval()(ids.to(self.device))[0]
        return embeds.float().clone()

    def _hook(self, name: str, last: bool):
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            self._captured[name] = out.float()
            if last:
                raise _Stop

        return hook

    @torch.inference_mode()
    def inner_features(self, images: Tensor) -> dict[str, Tensor]:
        """Raw decoder features: (B, 3, H, W) RGB in [0, 1] -> {sd_up0/1/2: (B, C_i, h_i, w_i) float32}."""
        check_images(images, None)
        x = resize_images(images.to(self.device, torch.float32), self.spec.sd_image_size) * 2 - 1
        b = x.shape[0]
        with autocast(self.device, self.spec.cuda_bf16):
            posterior = self.vae.encode(x).latent_dist
            shift = self.vae.config.shift_factor or 0.0
            latents = ((posterior.mean - shift) * self.vae.config.scaling_factor).float()
            t = torch.full((b,), self.spec.timestep, device=self.device, dtype=torch.long)
            noisy = self.scheduler.add_noise(latents, self.noise.expand_as(latents), t)
            self._captured = {}
            try:
                self.unet(noisy, t, encoder_hidden_states=self.prompt_embeds.expand(b, -1, -1))
            except _Stop:
                pass
        captured, self._captured = self._captured, {}
        return captured

    @torch.inference_mode()
    def extract_raw(
        self, images: Tensor, masks: Tensor | None = None, basis: FeatureBasis | None = None
    ) -> Tensor:
        """Features before the final PCA: [SD part | DINO part] (see the module docstring).

        Args:
            images: (B, 3, H, W) float32 RGB in [0, 1], any size and device.
            masks: unused.
            basis: must hold the three block PCAs (`fit_basis` fits them before the final one).
        Returns:
            (B, raw_channels, g, g) float32 on `device`.
        """
        check_images(images, masks)
        if basis is None or any(name not in basis.stages for name in SD_STAGES):
            raise ConfigError(
                "sd-dino applies its decoder-block PCAs during extraction: pass the fitted FeatureBasis"
            )
        blocks = self.inner_features(images)
        # Finest block first, as sd-dino concatenates them; each resized to the DINO grid.
        parts = [resize_images(basis.stages[n].project(blocks[n]), self.grid) for n in reversed(SD_STAGES)]
        sd = F.normalize(torch.cat(parts, dim=1), dim=1) * self.spec.sd_weight
        dino = F.normalize(self.dino.tokens(images, self.spec.cuda_bf16), dim=1) * self.spec.dino_weight
        return torch.cat([sd, dino], dim=1)


def write_random_sd(folder: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Save randomly initialised SD components in the diffusers layout (tests, benchmarks, no-weight demos).

    size: "tiny" (a few thousand parameters, runs in milliseconds on a CPU) or "sd15" (Stable
    Diffusion 1.5 configurations, stored in float16: ~2.2 GB). The tokenizer has a tiny vocabulary
    either way (random weights make real tokens pointless). Writes unet/, vae/, text_encoder/,
    tokenizer/, scheduler/ atomically into `folder` (which must not exist).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dualpm.fileio import atomic_directory

    if size not in ("tiny", "sd15"):
        raise ConfigError(f"unknown random Stable Diffusion size {size!r}; choose tiny or sd15")
    tiny = size == "tiny"
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [f"{c}</w>" for c in letters]:
        vocab[token] = len(vocab)
    max_len = 8 if tiny else 77
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8 if tiny else 64,
            layers_per_block=1 if tiny else 2,
            block_out_channels=(16, 16, 32, 32) if tiny else (320, 640, 1280, 1280),
            cross_attention_dim=16 if tiny else 768,
            attention_head_dim=4 if tiny else 8,
            norm_num_groups=8 if tiny else 32,
        )
        vae = AutoencoderKL(
            # Four levels either way: latents are 1/8 of the image, as in SD, so grids match real ones.
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16) if tiny else (128, 256, 512, 512),
            layers_per_block=1 if tiny else 2,
            latent_channels=4,
            norm_num_groups=8 if tiny else 32,
            sample_size=32 if tiny else 512,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=64 if tiny else 49408,
                hidden_size=16 if tiny else 768,
                intermediate_size=32 if tiny else 3072,
                num_hidden_layers=1 if tiny else 12,
                num_attention_heads=2 if tiny else 12,
                max_position_embeddings=max_len,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
    if not tiny:
        unet, vae, text = unet.half(), vae.half(), text.half()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)
    scheduler = DDPMScheduler(**_SD_SCHEDULE)
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        unet.save_pretrained(tmp / "unet")
        vae.save_pretrained(tmp / "vae")
        text.save_pretrained(tmp / "text_encoder")
        tokenizer.save_pretrained(tmp / "tokenizer")
        scheduler.save_pretrained(tmp / "scheduler")
    return folder
