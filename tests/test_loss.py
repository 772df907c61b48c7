"""DualPM loss and metrics: hand-computed values, limits, gradients, empty batches, target layout helpers."""

from __future__ import annotations

import math

import pytest
import torch

from dualpm.errors import ConfigError, DatasetError
from dualpm.loss import LossConfig, dualpm_loss, dualpm_metrics
from dualpm.pointmaps import DualMaps, to_channel_first, to_channel_last
from dualpm.model import DualPMNet, ModelConfig, NetworkOutput, UNetConfig

LN2, LN3 = math.log(2.0), math.log(3.0)


def hand_case() -> tuple[NetworkOutput, torch.Tensor, torch.Tensor]:
    """B=1, H=1, W=3 pixels, L=2 layers.

    GT alpha  layer 1: [1, 1, 0]   layer 2: [1, 0, 0]   mask: [1, 1, 0]
    Occupied points (layer, pixel): (1,0), (1,1), (2,0). The rest get absurd predictions that must not count.
    Canonical error vectors: (1,0,0) |(0,2,0) |(1,1,1) -> squared 1, 4, 3
    Posed error vectors:     (0,0,0) |(0,0,1) |(2,0,0) -> squared 0, 1, 4
    Confidence:              2       | 4       | 1
    Occupancy logits (in-mask points (1,0),(1,1),(2,0),(2,1)): 0, ln 3, 0, -ln 3; out-of-mask ones 50.
    """
    target = torch.zeros(1, 1, 3, 2, 7)  # (B, H, W, L, 7)
    target[0, 0, :, :, 0:3] = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.25, 1.0], [0.0, 0.0, 0.0]])[:, None]
    target[0, 0, :, :, 3:6] = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5], [0.0, 0.0, 0.0]])[:, None]
    target[0, 0, :, 0, 6] = torch.tensor([1.0, 1.0, 0.0])
    target[0, 0, :, 1, 6] = torch.tensor([1.0, 0.0, 0.0])
    maps = to_channel_first(target)

    canonical = maps.canonical.clone()  # (1, 2, 3, 1, 3)
    canonical[0, 0, :, 0, 0] += torch.tensor([1.0, 0.0, 0.0])
    canonical[0, 0, :, 0, 1] += torch.tensor([0.0, 2.0, 0.0])
    canonical[0, 1, :, 0, 0] += torch.tensor([1.0, 1.0, 1.0])
    posed = maps.posed.clone()
    posed[0, 0, :, 0, 1] += torch.tensor([0.0, 0.0, 1.0])
    posed[0, 1, :, 0, 0] += torch.tensor([2.0, 0.0, 0.0])
    for pts in (canonical, posed):  # unoccupied points: far off, must be ignored
        pts[0, 0, :, 0, 2] = 100.0
        pts[0, 1, :, 0, 1:] = -100.0
    confidence = torch.tensor([[[[2.0, 4.0, 50.0]], [[1.0, 50.0, 50.0]]]])  # (1, 2, 1, 3)
    logits = torch.tensor([[[[0.0, LN3, 50.0]], [[0.0, -LN3, 50.0]]]])
    mask = torch.tensor([[[1.0, 1.0, 0.0]]])
    return NetworkOutput(canonical, posed, logits, confidence), target, mask


def test_hand_computed_loss():
    pred, target, mask = hand_case()
    terms = dualpm_loss(pred, target, mask)
    # canonical = mean of c*e - log c = [(2*1 - ln2) + (4*4 - ln4) + (1*3 - ln1)] / 3 = (21 - 3 ln2) / 3
    canonical = 7.0 - LN2
    # posed = [(2*0 - ln2) + (4*1 - ln4) + (1*4 - 0)] / 3 = (8 - 3 ln2) / 3
    posed = 8.0 / 3.0 - LN2
    # BCE(x, y) = log(1 + e^x) - x*y with labels clamped: 0.99 for occupied, 0.01 for empty.
    #   (1,0): x=0     y=.99 -> ln2
    #   (1,1): x=ln3   y=.99 -> ln4 - .99 ln3
    #   (2,0): x=0     y=.99 -> ln2
    #   (2,1): x=-ln3  y=.01 -> ln(4/3) + .01 ln3
    # mean over the 4 in-mask points = (6 ln2 - 1.98 ln3) / 4
    occupancy = (6 * LN2 - 1.98 * LN3) / 4
    assert terms.canonical.item() == pytest.approx(canonical, rel=1e-6)
    assert terms.posed.item() == pytest.approx(posed, rel=1e-6)
    assert terms.occupancy.item() == pytest.approx(occupancy, rel=1e-6)
    assert terms.total.item() == pytest.approx(0.5 * (canonical + posed) + occupancy, rel=1e-6)

    # Other weights: alpha=2 doubles each log c; occupancy_weight scales the BCE term only.
    config = LossConfig(alpha=2.0, occupancy_weight=0.5, label_clamp=(0.0, 1.0))
    terms = dualpm_loss(pred, target, mask, config)
    canonical2, posed2 = 7.0 - 2 * LN2, 8.0 / 3.0 - 2 * LN2
    # Unclamped labels: (1,1): ln4 - ln3;  (2,1): ln(4/3)  -> (6 ln2 - 2 ln3) / 4
    occupancy2 = (6 * LN2 - 2 * LN3) / 4
    assert terms.canonical.item() == pytest.approx(canonical2, rel=1e-6)
    assert terms.posed.item() == pytest.approx(posed2, rel=1e-6)
    assert terms.total.item() == pytest.approx(0.5 * (canonical2 + posed2) + 0.5 * occupancy2, rel=1e-6)


