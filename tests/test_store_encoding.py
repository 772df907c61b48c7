"""Sparse dual point maps (counts + values), their npz, images: exact round trips, sizes, corruption."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from dualpm.store.encoding import (
    EncodingError,
    baseline_npz_bytes,
    decode_png,
    dense_dual_pointmap,
    dpm_npz,
    png_bytes,
    read_dpm_npz,
    rgb8,
    sparse_dual_pointmap,
)


def spheres_dual_pointmap(h: int = 160, w: int = 160, layers: int = 8, seed: int = 0) -> np.ndarray:
    """Analytic ray casting of 3 overlapping spheres: (h, w, layers, 7) with up to 6 layers hit.

    Pixel-centre rays of a camera at the origin looking down -z; the object sits at depth 3 (posed z
    has the depth subtracted, as in the reference); canonical points are the same surfaces rescaled.
    """
    rng = np.random.default_rng(seed)
    cot = 1 / np.tan(np.deg2rad(20))
    col, row = np.meshgrid(np.arange(w), np.arange(h))
    rays = np.stack([(2 * (col + 0.5) / w - 1) / cot, -(2 * (row + 0.5) / h - 1) / cot, -np.ones((h, w))], -1)
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)  # (h, w, 3)
    centres = np.array([[-0.25, 0.0, -3.0], [0.3, 0.1, -3.2], [0.0, -0.35, -2.7]])
    centres += rng.normal(0, 0.05, (3, 3))
    depths, posed, canonical = [], [], []
    for centre, radius in zip(centres, (0.5, 0.45, 0.3), strict=True):
        b = rays @ centre
        disc = b**2 - (centre @ centre - radius**2)
        root = np.sqrt(np.maximum(disc, 0))
        for t in (b - root, b + root):
            point = t[..., None] * rays
            depths.append(np.where(disc > 0, t, np.inf))
            posed.append(point + [0, 0, 3.0])
            canonical.append((point - centre) / radius * 0.4 + centre * 0.1)
    order = np.argsort(np.stack(depths, -1), -1)[..., :layers]  # (h, w, k) nearest first
    depth = np.take_along_axis(np.stack(depths, -1), order, -1)
    hit = np.isfinite(depth)
    out = np.zeros((h, w, layers, 7), np.float32)
    k = order.shape[-1]
    out[..., :k, 0:3] = np.take_along_axis(np.stack(canonical, -2), order[..., None], -2)
    out[..., :k, 3:6] = np.take_along_axis(np.stack(posed, -2), order[..., None], -2)
    out[..., :k, 6] = 1
    out[..., :k, :][~hit] = 0
    return out


def as_float16(dpm: np.ndarray) -> np.ndarray:
    return dpm.astype(np.float16).astype(np.float32)


def round_trip(dpm: np.ndarray, dtype: str = "float16") -> np.ndarray:
    counts, values = sparse_dual_pointmap(dpm, dtype)
    return dense_dual_pointmap(counts, values, dpm.shape[2])


def test_round_trip_is_exact_up_to_the_precision():
    dpm = spheres_dual_pointmap()
    hits = dpm[..., 6].sum(axis=(0, 1))
    assert hits[2] > 0 and hits[6] == 0  # several layers, some empty: the realistic case
    decoded = round_trip(dpm)
    assert decoded.dtype == np.float32 and decoded.shape == dpm.shape
    np.testing.assert_array_equal(decoded, as_float16(dpm))
    assert np.abs(decoded - dpm).max() <= 2.0**-11  # float16 rounding of values below 1
    np.testing.assert_array_equal(round_trip(dpm, "float32"), dpm)  # float32: exact


def test_sparse_layout_is_counts_and_layer_major_raster_values():
    dpm = np.zeros((2, 3, 4, 7), np.float32)
    dpm[0, 1, :3] = [[1, 2, 3, 4, 5, 6, 1], [7, 8, 9, 10, 11, 12, 1], [-1, -2, -3, -4, -5, -6, 1]]
    dpm[1, 2, :1] = [[0.5, 0, 0, 0, 0, -0.25, 1]]  # zeros inside a hit are kept as values
    counts, values = sparse_dual_pointmap(dpm, "float32")
    np.testing.assert_array_equal(counts, [[0, 3, 0], [0, 0, 1]])
    # layer 0 in raster order (pixel (0, 1), then (1, 2)), then layer 1, then layer 2
    np.testing.assert_array_equal(values, [[1, 2, 3, 4, 5, 6], [0.5, 0, 0, 0, 0, -0.25], [7, 8, 9, 10, 11, 12],
                                           [-1, -2, -3, -4, -5, -6]])
    assert counts.dtype == np.uint8 and values.dtype == np.float32
    np.testing.assert_array_equal(dense_dual_pointmap(counts, values, 4), dpm)


def test_empty_and_full_maps():
    empty = np.zeros((5, 7, 3, 7), np.float32)
    np.testing.assert_array_equal(round_trip(empty), empty)
    full = np.random.default_rng(1).uniform(-2, 2, (5, 7, 3, 7)).astype(np.float32)
    full[..., 6] = 1
    np.testing.assert_array_equal(round_trip(full), as_float16(full))


def test_npz_round_trip_is_plain_numpy_and_deterministic():
    dpm = spheres_dual_pointmap(24, 20, 4)
    counts, values = sparse_dual_pointmap(dpm)
    data = dpm_npz(counts, values, 4)
    assert data == dpm_npz(counts, values, 4)  # same map, same bytes (hence the same shard checksum)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:  # what WebDataset's default decoder does
        assert sorted(npz.files) == ["counts", "shape", "values"]
        np.testing.assert_array_equal(npz["counts"], counts)
        np.testing.assert_array_equal(npz["values"], values)
        assert npz["shape"].tolist() == [24, 20, 4, 7]
    got_counts, got_values, layers = read_dpm_npz(data)
    np.testing.assert_array_equal(dense_dual_pointmap(got_counts, got_values, layers), as_float16(dpm))


def test_size_beats_the_benchmark_target():
    dpm = spheres_dual_pointmap()
    counts, values = sparse_dual_pointmap(dpm)
    ratio = len(dpm_npz(counts, values, 8)) / baseline_npz_bytes(dpm)
    assert ratio < 0.40  # plain npz (deflate) of float16 hits; Zarr's blosc-zstd does better (benchmarks.md)


def test_baseline_is_31_bytes_per_hit_plus_fixed_overhead():
    # float32 x 7 values + uint8 x 3 indices per hit, uncompressed: sizes differ by exactly that.
    small, large = np.zeros((2, 10, 10, 4, 7), np.float32)
    small[:2, :3, 0, 6] = 1
    large[:5, :7, :2, 6] = 1
    assert baseline_npz_bytes(large) - baseline_npz_bytes(small) == 31 * (70 - 6)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.__setitem__((1, 1, 0, 3), np.nan), "not finite"),
        (lambda d: d.__setitem__((1, 1, 0, 3), 1e6), "not finite or beyond"),
        (lambda d: d.__setitem__((0, 0, 1, 6), 1.0), "layer hit implies"),  # layer 1 hit, layer 0 missed
        (lambda d: d.__setitem__((1, 1, 0, 6), 0.5), "alpha must be 0 or 1"),
        (lambda d: d.__setitem__((0, 0, 0, 2), 0.1), "non-zero values where alpha is 0"),
    ],
)
def test_sparse_refuses_invalid_maps(edit, message):
    dpm = np.zeros((3, 3, 2, 7), np.float32)
    dpm[1, 1, 0] = [1, 1, 1, 1, 1, 1, 1]
    sparse_dual_pointmap(dpm)  # valid before the edit
    edit(dpm)
    with pytest.raises(EncodingError, match=message):
        sparse_dual_pointmap(dpm)


def test_float32_keeps_values_beyond_float16():
    dpm = np.zeros((3, 3, 2, 7), np.float32)
    dpm[1, 1, 0] = [1e6, 1, 1, 1, 1, 1, 1]
    with pytest.raises(EncodingError, match="beyond"):
        sparse_dual_pointmap(dpm, "float16")
    assert sparse_dual_pointmap(dpm, "float32")[1][0, 0] == 1e6


def test_sparse_refuses_wrong_shapes_and_precisions():
    for bad in (np.zeros((3, 3, 6)), np.zeros((3, 3, 2, 6)), np.zeros((3, 3, 2, 7), np.int32), [[[[0] * 7]]]):
        with pytest.raises(EncodingError, match=r"\(H, W, L, 7\)"):
            sparse_dual_pointmap(bad)
    with pytest.raises(EncodingError, match="precision"):
        sparse_dual_pointmap(np.zeros((3, 3, 2, 7), np.float32), "float64")


def test_dense_refuses_counts_and_values_that_disagree():
    counts, values = sparse_dual_pointmap(spheres_dual_pointmap(8, 8, 3))
    with pytest.raises(EncodingError, match="disagree"):
        dense_dual_pointmap(counts, values[:-1], 3)
    with pytest.raises(EncodingError, match="disagree"):
        dense_dual_pointmap(counts, values, int(counts.max()) - 1)
    bad = values.copy()
    bad[0, 0] = np.inf
    with pytest.raises(EncodingError, match="not all finite"):
        dense_dual_pointmap(counts, bad, 3)


def test_every_flipped_bit_and_truncation_of_the_npz_is_detected():
    # The zip's CRC-32 covers every member: damaged bytes never decode into wrong numbers.
    counts, values = sparse_dual_pointmap(spheres_dual_pointmap(12, 12, 4, seed=2))
    data = dpm_npz(counts, values, 4)
    detected = 0
    for position in range(len(data)):
        corrupt = bytearray(data)
        corrupt[position] ^= 0x10
        try:
            c, v, layers = read_dpm_npz(bytes(corrupt))
            dense_dual_pointmap(c, v, layers)
        except EncodingError:
            detected += 1
            continue
        # Undetected flips may only touch zip metadata that does not change the numbers.
        np.testing.assert_array_equal(c, counts)
        np.testing.assert_array_equal(v, values)
    assert detected > 0.9 * len(data)
    for length in range(0, len(data), 7):
        with pytest.raises(EncodingError):
            read_dpm_npz(data[:length])
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist())


def test_rgb8_of_image_files():
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(rgb8(png_bytes(rgb), "x"), rgb)
    grey = np.arange(30, dtype=np.uint8).reshape(6, 5)
    np.testing.assert_array_equal(rgb8(png_bytes(grey), "x"), np.repeat(grey[..., None], 3, 2))


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).random((6, 5)) > 0.5,
        np.arange(30, dtype=np.uint8).reshape(6, 5),
        np.arange(30, dtype=np.uint16).reshape(6, 5) * 2000,
        np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8),
        np.random.default_rng(0).integers(0, 256, (6, 5, 4), dtype=np.uint8),
    ],
)
def test_png_round_trip(image):
    data = png_bytes(image)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = decode_png(data)
    assert decoded.dtype == image.dtype
    np.testing.assert_array_equal(decoded, image)


def test_png_errors():
    with pytest.raises(EncodingError, match="as PNG"):
        png_bytes(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(EncodingError, match="do not decode"):
        decode_png(b"not an image")
    truncated = png_bytes(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))[:60]
    with pytest.raises(EncodingError, match="do not decode"):
        decode_png(truncated)

