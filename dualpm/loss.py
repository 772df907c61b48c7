"""DualPM training loss (confidence-weighted point loss + soft-label occupancy BCE) and evaluation metrics.

Averaging, exactly (B batch, L layers, H x W pixels; a "point" is one (b, l, i, j)):

- point terms: for each point that is ground-truth occupied (alpha > 0.5) in ANY layer,
  canonical = mean over those points of  c * d(p_canon, p*_canon) - alpha_reg * log c,  posed likewise,
  with d = ||p - p*||^2 (`distance: squared`, the reference) or ||p - p*|| (`distance: euclidean`, the
  original DUSt3R form).
  All occupied points of all images and layers are pooled with equal weight, so a layer contributes in
  proportion to how many pixels it covers (deep layers are sparse and weigh less).
- occupancy = mean over (b, l, i, j) with mask[b, i, j] > 0.5 (all L layers of every in-mask pixel) of
  BCE-with-logits(logit, clamp(alpha, *label_clamp)).
- total = 0.5 * (canonical + posed) + occupancy_weight * occupancy.

Empty selections (no occupied point, or an empty mask) give that term exactly 0 with zero gradient, never NaN:
such a batch carries no information for the term, so it must not move the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dualpm.errors import ConfigError, DatasetError
from dualpm.model.dualpm import NetworkOutput
from dualpm.pointmaps import DualMaps, to_channel_first


DISTANCES = ("squared", "euclidean")


@dataclass(frozen=True)
class LossConfig:
    alpha: float = 1.0  # weight of the -log c confidence regulariser (DUSt3R)
    occupancy_weight: float = 1.0
    label_clamp: tuple[float, float] = (0.01, 0.99)  # soft occupancy labels
    # Point distance in the confidence loss: "squared" (reference) or "euclidean" (DUSt3R's). Euclidean pulls
    # less towards the mean of ambiguous targets, so depth is less blurred: on the CPU demo, held-out Chamfer
    # ratio 0.477 vs 0.528 after 2,250 steps (docs/benchmarks.md, "Demo learning check").
    distance: str = "squared"

    def __post_init__(self) -> None:
        for name in ("alpha", "occupancy_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"LossConfig.{name} must be a number >= 0, got {value!r}")
        lc = self.label_clamp
        if not isinstance(lc, (list, tuple)) or len(lc) != 2 or not 0.0 <= lc[0] < lc[1] <= 1.0:
            raise ConfigError(
                f"LossConfig.label_clamp must be (low, high) with 0 <= low < high <= 1, got {lc!r}"
            )
        object.__setattr__(self, "label_clamp", (float(lc[0]), float(lc[1])))
        if self.distance not in DISTANCES:
            raise ConfigError(f"LossConfig.distance must be one of {DISTANCES}, got {self.distance!r}")


def _check(pred: NetworkOutput, maps: DualMaps, mask: torch.Tensor) -> None:
    b, num_layers, _, h, w = pred.canonical.shape
    tb, tl, th, tw = maps.alpha.shape
    if maps.canonical.shape != pred.canonical.shape:
        raise ConfigError(
            f"the model predicts {num_layers} layers at {h}x{w} for {b} images but the target holds "
            f"{tl} layers at {th}x{tw} for {tb}"
        )
    if mask.shape != (b, h, w):
        raise DatasetError(f"mask must have shape {(b, h, w)}, got {tuple(mask.shape)}")


@dataclass
class LossTerms:
    """Scalar float32 tensors (differentiable)."""

    total: torch.Tensor
    canonical: torch.Tensor
    posed: torch.Tensor
    occupancy: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        """{"loss/total": ..., "loss/canonical": ..., ...} as Python floats, for logging."""
        values = torch.stack([self.total, self.canonical, self.posed, self.occupancy]).detach().tolist()
        names = ("loss/total", "loss/canonical", "loss/posed", "loss/occupancy")
        return dict(zip(names, values, strict=True))


def _masked_mean(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    # where() (not multiply): non-finite values at unselected points cannot leak NaN. count >= 1: empty -> 0.
    return torch.where(select, values, 0.0).sum() / select.sum().clamp(min=1)


def _distance(diff: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, L, 3, H, W) point differences -> (B, L, H, W) squared or plain Euclidean distances."""
    if kind == "squared":
        return diff.square().sum(dim=2)
    return torch.linalg.vector_norm(diff, dim=2)  # its gradient at a zero difference is 0, not NaN