def test_hand_computed_euclidean_loss():
    # The hand case with plain distances: canonical |e| = 1, 2, sqrt 3; posed 0, 1, 2 (confidence 2, 4, 1).
    pred, target, mask = hand_case()
    terms = dualpm_loss(pred, target, mask, LossConfig(distance="euclidean"))
    canonical = ((2 * 1 - LN2) + (4 * 2 - 2 * LN2) + math.sqrt(3.0)) / 3
    posed = ((2 * 0 - LN2) + (4 * 1 - 2 * LN2) + 2) / 3
    assert terms.canonical.item() == pytest.approx(canonical, rel=1e-6)
    assert terms.posed.item() == pytest.approx(posed, rel=1e-6)
    assert terms.occupancy.item() == pytest.approx(dualpm_loss(pred, target, mask).occupancy.item(), rel=1e-6)


def test_euclidean_gradient_is_finite_at_zero_error():
    # A point predicted exactly (posed error 0 at (1,0)) and the absurd unoccupied points: no NaN anywhere,
    # and the exact point gets no pull.
    pred, target, mask = hand_case()
    posed = pred.posed.clone().requires_grad_(True)
    pred = NetworkOutput(pred.canonical, posed, pred.occupancy_logit, pred.confidence)
    dualpm_loss(pred, target, mask, LossConfig(distance="euclidean")).total.backward()
    assert torch.isfinite(posed.grad).all()
    assert posed.grad[0, 0, :, 0, 0].abs().max() == 0
    # (1,1): error (0,0,1), c = 4, 3 occupied points, total = 0.5 posed -> d/dz = 0.5 * 4 / 3
    assert posed.grad[0, 0, 2, 0, 1].item() == pytest.approx(2.0 / 3.0, rel=1e-6)


def test_perfect_prediction_with_unit_confidence_is_zero():
    pred, target, mask = hand_case()
    maps = to_channel_first(target)
    perfect = NetworkOutput(maps.canonical, maps.posed, pred.occupancy_logit, torch.ones_like(pred.confidence))
    terms = dualpm_loss(perfect, target, mask)
    assert terms.canonical.item() == 0.0 and terms.posed.item() == 0.0


def test_confidence_gradient_direction():
    # Two occupied pixels, c = 2 at both; squared errors 1e-4 (small) and 4 (large), canonical = posed.
    target = torch.zeros(1, 1, 2, 1, 7)
    target[..., 6] = 1.0
    canonical = torch.zeros(1, 1, 3, 1, 2)
    canonical[0, 0, 0, 0] = torch.tensor([0.01, 2.0])
    confidence = torch.full((1, 1, 1, 2), 2.0, requires_grad=True)
    pred = NetworkOutput(canonical, canonical.clone(), torch.zeros(1, 1, 1, 2), confidence)
    dualpm_loss(pred, target, torch.ones(1, 1, 2)).total.backward()
    grad = confidence.grad[0, 0, 0]
    # d total / d c_i = 0.5 * 2 * (e_i - 1/c) / N with N = 2 occupied points.
    assert grad.tolist() == pytest.approx([(1e-4 - 0.5) / 2, (4.0 - 0.5) / 2], rel=1e-5)
    assert grad[0] < 0 < grad[1]  # descent raises c where the error is small and lowers it where large


