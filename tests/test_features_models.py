"""dino and sd-dino on tiny randomly initialised models of the real classes, loaded through the real path."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dualpm.errors import ConfigError
from dualpm.features import (
    FeatureSpec,
    build_extractor,
    extract,
    fit_basis,
    load_or_fit_basis,
)
from dualpm.features.base import IMAGENET_MEAN, IMAGENET_STD
from dualpm.features.dino import write_random_dinov2
from dualpm.features.sd_dino import write_random_sd
from dualpm.images import load_image, stack_images


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    write_random_sd(root / "sd", "tiny", seed=0)
    write_random_dinov2(root / "dino", "tiny", seed=0)
    return root


def _sd_spec(weights, **kw):
    args = dict(
        sd_path=str(weights / "sd"), dino_path=str(weights / "dino"), sd_image_size=128, dino_image_size=56,
        sd_pca_dims=(8, 8, 8), dim=16,
    )
    return FeatureSpec("sd-dino", **{**args, **kw})


@pytest.fixture(scope="module")
def sd(weights):
    return build_extractor(_sd_spec(weights))


def _images(n, seed, size=(48, 72)):
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _sample(batches=3):
    def sample():
        for i in range(batches):
            yield _images(4, 100 + i), None

    return sample


@pytest.fixture(scope="module")
def sd_basis(sd):
    return fit_basis(sd, _sample(), seed=0)


# ----------------------------------------------------------------------------------------------
# dino


def test_dino_tokens_are_last_layer_patches_without_cls(weights):
    from transformers import Dinov2Model

    ex = build_extractor(FeatureSpec("dino", dino_path=str(weights / "dino"), dino_image_size=42, dim=8))
    assert ex.grid == (3, 3) and ex.stages == {"final": (32, 8)}
    images = _images(2, 0, size=(42, 42))  # already at the input size: no resize
    raw = ex.extract_raw(images)
    assert raw.shape == (2, 32, 3, 3) and raw.dtype == torch.float32
    # Independent computation with transformers directly.
    model = Dinov2Model.from_pretrained(weights / "dino", local_files_only=True).eval()
    x = (images - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        # The last layer's output, before the final LayerNorm.
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
    expected = torch.nn.functional.normalize(hidden[:, 1:], dim=-1)  # drop CLS, unit norm
    for row in range(3):
        for col in range(3):
            torch.testing.assert_close(raw[:, :, row, col], expected[:, row * 3 + col], atol=1e-5, rtol=1e-5)


def test_dino_with_registers_drops_register_tokens(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, image_size=28, patch_size=14,
        num_register_tokens=4,
    )
    model = Dinov2WithRegistersModel(config).eval()
    model.save_pretrained(tmp_path / "reg")
    ex = build_extractor(FeatureSpec("dino", dino_path=str(tmp_path / "reg"), dino_image_size=28, dim=4))
    images = _images(1, 4, size=(28, 28))
    x = (images - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape[1] == 1 + 4 + 4  # CLS, 4 registers, 2 x 2 patches
    expected = torch.nn.functional.normalize(hidden[0, 5:], dim=-1).T.reshape(32, 2, 2)
    torch.testing.assert_close(ex.extract_raw(images)[0], expected, atol=1e-5, rtol=1e-5)


def test_dino_extract_with_fitted_basis(weights):
    ex = build_extractor(FeatureSpec("dino", dino_path=str(weights / "dino"), dino_image_size=56, dim=8))
    basis = fit_basis(ex, _sample(2), seed=0)
    feats = extract(ex, basis, _images(3, 5))
    assert feats.shape == (3, 8, 4, 4) and feats.dtype == torch.float32
    raw = ex.extract_raw(_images(3, 5))
    torch.testing.assert_close(feats, basis.stages["final"].project(raw))


# ----------------------------------------------------------------------------------------------
# sd-dino


def test_sd_dino_shapes_stages_and_hooks(sd, weights):
    assert sd.stages == {"sd_up0": (32, 8), "sd_up1": (32, 8), "sd_up2": (16, 8), "final": (56, 16)}
    assert sd.grid == (4, 4) and sd.raw_channels == 24 + 32
    images = _images(2, 1)
    inner = sd.inner_features(images)
    # latent 128 / 8 = 16; the UNet halves it 3 times: decoder levels at 2, 4, 8 (then resized to 4).
    assert {k: tuple(v.shape) for k, v in inner.items()} == {
        "sd_up0": (2, 32, 2, 2), "sd_up1": (2, 32, 4, 4), "sd_up2": (2, 16, 8, 8),
    }
    # Independent check of what is captured: the decoder state entering the last layer of each
    # up block, before its skip concatenation (= the first C channels of that resnet's input).
    seen = {}
    handles = [
        sd.unet.up_blocks[i].resnets[-1].register_forward_pre_hook(
            lambda m, args, i=i: seen.__setitem__(i, args[0][:, : inner[f"sd_up{i}"].shape[1]].clone())
        )
        for i in range(2)  # the stop after up_blocks[2]'s second-to-last layer skips its last resnet
    ]
    try:
        again = sd.inner_features(images)
    finally:
        for h in handles:
            h.remove()
    for i in range(2):
        torch.testing.assert_close(again[f"sd_up{i}"], seen[i])


def test_sd_dino_same_image_same_features(sd, sd_basis, weights):
    images = _images(3, 2)
    a = extract(sd, sd_basis, images)
    assert a.shape == (3, 16, 4, 4) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, extract(sd, sd_basis, images))
    # A freshly built extractor draws the same noise; batch position does not matter.
    fresh = build_extractor(_sd_spec(weights))
    assert torch.equal(a, extract(fresh, sd_basis, images))
    torch.testing.assert_close(extract(sd, sd_basis, images[1:2]), a[1:2], atol=1e-5, rtol=1e-5)
    # The two parts are unit-norm per pixel before weighting.
    raw = sd.extract_raw(images, basis=sd_basis)
    torch.testing.assert_close(raw[:, :24].norm(dim=1), torch.ones(3, 4, 4))
    torch.testing.assert_close(raw[:, 24:].norm(dim=1), torch.ones(3, 4, 4))
    other_noise = build_extractor(_sd_spec(weights, noise_seed=7))
    up2 = sd.inner_features(images)["sd_up2"]
    assert not torch.allclose(other_noise.inner_features(images)["sd_up2"], up2)


def test_sd_dino_odd_grayscale_images(sd, sd_basis, tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, size=(53, 37), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgb = np.random.default_rng(1).integers(0, 256, size=(20, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    Image.fromarray(gray).convert("RGB").save(tmp_path / "gray_as_rgb.png")  # PIL's own grey -> RGB
    images = [load_image(tmp_path / "gray.png"), load_image(tmp_path / "wide.png")]
    # Grey is read as three equal channels in [0, 1], the wide image as it is: exact values.
    torch.testing.assert_close(images[0], torch.from_numpy(np.repeat(gray[None] / 255.0, 3, 0)).float())
    torch.testing.assert_close(images[1], torch.from_numpy(rgb / 255.0).permute(2, 0, 1).float())
    batch = stack_images(images, sd.input_size)
    assert batch.shape == (2, 3, sd.input_size, sd.input_size)
    feats = extract(sd, sd_basis, batch)
    assert feats.shape == (2, 16, 4, 4) and torch.isfinite(feats).all()
    # The grey file gives the features of the same picture stored as RGB, alone or in a batch of two sizes.
    as_rgb = extract(sd, sd_basis, stack_images([load_image(tmp_path / "gray_as_rgb.png")], sd.input_size))
    torch.testing.assert_close(feats[:1], as_rgb, atol=1e-5, rtol=1e-5)
    alone = extract(sd, sd_basis, stack_images(images[1:], sd.input_size))
    torch.testing.assert_close(feats[1:], alone, atol=1e-5, rtol=1e-5)
    assert (feats[0] - feats[1]).abs().max() > 1e-3  # different pictures, different features


def test_basis_fitted_once_and_reused(sd, tmp_path):
    calls = []

    def sample():
        calls.append(1)
        return _sample()()

    path = tmp_path / "features_basis.safetensors"
    first = load_or_fit_basis(path, sd, sample, seed=0)
    assert len(calls) == 2  # block PCAs, then the final PCA
    assert set(first.stages) == {"sd_up0", "sd_up1", "sd_up2", "final"}
    data = path.read_bytes()
    again = load_or_fit_basis(path, sd, sample, seed=0)
    assert len(calls) == 2 and path.read_bytes() == data
    assert again.content_hash() == first.content_hash()
    # A refit with the same seed reproduces the stored basis exactly.
    assert fit_basis(sd, _sample(), seed=0).content_hash() == first.content_hash()


def test_basis_for_other_features_or_weights_is_refused(sd, sd_basis, weights, tmp_path):
    with pytest.raises(ConfigError, match="timestep: 100 vs 50"):
        extract(build_extractor(_sd_spec(weights, timestep=50)), sd_basis, _images(1, 0))
    write_random_dinov2(tmp_path / "dino2", "tiny", seed=1)
    other = build_extractor(_sd_spec(weights, dino_path=str(tmp_path / "dino2")))
    with pytest.raises(ConfigError, match="other model weights"):
        extract(other, sd_basis, _images(1, 0))


# ----------------------------------------------------------------------------------------------
# Errors before any work


def _copy_sd(weights, tmp_path, edit=None, drop_weights=True):
    # A copy whose weight files are removed: a config error must be reported before loading them.
    folder = tmp_path / "sd"
    shutil.copytree(weights / "sd", folder)
    if drop_weights:
        for f in folder.rglob("*.safetensors"):
            f.unlink()
    if edit:
        sub, key, value = edit
        cfg = json.loads((folder / sub / "config.json").read_text())
        cfg[key] = value
        (folder / sub / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize(
    "edit, message",
    [
        (("vae", "latent_channels", 8), "VAE latent channels \\(8\\) != UNet input channels \\(4\\)"),
        (("unet", "cross_attention_dim", 24), r"cross-attention dim \(24\) != text encoder hidden size"),
        (("unet", "_class_name", "AutoencoderKL"), "'AutoencoderKL' model, expected a diffusers UNet2D"),
        (("text_encoder", "model_type", "clip_vision_model"), "expected a CLIP text encoder"),
        (None, "cannot load UNet2DConditionModel weights"),
    ],
)
def test_sd_config_errors_name_the_folder(weights, tmp_path, edit, message):
    folder = _copy_sd(weights, tmp_path, edit)
    with pytest.raises(ConfigError, match=message) as info:
        build_extractor(_sd_spec(weights, sd_path=str(folder)))
    assert str(folder) in str(info.value)


class _Unsafe:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


@pytest.mark.parametrize("sub, name, cls", [("unet", "diffusion_pytorch_model.bin", "UNet2DConditionModel"),
                                            ("text_encoder", "pytorch_model.bin", "CLIPTextModel")])
def test_refused_pickle_weights_are_named(weights, tmp_path, sub, name, cls):
    # diffusers (unet) wraps torch's refusal in an OSError naming the file, transformers (text encoder)
    # raises it as it is; either way the error names the file and what was refused.
    folder = _copy_sd(weights, tmp_path, drop_weights=False)
    for f in (folder / sub).glob("*.safetensors"):
        f.unlink()
    torch.save({"weight": _Unsafe()}, folder / sub / name)
    with pytest.raises(ConfigError) as info:
        build_extractor(_sd_spec(weights, sd_path=str(folder)))
    assert str(info.value).startswith(f"{folder / sub / name}: {cls} weights: refused to load it: it holds "
                                      "objects other than tensors and plain values (Trying to load unsupported")


def test_missing_and_wrong_class_folders(weights, tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nowhere'}: Stable Diffusion .* does not exist"):
        build_extractor(_sd_spec(weights, sd_path=str(tmp_path / "nowhere")))
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = tmp_path / "clip"
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=28, patch_size=14,
        )
    ).save_pretrained(clip)
    with pytest.raises(ConfigError, match=f"{clip}: holds a 'clip_vision_model' model, expected a DINOv2"):
        build_extractor(FeatureSpec("dino", dino_path=str(clip)))
    with pytest.raises(ConfigError, match="not a transformers DINOv2 model folder"):
        build_extractor(FeatureSpec("dino", dino_path=str(weights / "sd")))
    with pytest.raises(ConfigError, match="not a diffusers UNet2DConditionModel folder"):
        build_extractor(_sd_spec(weights, sd_path=str(weights / "dino")))


def test_dino_weights_not_matching_config(weights, tmp_path):
    folder = tmp_path / "dino"
    shutil.copytree(weights / "dino", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the file holds 2 layers
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"{folder}: weights do not match"):
        build_extractor(FeatureSpec("dino", dino_path=str(folder), dim=8))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(sd_pca_dims=(8, 8, 20)), "cannot keep 20 PCA components of the 16 channels of sd_up2"),
        (dict(sd_image_size=96), "sd_image_size must be a multiple of 64"),
        (dict(dim=60), "feature dim 60 exceeds the 56 channels"),
        (dict(timestep=1000), "outside the scheduler's 0..999"),
    ],
)
def test_sd_option_errors(weights, kw, message):
    with pytest.raises(ConfigError, match=message):
        build_extractor(_sd_spec(weights, **kw))


@pytest.mark.gpu
def test_sd_dino_cuda_bf16_agrees_with_cpu(weights, sd, sd_basis):
    cuda = build_extractor(_sd_spec(weights), "cuda")
    images = _images(2, 3)
    on_gpu = extract(cuda, sd_basis, images)  # the CPU-fitted basis serves every device
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.float32 and on_gpu.shape == (2, 16, 4, 4)
    assert torch.equal(on_gpu, extract(cuda, sd_basis, images))
    raw_gpu = cuda.extract_raw(images, basis=sd_basis).cpu()
    raw_cpu = sd.extract_raw(images, basis=sd_basis)
    # bf16 autocast changes values slightly; the per-pixel feature directions must agree.
    cosine = torch.nn.functional.cosine_similarity(raw_gpu, raw_cpu, dim=1)
    assert cosine.mean() > 0.98, cosine
