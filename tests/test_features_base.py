"""FeatureSpec (validation, JSON round trip, matching), image/mask loading and resizing, rgb."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dualpm.errors import ConfigError, DatasetError
from dualpm.features import (
    FeatureSpec,
    build_extractor,
    extract,
    fit_basis,
    load_image,
    load_mask,
    load_or_fit_basis,
    resize_images,
    stack_images,
)
from dualpm.features.base import IMAGENET_MEAN, IMAGENET_STD

SD_DINO = dict(extractor="sd-dino", sd_path="/w/sd", dino_path="/w/dino")


@pytest.mark.parametrize(
    "spec",
    [
        FeatureSpec(**SD_DINO),
        FeatureSpec(
            **SD_DINO, dim=32, timestep=50, prompt="a horse", sd_pca_dims=(8, 16, 32), dino_weight=0.5
        ),
        FeatureSpec("dino", dino_path="/w/dino", dino_image_size=448),
        FeatureSpec("rgb", grid=32, rgb_mask_channel=True),
        FeatureSpec("precomputed", grid=60),
    ],
)
def test_spec_json_round_trip(spec):
    again = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert again.to_dict() == spec.to_dict()


def test_spec_defaults_follow_the_reference():
    spec = FeatureSpec(**SD_DINO)
    values = (spec.dim, spec.grid, spec.timestep, spec.sd_image_size, spec.sd_pca_dims)
    assert values == (64, 60, 100, 960, (256, 256, 256))
    assert FeatureSpec("dino", dino_path="/w", dino_image_size=224).grid == 16
    assert (FeatureSpec("rgb").dim, FeatureSpec("rgb").grid) == (3, 64)
    assert FeatureSpec("rgb", rgb_mask_channel=True).dim == 4
    assert FeatureSpec("precomputed", grid=60).dim == 64


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(extractor="vgg"), "unknown"),
        (dict(extractor="rgb", timestep=50), "timestep does not apply to extractor 'rgb'"),
        (dict(extractor="dino", dino_path="/w", sd_path="/x"), "sd_path does not apply"),
        (dict(extractor="dino"), "needs dino_path"),
        (dict(extractor="sd-dino", dino_path="/w"), "needs sd_path"),
        (dict(SD_DINO, dino_image_size=500), "multiple of 14"),
        (dict(SD_DINO, grid=30), "grid=30 contradicts"),
        (dict(extractor="rgb", dim=5), "dim=5 contradicts"),
        (dict(extractor="precomputed"), "needs grid"),
        (dict(SD_DINO, timestep="100"), "timestep must be an integer"),
        (dict(SD_DINO, sd_pca_dims=(8, 8)), "sd_pca_dims must be 3 integers"),
        (dict(SD_DINO, sd_weight=-1.0), "sd_weight must be a finite number"),
        (dict(SD_DINO, sd_weight=0.0, dino_weight=0.0), "cannot both be 0"),
    ],
)
def test_spec_rejects_bad_options(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FeatureSpec(**kwargs)


def test_spec_from_dict_rejects_unknown_keys_and_versions():
    with pytest.raises(ConfigError, match="unknown options: colour"):
        FeatureSpec.from_dict({"extractor": "rgb", "colour": 1})
    with pytest.raises(ConfigError, match="version 2"):
        FeatureSpec.from_dict({"extractor": "rgb", "spec_version": 2})
    with pytest.raises(ConfigError, match="missing 'extractor'"):
        FeatureSpec.from_dict({"dim": 3})


def test_require_match_ignores_paths_only():
    spec = FeatureSpec(**SD_DINO)
    moved = FeatureSpec("sd-dino", sd_path="/elsewhere/sd", dino_path="/elsewhere/dino", cuda_bf16=False)
    spec.require_match(moved, "x")
    with pytest.raises(ConfigError, match=r"model.ckpt: .*timestep: 100 vs 50"):
        spec.require_match(FeatureSpec(**SD_DINO, timestep=50), "model.ckpt")
    with pytest.raises(ConfigError, match="extractor: 'sd-dino' vs 'rgb'"):
        spec.require_match(FeatureSpec("rgb"), "x")


# ----------------------------------------------------------------------------------------------
# Images


def _png(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_load_image_rgb_gray_rgba_16bit_palette(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(53, 37, 3), dtype=np.uint8)  # odd size, H != W
    out = load_image(_png(tmp_path / "rgb.png", rgb))
    assert out.shape == (3, 53, 37) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.permute(1, 2, 0).numpy(), rgb.astype(np.float32) / 255)

    gray = rng.integers(0, 256, size=(9, 11), dtype=np.uint8)
    out = load_image(_png(tmp_path / "gray.png", gray))
    assert out.shape == (3, 9, 11)
    for c in range(3):
        np.testing.assert_array_equal(out[c].numpy(), gray.astype(np.float32) / 255)

    rgba = rng.integers(0, 256, size=(5, 6, 4), dtype=np.uint8)
    out = load_image(_png(tmp_path / "rgba.png", rgba))
    expected = rgba[..., :3].astype(np.float32) / 255 * (rgba[..., 3:].astype(np.float32) / 255)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-7)

    deep = rng.integers(0, 65536, size=(4, 7), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    out = load_image(tmp_path / "deep.png")
    np.testing.assert_allclose(out[1].numpy(), deep.astype(np.float32) / 65535, atol=1e-7)

    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "pal.png")
    expected = np.asarray(palette.convert("RGB"), dtype=np.float32) / 255
    np.testing.assert_array_equal(load_image(tmp_path / "pal.png").permute(1, 2, 0).numpy(), expected)


def test_load_image_corrupt_truncated_missing(tmp_path):
    junk = np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()
    (tmp_path / "noise.png").write_bytes(junk)
    with pytest.raises(DatasetError, match="noise.png: cannot read image"):
        load_image(tmp_path / "noise.png")
    good = _png(tmp_path / "good.png", np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:300])
    with pytest.raises(DatasetError, match="cut.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(DatasetError, match="absent.png"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(DatasetError, match="noise.png: cannot read mask"):
        load_mask(tmp_path / "noise.png")


def test_load_mask_gray_and_alpha(tmp_path):
    gray = np.zeros((6, 8), np.uint8)
    gray[2:4, 3:] = 255
    np.testing.assert_array_equal(load_mask(_png(tmp_path / "m.png", gray)).numpy(), gray / 255.0)
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere; the object is in the alpha channel
    rgba[1:3, :, 3] = 255
    np.testing.assert_array_equal(load_mask(_png(tmp_path / "a.png", rgba)).numpy(), rgba[..., 3] / 255.0)


def test_resize_and_stack():
    img = torch.full((2, 3, 37, 53), 0.25)
    out = resize_images(img, 16)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, 0.25))  # constant images stay constant
    assert resize_images(img, (37, 53)) is img
    batch = stack_images([torch.rand(3, 20, 31), torch.rand(3, 7, 5)], 12)
    assert batch.shape == (2, 3, 12, 12)


# ----------------------------------------------------------------------------------------------
# rgb extractor (no weights)


def test_rgb_exact_values_and_mask_channel():
    spec = FeatureSpec("rgb", grid=8, rgb_mask_channel=True)
    ex = build_extractor(spec)
    colour = torch.tensor([0.2, 0.5, 0.9])
    images = colour[None, :, None, None].expand(2, 3, 32, 40).contiguous()
    masks = torch.zeros(2, 1, 32, 40)
    masks[:, :, :, :20] = 1.0  # left half
    basis = fit_basis(ex, lambda: pytest.fail("rgb has no PCA to fit"))
    assert dict(basis.stages) == {}
    out = extract(ex, basis, images, masks)
    assert out.shape == (2, 4, 8, 8) and out.dtype == torch.float32
    expected = (colour - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    expected = expected[None, :, None, None].expand(2, 3, 8, 8)
    torch.testing.assert_close(out[:, :3], expected, atol=1e-6, rtol=0)
    assert torch.equal(out[:, 3, :, :4], torch.ones(2, 8, 4))
    assert torch.equal(out[:, 3, :, 4:], torch.zeros(2, 8, 4))
    with pytest.raises(ConfigError, match="needs the object masks"):
        extract(ex, basis, images)


def test_rgb_basis_is_reused_and_checked(tmp_path):
    ex = build_extractor(FeatureSpec("rgb", grid=8))
    path = tmp_path / "basis.safetensors"
    first = load_or_fit_basis(path, ex, lambda: [])
    data = path.read_bytes()
    again = load_or_fit_basis(path, ex, lambda: pytest.fail("a stored basis must be reused"))
    assert again.content_hash() == first.content_hash() and path.read_bytes() == data
    with pytest.raises(ConfigError, match="grid: 8 vs 16"):
        load_or_fit_basis(path, build_extractor(FeatureSpec("rgb", grid=16)), lambda: [])


def test_precomputed_has_nothing_to_build():
    with pytest.raises(ConfigError, match="read_packed"):
        build_extractor(FeatureSpec("precomputed", grid=60))