def test_empty_batch_is_finite_and_zero():
    net = DualPMNet(ModelConfig(in_channels=4, num_layers=2, unet=UNetConfig(
        base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_groups=4)))
    pred = net(torch.randn(2, 4, 6, 7))
    target = torch.zeros(2, 6, 7, 2, 7)
    for mask in (torch.zeros(2, 6, 7), torch.ones(2, 6, 7)):
        terms = dualpm_loss(pred, target, mask)
        assert terms.canonical.item() == 0.0 and terms.posed.item() == 0.0
        assert torch.isfinite(terms.total)
    assert dualpm_loss(pred, target, torch.zeros(2, 6, 7)).total.item() == 0.0
    terms.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    metrics = dualpm_metrics(pred, target, torch.zeros(2, 6, 7))
    assert metrics["iou/l1"] == 1.0 and math.isnan(metrics["err_canon/l1"])


def test_metrics_known_case():
    # B=1, H=1, W=4, L=2. Layer 1 GT [1,1,0,0]; predicted occupied [1,0,1,1] but pixel 3 is outside the mask.
    target = torch.zeros(1, 1, 4, 2, 7)
    target[0, 0, :, 0, 6] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    target[0, 0, :2, 0, 0:3] = 1.0
    maps = to_channel_first(target)
    canonical, posed = maps.canonical.clone(), maps.posed.clone()
    canonical[0, 0, :, 0, 0] += torch.tensor([3.0, 4.0, 0.0])  # distance 5
    canonical[0, 0, :, 0, 1] += torch.tensor([0.0, 0.0, 1.0])  # distance 1
    posed[0, 0, :, 0, 1] += torch.tensor([0.0, 0.0, -2.0])  # distances 0 and 2
    canonical[0, :, :, 0, 2:] = 9.0  # unoccupied: ignored
    logits = torch.full((1, 2, 1, 4), -5.0)
    logits[0, 0, 0] = torch.tensor([5.0, -5.0, 5.0, 5.0])  # sigmoid(5) = .993, sigmoid(-5) = .007
    mask = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])
    pred = NetworkOutput(canonical, posed, logits, torch.full((1, 2, 1, 4), 2.0))
    m = dualpm_metrics(pred, target, mask)
    assert m["iou/l1"] == pytest.approx(1 / 3)  # intersection {0}, union {0, 1, 2}
    assert m["iou/l2"] == 1.0  # both empty
    assert m["err_canon/l1"] == pytest.approx(3.0)  # (5 + 1) / 2
    assert m["err_posed/l1"] == pytest.approx(1.0)  # (0 + 2) / 2
    assert math.isnan(m["err_canon/l2"]) and math.isnan(m["err_posed/l2"])
    loss = dualpm_loss(pred, target, mask).as_floats()
    assert {k: m[k] for k in loss} == loss
    assert dualpm_metrics(pred, target, mask, occupancy_threshold=0.999)["iou/l1"] == 0.0


def test_split_merge_round_trip():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 5, 6, 3, 7, generator=gen)
    maps = to_channel_first(target)
    assert maps.canonical.shape == (2, 3, 3, 5, 6) and maps.alpha.shape == (2, 3, 5, 6)
    assert torch.equal(maps.posed[1, 2, :, 4, 5], target[1, 4, 5, 2, 3:6])
    assert torch.equal(to_channel_last(maps), target)
    first = to_channel_first(target, num_layers=2)
    assert torch.equal(to_channel_last(first), target[:, :, :, :2])
    assert isinstance(first, DualMaps)
    with pytest.raises(ConfigError, match="4 layers requested"):
        to_channel_first(target, num_layers=4)
    with pytest.raises(DatasetError, match=r"\(B, H, W, L, 7\)"):
        to_channel_first(target[..., :6])


def test_shape_mismatch_errors():
    pred, target, mask = hand_case()
    with pytest.raises(ConfigError, match="predicts 2 layers"):
        dualpm_loss(pred, target[:, :, :, :1], mask)
    with pytest.raises(DatasetError, match="mask must have shape"):
        dualpm_loss(pred, target, mask[0])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"occupancy_weight": -0.5}, "occupancy_weight"),
        ({"label_clamp": (0.9, 0.1)}, "label_clamp"),
        ({"label_clamp": (0.0, 1.5)}, "label_clamp"),
        ({"label_clamp": (0.1,)}, "label_clamp"),
        ({"distance": "l1"}, "distance"),
    ],
)
def test_loss_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        LossConfig(**kwargs)
