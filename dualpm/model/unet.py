"""A DDPM++-style U-Net for dense regression (written for this project, no diffusion timestep).

Layout (levels = len(channel_mult), channels c_i = base_channels * channel_mult[i]):

    conv_in 3x3 -> base
    encoder, level i:  [ResBlock(down) if i > 0], num_res_blocks x ResBlock (+ Attention if attention level)
    middle:            ResBlock, [Attention if the lowest level is an attention level], ResBlock
    decoder, level i:  (num_res_blocks + 1) x ResBlock on [h, skip] (+ Attention), [ResBlock(up) if i > 0]
    GroupNorm, SiLU, conv_out 3x3 -> out_channels (zero-initialised, see `UNet`)

Every encoder output (conv_in, each block, each down block) is pushed on a skip stack; the decoder pops one
per block, so the decoder's (num_res_blocks + 1) blocks per level consume exactly what that level pushed.
Resampling is a 2x2 box filter down (average pooling) and nearest-neighbour up, as DDPM++ does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dualpm.errors import ConfigError

# Both branches of a residual sum are ~unit variance; scaling the sum by 1/sqrt(2) keeps it so (DDPM++).
SKIP_SCALE = 1.0 / math.sqrt(2.0)


def _is_int(value: object) -> bool:
    # bool is an int subclass; `True` as a channel count is a config mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of one U-Net stage (reference values are the defaults)."""

    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (3,)  # indices into channel_mult; reference: lowest resolution
    dropout: float = 0.1
    num_groups: int = 32  # GroupNorm groups, lowered per layer to the largest divisor of its channel count
    attention_heads: int = 1

    def __post_init__(self) -> None:
        # YAML gives lists; store tuples so the config stays hashable and immutable.
        for name in ("channel_mult", "attention_levels"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
                raise ConfigError(f"UNetConfig.{name} must be a list of integers, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("base_channels", "num_res_blocks", "num_groups", "attention_heads"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"UNetConfig.{name} must be an integer >= 1, got {value!r}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(
                f"UNetConfig.channel_mult must be non-empty positive integers, got {self.channel_mult}"
            )
        levels = len(self.channel_mult)
        bad = [i for i in self.attention_levels if not 0 <= i < levels]
        if bad or len(set(self.attention_levels)) != len(self.attention_levels):
            raise ConfigError(
                f"UNetConfig.attention_levels must be distinct indices in 0..{levels - 1} "
                f"(one per channel_mult entry), got {self.attention_levels}"
            )
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ConfigError(f"UNetConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        for i in self.attention_levels:
            channels = self.base_channels * self.channel_mult[i]
            if channels % self.attention_heads:
                raise ConfigError(
                    f"UNetConfig.attention_heads={self.attention_heads} does not divide the "
                    f"{channels} channels of attention level {i}"
                )

    def level_channels(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_mult]


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= num_groups that divides `channels`."""
    groups = max(g for g in range(1, min(num_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """norm-SiLU-[resample]-conv3x3, norm-SiLU-dropout-conv3x3, plus a (resampled, projected) skip."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, resample: str | None = None):
        super().__init__()
        self.resample = resample  # None, "down" or "up"
        self.norm1 = group_norm(cin, cfg.num_groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cout, cfg.num_groups)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # Zero-init the residual branch so each block starts as (scaled) identity: deep stacks train stably.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self._resample(F.silu(self.norm1(x))))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(self._resample(x)) + h) * SKIP_SCALE


class Attention(nn.Module):
    """Multi-head self-attention over all H*W positions, residual, output projection zero-initialised."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.heads = cfg.attention_heads
        self.norm = group_norm(channels, cfg.num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)  # (B, 3, heads, d, HW)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(out)) * SKIP_SCALE


class UNet(nn.Module):
    """DDPM++-style U-Net mapping (B, Cin, H, W) to (B, Cout, H, W) for any H, W.

    The output convolution is zero-initialised: every output starts at exactly 0, the neutral value for
    all heads here (object-centred points at the centre, occupancy probability 0.5, confidence 1 + e^0 = 2),
    so the first loss reflects the data rather than random weights and exp(confidence) cannot start huge.
    Training is not stalled: the gradient of the output conv's weights is its non-zero input activations.
    """

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig = UNetConfig()):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not _is_int(value) or value < 1:
                raise ConfigError(f"UNet {name} must be an integer >= 1, got {value!r}")
        cfg = config
        chans = cfg.level_channels()
        self.levels = len(chans)
        self.conv_in = nn.Conv2d(in_channels, cfg.base_channels, 3, padding=1)

        skips = [cfg.base_channels]  # channel count of every tensor pushed on the skip stack
        c = cfg.base_channels
        self.down = nn.ModuleList()
        for i, ci in enumerate(chans):
            blocks = nn.ModuleList()
            if i > 0:
                blocks.append(ResBlock(c, c, cfg, resample="down"))
                skips.append(c)
            for _ in range(cfg.num_res_blocks):
                blocks.append(self._block(c, ci, i, cfg))
                c = ci
                skips.append(c)
            self.down.append(blocks)

        lowest = self.levels - 1
        self.mid = nn.Sequential(
            ResBlock(c, c, cfg),
            Attention(c, cfg) if lowest in cfg.attention_levels else nn.Identity(),
            ResBlock(c, c, cfg),
        )

        self.up = nn.ModuleList()
        for i in reversed(range(self.levels)):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(self._block(c + skips.pop(), chans[i], i, cfg))
                c = chans[i]
            if i > 0:
                blocks.append(ResBlock(c, c, cfg, resample="up"))
            self.up.append(blocks)

        self.norm_out = group_norm(c, cfg.num_groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def _block(cin: int, cout: int, level: int, cfg: UNetConfig) -> nn.Module:
        res = ResBlock(cin, cout, cfg)
        return nn.Sequential(res, Attention(cout, cfg)) if level in cfg.attention_levels else res

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the network.

        Args:
            x: (B, Cin, H, W) floating point, any device, any H, W >= 1, contiguous or channels_last.
        Returns:
            (B, Cout, H, W), same dtype/device as the network computes in (autocast applies).
        """
        h_in, w_in = x.shape[-2:]
        # Each level below the first halves H and W; sizes that are not multiples of 2**(levels - 1) would
        # floor on the way down and no longer match their skips on the way up. Pad bottom/right by edge
        # replication (features continue, no artificial zero border; works even for 1-pixel inputs) and
        # crop the output back.
        m = 2 ** (self.levels - 1)
        pad_h, pad_w = -h_in % m, -w_in % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")

        h = self.conv_in(x)
        stack = [h]
        for blocks in self.down:
            for block in blocks:
                h = block(h)
                stack.append(h)
        h = self.mid(h)
        for blocks in self.up:
            for block in blocks:
                # Up-sampling blocks take no skip; every other decoder block concatenates one.
                is_up = isinstance(block, ResBlock) and block.resample == "up"
                h = block(h) if is_up else block(torch.cat([h, stack.pop()], dim=1))
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h[..., :h_in, :w_in]