def dualpm_loss(
    pred: NetworkOutput, target: torch.Tensor, mask: torch.Tensor, config: LossConfig = LossConfig()
) -> LossTerms:
    """DualPM loss (see the module docstring for exactly how it averages).

    Args:
        pred: network output (float32, channel-first; L layers at H x W).
        target: (B, H, W, L, 7) float32 dual point maps on pred's device (scene units; alpha in [0, 1]).
        mask: (B, H, W) float object mask in {0, 1} on pred's device.
    """
    maps = to_channel_first(target)
    _check(pred, maps, mask)
    occupied = maps.alpha > 0.5  # (B, L, H, W)
    c = pred.confidence
    reg = config.alpha * torch.log(c)
    err_canon = _distance(pred.canonical - maps.canonical, config.distance)  # (B, L, H, W)
    err_posed = _distance(pred.posed - maps.posed, config.distance)
    canonical = _masked_mean(c * err_canon - reg, occupied)
    posed = _masked_mean(c * err_posed - reg, occupied)

    lo, hi = config.label_clamp
    bce = F.binary_cross_entropy_with_logits(pred.occupancy_logit, maps.alpha.clamp(lo, hi), reduction="none")
    inside = (mask > 0.5)[:, None].expand_as(occupied)  # (B, L, H, W): every layer of every in-mask pixel
    occupancy = _masked_mean(bce, inside)
    total = 0.5 * (canonical + posed) + config.occupancy_weight * occupancy
    return LossTerms(total=total, canonical=canonical, posed=posed, occupancy=occupancy)


@torch.no_grad()
def dualpm_metrics(
    pred: NetworkOutput,
    target: torch.Tensor,
    mask: torch.Tensor,
    occupancy_threshold: float = 0.5,
    config: LossConfig = LossConfig(),
) -> dict[str, float]:
    """Per-layer metrics over the whole batch (pooled), plus the loss terms.

    Args: as `dualpm_loss`; occupancy_threshold applies to sigmoid(occupancy_logit).
    Returns (k = 1..L):
        iou/l{k}: |P & G| / |P | G| with P = sigmoid(logit) > threshold inside the mask, G = alpha > 0.5;
            1.0 when both are empty (prediction and truth agree the layer is empty).
        err_canon/l{k}, err_posed/l{k}: mean Euclidean distance (scene units) over G; NaN when G is empty
            (nothing to measure; aggregate batches with nanmean).
        loss/total, loss/canonical, loss/posed, loss/occupancy.
    """
    maps = to_channel_first(target)
    _check(pred, maps, mask)
    gt = maps.alpha > 0.5  # (B, L, H, W)
    predicted = (torch.sigmoid(pred.occupancy_logit) > occupancy_threshold) & (mask > 0.5)[:, None]
    dims = (0, 2, 3)  # pool batch and pixels, keep layers
    inter = (predicted & gt).sum(dims)
    union = (predicted | gt).sum(dims)
    iou = torch.where(union > 0, inter / union.clamp(min=1), 1.0)
    count = gt.sum(dims)
    nan = torch.tensor(float("nan"), device=count.device)

    def mean_error(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dist = torch.linalg.vector_norm(p - t, dim=2)  # (B, L, H, W)
        return torch.where(count > 0, torch.where(gt, dist, 0.0).sum(dims) / count.clamp(min=1), nan)

    err_canon = mean_error(pred.canonical, maps.canonical)
    per_layer = torch.stack([iou, err_canon, mean_error(pred.posed, maps.posed)])  # (3, L)
    metrics: dict[str, float] = {}
    for name, values in zip(("iou", "err_canon", "err_posed"), per_layer.tolist(), strict=True):
        metrics.update({f"{name}/l{k + 1}": v for k, v in enumerate(values)})
    metrics.update(dualpm_loss(pred, target, mask, config).as_floats())
    return metrics
