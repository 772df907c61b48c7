"""Left-right mirroring: the mirrored render of a scene equals the render of the mirrored scene; predictions
mirror back consistently with targets."""

from __future__ import annotations

import pytest
import torch
import trimesh

from dualpm.camera import projection_from_focal
from dualpm.data.augment import mirror_left_right, mirror_prediction
from dualpm.errors import ConfigError
from dualpm.pointmaps import to_channel_first
from dualpm.model import NetworkOutput
from dualpm.render import render_dual_pointmaps

SIZE = (40, 48)  # (H, W)


def render(canonical: torch.Tensor, posed: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(1, H, W, 4, 7) dual point maps seen from 4 units down +Z (camera x = world x)."""
    view = torch.eye(4)[None]
    view[0, 2, 3] = -4.0
    proj = projection_from_focal(torch.tensor([40.0]), aspect=SIZE[1] / SIZE[0])
    return render_dual_pointmaps(canonical, posed[None], faces, view, proj, SIZE, 4, backend="cpu")


def asymmetric_scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bumpy closed surface, posed off-centre and turned: nothing about it is left-right symmetric."""
    sphere = trimesh.creation.icosphere(subdivisions=3)
    canonical = torch.tensor(sphere.vertices, dtype=torch.float32)
    bump = 1 + 0.2 * torch.sin(5 * canonical[:, 0] + 1) * torch.cos(3 * canonical[:, 1])
    turn = torch.tensor([[0.8, 0.0, 0.6], [0.0, 1.0, 0.0], [-0.6, 0.0, 0.8]])
    posed = (canonical * bump[:, None] * torch.tensor([1.2, 0.7, 0.5])) @ turn.T + torch.tensor([0.3, 0.1, 0.2])
    return canonical, posed, torch.tensor(sphere.faces)


@pytest.mark.parametrize("axis", [0, 2])
def test_mirrored_render_equals_render_of_mirrored_scene(axis):
    canonical, posed, faces = asymmetric_scene()
    dpm = render(canonical, posed, faces)  # (1, H, W, L, 7)
    mirror_canonical = torch.ones(3)
    mirror_canonical[axis] = -1
    expected = render(canonical * mirror_canonical, posed * torch.tensor([-1.0, 1.0, 1.0]), faces)
    features = torch.arange(2 * SIZE[0] * SIZE[1], dtype=torch.float32).reshape(1, 2, *SIZE)
    mask = dpm[..., 0, 6]
    f, t, m = mirror_left_right(features, dpm, mask, torch.tensor([True]), axis)
    assert expected[..., 6].sum() > 200  # the scene covers the image
    # Ray hits of mirrored rays agree to float rounding; a pixel whose centre grazes an edge may differ.
    same_cover = (t[..., 6] == expected[..., 6]).float().mean()
    assert same_cover >= 0.999
    both = (t[..., 6] > 0) & (expected[..., 6] > 0)
    assert (t[..., :6] - expected[..., :6]).abs().amax(-1)[both].max() < 1e-4
    assert torch.equal(f, features.flip(-1)) and torch.equal(m, mask.flip(-1))


def test_unselected_samples_are_unchanged_and_mirroring_twice_is_identity():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 5, 6, 7, generator=gen)
    target = torch.randn(3, 6, 7, 2, 7, generator=gen)
    mask = (torch.rand(3, 6, 7, generator=gen) > 0.5).float()
    select = torch.tensor([True, False, True])
    f, t, m = mirror_left_right(features, target, mask, select, 0)
    assert torch.equal(f[1], features[1]) and torch.equal(t[1], target[1]) and torch.equal(m[1], mask[1])
    assert torch.equal(t[0, :, :, :, 3], -target[0, :, :, :, 3].flip(1))  # posed x negated
    assert torch.equal(t[0, :, :, :, 4:], target[0, :, :, :, 4:].flip(1))  # posed y, z and alpha move only
    again = mirror_left_right(f, t, m, select, 0)
    for before, after in zip((features, target, mask), again, strict=True):
        assert torch.equal(before, after)


def test_bad_axis_is_refused():
    with pytest.raises(ConfigError, match="mirror axis must be 0, 1 or 2"):
        mirror_left_right(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 1, 7), torch.zeros(1, 2, 2),
                          torch.tensor([True]), 3)


def test_mirror_prediction_undoes_the_mirror_of_the_maps():
    # A "prediction" that equals the mirrored target, mirrored back, is the original target (every map).
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(2, 6, 5, 3, 7, generator=gen)
    features, mask = torch.zeros(2, 1, 6, 5), torch.ones(2, 6, 5)
    _, mirrored, _ = mirror_left_right(features, target, mask, torch.tensor([True, True]), 2)
    maps = to_channel_first(mirrored)
    logits, confidence = torch.randn(2, 3, 6, 5, generator=gen), torch.rand(2, 3, 6, 5, generator=gen) + 1
    back = mirror_prediction(NetworkOutput(maps.canonical, maps.posed, logits, confidence), 2)
    original = to_channel_first(target)
    assert torch.equal(back.canonical, original.canonical) and torch.equal(back.posed, original.posed)
    assert torch.equal(back.occupancy_logit, logits.flip(-1)) and torch.equal(back.confidence, confidence.flip(-1))
