"""dualpm.pointmaps: the channel contract and the two layouts, on a hand-built map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualpm.errors import ConfigError, DatasetError
from dualpm.pointmaps import ALPHA, CANONICAL, CHANNELS, POINTS, POSED, POSED_Z, hits, to_channel_first, to_channel_last


def hand_map() -> torch.Tensor:
    """(B=1, H=2, W=3, L=2, 7): pixel (1, 2) hits two surfaces, pixel (0, 0) one, the rest nothing."""
    dpm = torch.zeros(1, 2, 3, 2, 7)
    dpm[0, 1, 2, 0] = torch.tensor([0.1, 0.2, 0.3, 1.0, 2.0, -0.5, 1.0])
    dpm[0, 1, 2, 1] = torch.tensor([0.1, 0.2, -0.3, 1.0, 2.0, 0.5, 1.0])
    dpm[0, 0, 0, 0] = torch.tensor([-1.0, 0.0, 0.0, -2.0, 0.0, 0.0, 1.0])
    return dpm


def test_channel_names_match_the_documented_order():
    assert (CANONICAL, POSED, POSED_Z, ALPHA, POINTS, CHANNELS) == (slice(0, 3), slice(3, 6), 5, 6, slice(0, 6), 7)
    dpm = hand_map()
    assert dpm[0, 1, 2, 1, POSED].tolist() == [1.0, 2.0, 0.5] and float(dpm[0, 1, 2, 1, POSED_Z]) == 0.5
    assert hits(dpm)[0].nonzero().tolist() == [[0, 0, 0], [1, 2, 0], [1, 2, 1]]  # (row, col, layer)
    assert hits(dpm.numpy())[0].sum() == 3  # numpy arrays index the same way


def test_layouts_convert_both_ways():
    dpm = hand_map()
    maps = to_channel_first(dpm)
    assert maps.canonical.shape == (1, 2, 3, 2, 3) and maps.alpha.shape == (1, 2, 2, 3)  # (B, L, 3, H, W), (B, L, H, W)
    assert maps.canonical[0, 1, :, 1, 2].tolist() == pytest.approx([0.1, 0.2, -0.3])  # layer 1, pixel (1, 2)
    assert maps.posed[0, 0, :, 0, 0].tolist() == [-2.0, 0.0, 0.0]
    assert maps.alpha[0, :, 1, 2].tolist() == [1.0, 1.0] and float(maps.alpha.sum()) == 3.0
    assert torch.equal(to_channel_last(maps), dpm)
    first = to_channel_first(dpm, num_layers=1)
    assert torch.equal(to_channel_last(first), dpm[:, :, :, :1])


def test_refusals():
    with pytest.raises(DatasetError, match=r"\(B, H, W, L, 7\)"):
        to_channel_first(torch.zeros(1, 2, 3, 2, 6))
    with pytest.raises(ConfigError, match="3 layers requested"):
        to_channel_first(hand_map(), num_layers=3)
    assert np.array_equal(hits(np.zeros((2, 2, 1, 7))), np.zeros((2, 2, 1), bool))
