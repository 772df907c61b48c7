"""PCA bases: fitted once on a sample of the dataset, stored with it, used by every worker.

`PCABasis` is one linear reduction (mean, components, explained variance). `FeatureBasis` is the
named set of them an extractor needs (sd-dino: three decoder-block PCAs and the final one) with
string metadata (the spec it was fitted for, the weights' fingerprint), saved as one safetensors
file. Tensor keys are `<stage>.mean`, `<stage>.components`, `<stage>.explained_variance`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from dualpm.errors import ConfigError, DatasetError
from dualpm.fileio import atomic_output

_PARTS = ("mean", "components", "explained_variance")


@dataclass(frozen=True)
class PCABasis:
    """One PCA reduction from D to k channels.

    mean:               (D,) float32, CPU.
    components:         (D, k) float32, CPU; orthonormal columns, by decreasing variance; the sign of
                        each column is fixed (its largest-magnitude entry is positive) so refits agree.
    explained_variance: (k,) float32, CPU; variance of the sample along each component.
    """

    mean: Tensor
    components: Tensor
    explained_variance: Tensor

    @classmethod
    def fit(cls, samples: Tensor, k: int, seed: int = 0, niter: int = 6) -> PCABasis:
        """Fit on rows of `samples` with `torch.pca_lowrank` (randomised, seeded: deterministic).

        Args:
            samples: (N, D) float tensor, any device (the fit runs on the CPU in float32).
            k: components to keep, 1 <= k <= min(N, D).
            seed: seed of the randomised range finder.
            niter: subspace iterations (more: closer to the exact SVD).
        """
        x = samples.detach().to("cpu", torch.float32)
        if x.ndim != 2:
            raise ValueError(f"PCA samples must be (N, D), got {tuple(x.shape)}")
        n, d = x.shape
        if not 1 <= k <= d:
            raise ConfigError(f"cannot keep {k} PCA components of {d}-channel features")
        if n < k:
            raise DatasetError(f"too few samples to fit {k} PCA components: {n} feature vectors")
        if not torch.isfinite(x).all():
            raise DatasetError("feature sample for the PCA contains NaN or infinite values")
        mean = x.mean(dim=0)
        centered = x - mean
        q = min(k + 8, n, d)  # a few extra directions make the randomised estimate of the top k accurate
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, s, v = torch.pca_lowrank(centered, q=q, center=False, niter=niter)
        comps = v[:, :k].contiguous()
        # Fix each column's sign: largest-magnitude entry positive.
        idx = comps.abs().argmax(dim=0)
        signs = torch.sign(comps[idx, torch.arange(k)])
        comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
        var = s[:k] ** 2 / max(n - 1, 1)
        return cls(mean=mean.contiguous(), components=comps, explained_variance=var.contiguous())

    @property
    def in_channels(self) -> int:
        return self.components.shape[0]

    @property
    def out_channels(self) -> int:
        return self.components.shape[1]

    def project(self, x: Tensor) -> Tensor:
        """Reduce feature maps: (B, D, h, w) float on any device -> (B, k, h, w) float32, same device."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, h, w) features, got {tuple(x.shape)}")
        mean = self.mean.to(x.device)[None, :, None, None]
        return torch.einsum("bdhw,dk->bkhw", x.float() - mean, self.components.to(x.device))

    def project_rows(self, rows: Tensor) -> Tensor:
        """Reduce feature vectors: (N, D) float -> (N, k) float32 on the same device."""
        return (rows.float() - self.mean.to(rows.device)) @ self.components.to(rows.device)


@dataclass(frozen=True)
class FeatureBasis:
    """Named PCA stages plus string metadata: everything a worker needs besides the models.

    An empty `stages` mapping is the identity (extractors without PCA, e.g. rgb).
    """

    stages: Mapping[str, PCABasis]
    meta: Mapping[str, str]

    def tensors(self) -> dict[str, Tensor]:
        """Flat `<stage>.<part>` -> tensor dict (what is stored)."""
        out = {}
        for name, basis in self.stages.items():
            if "." in name or not name:
                raise ValueError(f"PCA stage names must be non-empty and dot-free, got {name!r}")
            for part in _PARTS:
                out[f"{name}.{part}"] = getattr(basis, part).contiguous()
        return out

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, Tensor], meta: Mapping[str, str], source: str = "feature basis"
    ) -> FeatureBasis:
        """Inverse of `tensors`; checks every stage is complete and consistently shaped."""
        names = sorted({key.rsplit(".", 1)[0] for key in tensors})
        stages = {}
        for name in names:
            parts = {}
            for part in _PARTS:
                key = f"{name}.{part}"
                if key not in tensors:
                    raise DatasetError(f"{source}: PCA stage {name!r} lacks {key}")
                parts[part] = tensors[key].to("cpu", torch.float32)
            basis = PCABasis(**parts)
            d, k = basis.components.shape if basis.components.ndim == 2 else (-1, -1)
            shapes_ok = basis.mean.shape == (d,) and basis.explained_variance.shape == (k,)
            if basis.components.ndim != 2 or not shapes_ok:
                raise DatasetError(f"{source}: PCA stage {name!r} has inconsistent shapes")
            stages[name] = basis
        return cls(stages=stages, meta=dict(meta))

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically as safetensors (temp name, then rename)."""
        with atomic_output(path) as tmp:
            save_file(self.tensors(), str(tmp), metadata=dict(self.meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureBasis:
        """Read a basis file; a missing or corrupt file raises `DatasetError` naming it."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        except (OSError, SafetensorError, ValueError) as err:
            raise DatasetError(f"{path}: cannot read feature basis ({err})") from err
        return cls.from_tensors(tensors, meta, source=str(path))

    def content_hash(self) -> str:
        """sha256 of the metadata and every tensor's name, dtype, shape and bytes (for manifests)."""
        digest = hashlib.sha256()
        digest.update(json.dumps(dict(self.meta), sort_keys=True).encode())
        for key, tensor in sorted(self.tensors().items()):
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"\n{key}:{t.dtype}:{list(t.shape)}\n".encode())
            digest.update(t.numpy().tobytes())
        return "sha256:" + digest.hexdigest()
