"""Colour maps and picture sheets: exact colours for known inputs, layout of the grid."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from dualpm.viz import BACKGROUND, canonical_to_rgb, depth_to_rgb, image_grid


def test_canonical_to_rgb_maps_box_corners_and_midpoints_exactly():
    canon = np.array([[-1.0, 0.0, 2.0], [1.0, 4.0, 6.0], [0.0, 2.0, 4.0], [3.0, -5.0, 4.0]])
    rgb = canonical_to_rgb(canon, bbox=[[-1, 0, 2], [1, 4, 6]])
    assert rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0], [0, 0, 0])
    np.testing.assert_array_equal(rgb[1], [255, 255, 255])
    np.testing.assert_array_equal(rgb[2], [128, 128, 128])  # 127.5 rounds to even -> 128
    np.testing.assert_array_equal(rgb[3], [255, 0, 128])  # outside the box: clipped


def test_canonical_to_rgb_default_box_is_the_masked_points_and_background_elsewhere():
    canon = torch.zeros(2, 2, 3)
    canon[0, 0] = torch.tensor([1.0, 1.0, 1.0])
    canon[1, 1] = torch.tensor([3.0, 5.0, 2.0])
    canon[0, 1] = torch.tensor([100.0, 100.0, 100.0])  # masked out: must not stretch the box
    mask = torch.tensor([[True, False], [False, True]])
    rgb = canonical_to_rgb(canon, mask=mask)
    np.testing.assert_array_equal(rgb[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(rgb[1, 1], [255, 255, 255])
    assert (rgb[0, 1] == BACKGROUND).all() and (rgb[1, 0] == BACKGROUND).all()


def test_depth_to_rgb_uses_the_matplotlib_colormap_ends():
    depth = np.array([[1.0, 2.0], [3.0, 0.0]])
    mask = np.array([[True, True], [True, False]])
    rgb = depth_to_rgb(depth, mask, cmap="viridis")
    cmap = matplotlib.colormaps["viridis"]
    np.testing.assert_array_equal(rgb[0, 0], cmap(0.0, bytes=True)[:3])
    np.testing.assert_array_equal(rgb[1, 0], cmap(1.0, bytes=True)[:3])
    np.testing.assert_array_equal(rgb[0, 1], cmap(0.5, bytes=True)[:3])
    assert (rgb[1, 1] == BACKGROUND).all()
    fixed = depth_to_rgb(depth, mask, cmap="viridis", limits=(0.0, 4.0))
    np.testing.assert_array_equal(fixed[0, 0], cmap(0.25, bytes=True)[:3])


def test_image_grid_places_scaled_tiles_with_labels():
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    gray = np.full((8, 8), 100, np.uint8)
    mask = np.zeros((2, 4), bool)
    mask[:, 2:] = True
    sheet = image_grid([red, gray, mask], labels=None, columns=2, cell=8, pad=1)
    assert sheet.size == (2 * 9 + 1, 2 * 9 + 1)
    pixels = np.asarray(sheet)
    # 4x4 red scaled to 8x8
    np.testing.assert_array_equal(pixels[1:9, 1:9], np.broadcast_to([255, 0, 0], (8, 8, 3)))
    np.testing.assert_array_equal(pixels[1:9, 10:18], np.full((8, 8, 3), 100))
    # 2x4 mask scaled to 4x8 (aspect kept), left half black, right half white, below it background
    np.testing.assert_array_equal(pixels[10:14, 1:5], np.zeros((4, 4, 3)))
    np.testing.assert_array_equal(pixels[10:14, 5:9], np.full((4, 4, 3), 255))
    plain = np.asarray(image_grid([red, gray], labels=None, cell=8, pad=1))
    labelled = np.asarray(image_grid([red, gray], labels=["a", ""], cell=8, pad=1))
    text_h = labelled.shape[0] - plain.shape[0]  # a text row above the tiles, the same width
    assert text_h > 0 and labelled.shape[1] == plain.shape[1]
    np.testing.assert_array_equal(labelled[text_h:], plain)  # the tiles move down by the text row, unchanged
    band = labelled[1:1 + text_h]
    inked = np.argwhere(band.min(axis=-1) < 128)
    assert len(inked) > 0 and inked[:, 1].max() < 1 + 8  # "a" is drawn above its own tile only
    assert (band[:, 10:] == 255).all()  # the empty label draws nothing


def test_image_grid_refuses_bad_tiles():
    with pytest.raises(ValueError, match="labels"):
        image_grid([np.zeros((2, 2), np.uint8)], labels=["a", "b"])
    with pytest.raises(ValueError, match="uint8"):
        image_grid([np.zeros((2, 2), np.float32)])
