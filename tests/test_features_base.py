"""FeatureSpec (validation, JSON round trip, matching), the rgb extractor, basis reuse."""

from __future__ import annotations

import json

import pytest
import torch

from dualpm.errors import ConfigError
from dualpm.features import (
    FeatureSpec,
    build_extractor,
    extract,
    fit_basis,
    load_or_fit_basis,
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
