"""Image-based light: spherical-harmonic irradiance and the turned panorama, against closed forms."""

from __future__ import annotations

import numpy as np

from dualpm.texture import srgb_to_linear
from pipeline.synth.lighting import jitter_colours, make_environment
from tests.rigs import png_bytes


def test_constant_sky_irradiance_is_its_radiance(tmp_path):
    """A uniform environment of radiance L gives E = pi L for every normal: E / pi = L."""
    (tmp_path / "grey.png").write_bytes(png_bytes(np.full((64, 128, 3), 150, np.uint8)))
    env = make_environment(tmp_path / "grey.png", np.random.default_rng(0), exposure=2.0)
    radiance = 2.0 * float(srgb_to_linear(np.float32(150 / 255)))
    normals = np.random.default_rng(1).normal(size=(20, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    np.testing.assert_allclose(env.irradiance(normals), radiance, rtol=2e-3)
    np.testing.assert_allclose(env.lookup(normals), radiance, rtol=1e-6)


def test_turned_panorama_is_seen_where_it_was_turned(tmp_path):
    """A panorama bright only in the column facing -Z (u = 0.5) is seen, after a yaw of a, along the
    direction -Z turned by a about +Y; the sky's irradiance is larger facing that way than away."""
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, 31:33] = 255
    (tmp_path / "stripe.png").write_bytes(png_bytes(image))
    env = make_environment(tmp_path / "stripe.png", np.random.default_rng(3), exposure=1.0)
    a = env.yaw
    towards = np.array([[-np.sin(a), 0.0, -np.cos(a)]])  # -Z turned by a about +Y
    away = -towards
    assert env.lookup(towards)[0, 0] > 0.9 and env.lookup(away)[0, 0] < 1e-6
    assert env.irradiance(towards)[0, 0] > 5 * max(env.irradiance(away)[0, 0], 1e-9)


def test_jitter_identity():
    image = np.random.default_rng(0).random((4, 5, 3))
    np.testing.assert_allclose(jitter_colours(image, np.ones(3)), image, atol=1e-12)
