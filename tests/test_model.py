"""U-Net and two-stage DualPM network: shapes, channel layout, detach, confidence, counts, precision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dualpm.errors import ConfigError
from dualpm.model import (
    CONFIDENCE_RAW_MAX,
    DualPMNet,
    ModelConfig,
    UNet,
    UNetConfig,
    confidence_from_raw,
    count_parameters,
    describe,
)

TINY = UNetConfig(
    base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(2,), num_groups=8
)


def tiny_net(num_layers: int = 2, in_channels: int = 6, seed: int = 0) -> DualPMNet:
    torch.manual_seed(seed)
    return DualPMNet(ModelConfig(in_channels=in_channels, num_layers=num_layers, unet=TINY))


def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give the zero-initialised layers random weights so every path carries signal and gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4])
def test_output_shapes_odd_size(num_layers):
    net = tiny_net(num_layers)
    pred = net(torch.randn(2, 6, 37, 45))
    assert pred.canonical.shape == (2, num_layers, 3, 37, 45)
    assert pred.posed.shape == (2, num_layers, 3, 37, 45)
    assert pred.occupancy_logit.shape == (2, num_layers, 37, 45)
    assert pred.confidence.shape == (2, num_layers, 37, 45)
    assert all(t.dtype == torch.float32 for t in vars(pred).values())


@pytest.mark.parametrize("size", [(1, 1), (5, 64), (32, 32), (17, 3)])
def test_unet_any_size(size):
    torch.manual_seed(0)
    unet = randomise(UNet(4, 7, TINY)).eval()
    out = unet(torch.randn(1, 4, *size))
    assert out.shape == (1, 7, *size)
    assert torch.isfinite(out).all()


def test_fresh_model_outputs_are_neutral():
    # Zero-initialised output convs: points 0, occupancy probability 0.5, confidence 1 + e^0 = 2, exactly.
    pred = tiny_net(3)(torch.randn(2, 6, 9, 10))
    assert torch.equal(pred.canonical, torch.zeros(2, 3, 3, 9, 10))
    assert torch.equal(pred.posed, torch.zeros(2, 3, 3, 9, 10))
    assert torch.equal(pred.occupancy_logit, torch.zeros(2, 3, 9, 10))
    assert torch.equal(pred.confidence, torch.full((2, 3, 9, 10), 2.0))


def test_stage2_channel_layout():
    # Constant outputs equal to the channel index reveal where each stage-2 channel lands.
    net = tiny_net(num_layers=3)
    with torch.no_grad():
        net.stage1.conv_out.bias.copy_(torch.tensor([-1.0, -2.0, -3.0]))
        # channel k -> k / 4 (small, so exp() of the confidence channels stays exact enough)
        net.stage2.conv_out.bias.copy_(torch.arange(5 + 8 * 2, dtype=torch.float32) / 4)
    pred = net(torch.randn(1, 6, 4, 5))
    at = lambda t: t[0, ..., 2, 3].tolist()  # noqa: E731  (one pixel; all are equal)
    assert at(pred.canonical) == [[-1.0, -2.0, -3.0], [1.25, 1.5, 1.75], [3.25, 3.5, 3.75]]
    assert at(pred.posed) == [[0.0, 0.25, 0.5], [2.0, 2.25, 2.5], [4.0, 4.25, 4.5]]
    assert at(pred.occupancy_logit) == [0.75, 2.75, 4.75]
    want = [1 + math.exp(1.0), 1 + math.exp(3.0), 1 + math.exp(5.0)]
    assert at(pred.confidence) == pytest.approx(want, rel=1e-6)


def test_stage2_sees_detached_stage1():
    net = randomise(tiny_net(num_layers=2))
    x = torch.randn(2, 6, 12, 12)
    pred = net(x)
    # Everything except layer-1 canonical comes from stage 2.
    loss = pred.posed.square().sum() + pred.occupancy_logit.sum() + pred.confidence.sum()
    loss = loss + pred.canonical[:, 1:].square().sum()
    loss.backward()
    # cat() hands stage 1's slot an all-zero gradient; what matters is that nothing non-zero arrives.
    assert all(p.grad is None or not p.grad.any() for p in net.stage1.parameters())
    assert all(p.grad is not None for p in net.stage2.parameters())
    assert net.stage2.conv_in.weight.grad[:, -3:].abs().sum() > 0  # the stage-1 input channels are used

    # Control: without the detach the same loss would reach stage 1, so the check above can fail.
    net.zero_grad(set_to_none=True)
    canon1 = net.stage1(x)
    net.stage2(torch.cat([x, canon1], dim=1)).square().sum().backward()
    assert net.stage1.conv_in.weight.grad.abs().sum() > 0

    # And stage 1 is trained by its own output.
    net.zero_grad(set_to_none=True)
    net(x).canonical[:, 0].square().sum().backward()
    assert net.stage1.conv_in.weight.grad.abs().sum() > 0


def test_confidence_extreme_raw():
    raw = torch.tensor([-float("inf"), -1e30, -100.0, 0.0, 1.0, 88.0, 89.0, 1e4, 1e30, float("inf")])
    for dtype in (torch.float32, torch.bfloat16):
        c = confidence_from_raw(raw.to(dtype))
        assert c.dtype == torch.float32
        assert torch.isfinite(c).all() and (c >= 1).all()
        assert c[0] == 1.0 and c[3] == 2.0
        assert c[-1] == pytest.approx(1 + math.exp(CONFIDENCE_RAW_MAX), rel=1e-6)
        assert torch.isfinite(torch.log(c)).all()
    # Through the network: a huge confidence bias still gives finite confidence.
    net = tiny_net(1)
    with torch.no_grad():
        net.stage2.conv_out.bias[4] = 1e6
    assert torch.isfinite(net(torch.randn(1, 6, 8, 8)).confidence).all()


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout


def _res(cin: int, cout: int) -> int:
    # GroupNorm(cin), conv3x3, GroupNorm(cout), conv3x3, 1x1 skip projection when channels change
    skip = _conv(cin, cout, 1) if cin != cout else 0
    return 2 * cin + _conv(cin, cout, 3) + 2 * cout + _conv(cout, cout, 3) + skip


def _attn(c: int) -> int:
    return 2 * c + _conv(c, 3 * c, 1) + _conv(c, c, 1)


def _unet_params(cin: int, cout: int, base: int, mult: tuple, blocks: int, attn: tuple) -> int:
    """Independent count of the documented layout (see dualpm/model/unet.py docstring)."""
    chans = [base * m for m in mult]
    total, c, skips = _conv(cin, base, 3), base, [base]
    for i, ci in enumerate(chans):
        if i > 0:
            total += _res(c, c)
            skips.append(c)
        for _ in range(blocks):
            total += _res(c, ci) + (_attn(ci) if i in attn else 0)
            c = ci
            skips.append(c)
    total += 2 * _res(c, c) + (_attn(c) if len(chans) - 1 in attn else 0)
    for i in reversed(range(len(chans))):
        for _ in range(blocks + 1):
            total += _res(c + skips.pop(), chans[i]) + (_attn(chans[i]) if i in attn else 0)
            c = chans[i]
        if i > 0:
            total += _res(c, c)
    return total + 2 * c + _conv(c, cout, 3)


def test_reference_parameter_count():
    net = DualPMNet(ModelConfig(in_channels=64, num_layers=4, unet=UNetConfig()))
    # stage 1: 64 -> 3; stage 2: 64 + 3 -> 5 + 8 * 3 = 29
    ref = ((1, 2, 2, 2), 2, (3,))
    expected = _unet_params(64, 3, 128, *ref) + _unet_params(67, 29, 128, *ref)
    print(describe(net), count_parameters(net))
    assert count_parameters(net) == expected == 72_094_624
    assert describe(net) == "DualPMNet: 2 x UNet(128, (1, 2, 2, 2), attn (3,)), in 64, L=4, 72.1M parameters"


def test_tiny_parameter_count_independent():
    net = tiny_net(num_layers=3, in_channels=5)
    expected = _unet_params(5, 3, 16, (1, 2, 2), 1, (2,)) + _unet_params(8, 21, 16, (1, 2, 2), 1, (2,))
    assert count_parameters(net) == expected


def test_bf16_autocast_cpu():
    net = randomise(tiny_net(2)).eval()
    x = torch.randn(2, 6, 12, 10)
    ref = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = net(x)
    assert not torch.equal(pred.posed, ref.posed)  # autocast really ran in bf16
    for name, value in vars(pred).items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
        want = getattr(ref, name)
        # bf16 has an 8-bit mantissa: a few percent of the output scale.
        assert (value - want).abs().max() <= 0.05 * want.abs().max() + 1e-3, name


def test_channels_last_matches_contiguous():
    net = randomise(tiny_net(3)).eval()
    x = torch.randn(2, 6, 19, 26)
    ref = net(x)
    net_cl = net.to(memory_format=torch.channels_last)
    pred = net_cl(x.to(memory_format=torch.channels_last))
    for name, value in vars(pred).items():
        torch.testing.assert_close(value, getattr(ref, name), atol=1e-5, rtol=1e-5)


def test_eval_is_deterministic_train_uses_dropout():
    net = randomise(tiny_net(2))
    x = torch.randn(1, 6, 16, 16)
    net.eval()
    a, b = net(x), net(x)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in vars(a))
    net.train()
    torch.manual_seed(0)
    c = net(x)
    assert not torch.equal(c.posed, a.posed)  # dropout 0.1 is active in training mode


def test_group_count_clamped():
    # 24 channels with 32 requested groups -> 24 groups; 40 channels with 32 -> 20 (largest divisor <= 32).
    cfg = UNetConfig(base_channels=24, channel_mult=(1,), num_res_blocks=1, attention_levels=())
    assert UNet(3, 2, cfg).conv_in.out_channels == 24
    assert UNet(3, 2, cfg).norm_out.num_groups == 24
    cfg = UNetConfig(base_channels=40, channel_mult=(1,), num_res_blocks=1, attention_levels=())
    assert UNet(3, 2, cfg).norm_out.num_groups == 20


def _attention_by_hand(block: nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention written out head by head in float64 numpy (softmax(q k^T / sqrt(d)) v)."""
    b, c, h, w = x.shape
    d = c // heads
    normed = block.norm(x).detach().double().numpy().reshape(b, c, h * w)  # (B, C, HW)
    wqkv = block.qkv.weight.detach().double().numpy()[:, :, 0, 0]  # (3C, C)
    qkv = np.einsum("oc,bcn->bon", wqkv, normed) + block.qkv.bias.detach().double().numpy()[None, :, None]
    q, k, v = qkv[:, :c], qkv[:, c:2 * c], qkv[:, 2 * c:]  # each (B, C, HW); head j = channels j*d .. (j+1)*d
    out = np.zeros((b, c, h * w))
    for j in range(heads):
        part = slice(j * d, (j + 1) * d)
        logits = np.einsum("bdn,bdm->bnm", q[:, part], k[:, part]) / math.sqrt(d)  # (B, HW queries, HW keys)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[:, part] = np.einsum("bnm,bdm->bdn", weights, v[:, part])
    wp = block.proj.weight.detach().double().numpy()[:, :, 0, 0]
    projected = np.einsum("oc,bcn->bon", wp, out) + block.proj.bias.detach().double().numpy()[None, :, None]
    return torch.from_numpy((x.double().numpy() + projected.reshape(b, c, h, w)) / math.sqrt(2.0))


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_heads_split_the_channels(heads):
    cfg = UNetConfig(
        base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0, 1), num_groups=8,
        attention_heads=heads,
    )
    torch.manual_seed(0)
    unet = randomise(UNet(3, 2, cfg)).eval()
    blocks = [m for m in unet.modules() if type(m).__name__ == "Attention"]
    assert len(blocks) >= 2
    x = torch.randn(2, blocks[0].qkv.in_channels, 3, 5)
    with torch.no_grad():
        torch.testing.assert_close(blocks[0](x).double(), _attention_by_hand(blocks[0], x, heads), atol=1e-5, rtol=1e-5)
        if heads > 1:  # the same weights read as one head give another answer: heads are not ignored
            single = _attention_by_hand(blocks[0], x, 1)
            assert (blocks[0](x).double() - single).abs().max() > 1e-3
    # YAML lists become tuples
    assert UNetConfig(channel_mult=[1, 2], attention_levels=[1]).channel_mult == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"base_channels": 0}, "base_channels"),
        ({"base_channels": True}, "base_channels"),
        ({"channel_mult": ()}, "channel_mult"),
        ({"channel_mult": (1, 0)}, "channel_mult"),
        ({"channel_mult": (1, 2.5)}, "channel_mult"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"attention_levels": (4,)}, "attention_levels"),
        ({"attention_levels": (3, 3)}, "attention_levels"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"num_groups": 0}, "num_groups"),
        ({"attention_heads": 3}, "attention_heads"),
    ],
)
def test_unet_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        UNetConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"in_channels": 0}, "in_channels"), ({"num_layers": 0}, "num_layers"), ({"unet": {"a": 1}}, "unet")],
)
def test_model_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**kwargs)


def test_wrong_feature_channels():
    with pytest.raises(ConfigError, match="expects features"):
        tiny_net(in_channels=6)(torch.randn(1, 5, 8, 8))


@pytest.mark.gpu
def test_cuda_bf16_channels_last():
    net = randomise(tiny_net(4)).cuda().eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 37, 45, device="cuda").to(memory_format=torch.channels_last)
    ref = net(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pred = net(x)
    for name, value in vars(pred).items():
        want = getattr(ref, name)
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
        assert (value - want).abs().max() <= 0.05 * want.abs().max() + 1e-3, name
