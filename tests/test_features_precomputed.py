"""precomputed: the published packed `_feat.png` layout, decoded exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dualpm.errors import DatasetError
from dualpm.features import (
    FeatureSpec,
    decode_packed,
    encode_packed,
    read_packed,
    spec_from_packed,
    write_packed,
)


def _pack_by_hand(values: np.ndarray) -> np.ndarray:
    # The layout spelled out: channel c -> tile c // 3, colour c % 3; tiles side by side; padding 0.
    c, h, w = values.shape
    tiles = (c + 2) // 3
    packed = np.zeros((h, tiles * w, 3), np.uint8)
    for ch in range(c):
        t, colour = divmod(ch, 3)
        packed[:, t * w : (t + 1) * w, colour] = values[ch]
    return packed


def test_decode_written_png_exactly(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 256, size=(64, 12, 12), dtype=np.uint8)
    values[0, 0, :3] = [0, 127, 254]  # -1, 0, +1 exactly
    packed = _pack_by_hand(values)
    assert packed.shape == (12, 22 * 12, 3)
    Image.fromarray(packed).save(tmp_path / "000001_feat.png")
    feats = read_packed(tmp_path / "000001_feat.png", 64, grid=12)
    assert feats.shape == (64, 12, 12) and feats.dtype == torch.float32
    np.testing.assert_array_equal(feats.numpy(), values.astype(np.float32) / np.float32(127) - np.float32(1))
    assert feats[0, 0, :3].tolist() == [-1.0, 0.0, 1.0]


def test_encode_decode_round_trip_every_byte(tmp_path):
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16).repeat(5, axis=0)  # 5 channels: 2 tiles
    feats = decode_packed(_pack_by_hand(values), channels=5)
    expected = _pack_by_hand(values)
    expected[:, 16:, 2] = 127  # the padding channel is written as x = 0
    np.testing.assert_array_equal(encode_packed(feats), expected)
    write_packed(tmp_path / "f.png", feats)
    assert torch.equal(read_packed(tmp_path / "f.png", 5), feats)


def test_encode_rounds_and_clips():
    # (x + 1) * 127 = -254, 0, 127.5, 190.5 (half to even: 190), 381
    x = torch.tensor([-3.0, -1.0, 0.004, 0.5, 2.0]).reshape(5, 1, 1)
    packed = encode_packed(x)
    assert packed.shape == (1, 2, 3)
    assert packed[0, 0].tolist() == [0, 0, 128] and packed[0, 1].tolist() == [190, 255, 127]


def test_bad_packed_files(tmp_path):
    Image.fromarray(np.zeros((12, 22 * 12 + 1, 3), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(DatasetError, match="wide.png: width 265 is not 22 tiles"):
        read_packed(tmp_path / "wide.png")
    Image.fromarray(np.zeros((12, 22 * 12, 3), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(DatasetError, match="small.png: feature tiles are 12x12, expected 60x60"):
        read_packed(tmp_path / "small.png", grid=60)
    Image.fromarray(np.zeros((12, 22 * 12), np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(DatasetError, match="gray.png: packed features must be an 8-bit RGB image"):
        read_packed(tmp_path / "gray.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DatasetError, match="junk.png: cannot read packed features"):
        read_packed(tmp_path / "junk.png")


def test_spec_from_packed(tmp_path):
    Image.fromarray(np.zeros((60, 22 * 60, 3), np.uint8)).save(tmp_path / "1_feat.png")
    assert spec_from_packed(tmp_path / "1_feat.png") == FeatureSpec("precomputed", dim=64, grid=60)
