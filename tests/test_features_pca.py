"""PCABasis and FeatureBasis: fit against an exact reference, determinism, projection, storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualpm.errors import ConfigError, DatasetError
from dualpm.features.pca import FeatureBasis, PCABasis


def _data(n=2000, d=12, seed=0):
    # Rows with a known, well separated spectrum: variances 64, 32, 16, ... along a random rotation.
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    sigmas = 2.0 ** (np.arange(d)[::-1] - d / 2 + 3)
    x = rng.normal(size=(n, d)) * sigmas @ q.T + rng.normal(size=d)
    return torch.tensor(x, dtype=torch.float32)


def _reference(x: np.ndarray, k: int):
    # Exact PCA in float64 (eigen-decomposition of the sample covariance), same sign rule.
    x = x.astype(np.float64)
    centered = x - x.mean(axis=0)
    evals, evecs = np.linalg.eigh(centered.T @ centered / (len(x) - 1))
    order = np.argsort(evals)[::-1][:k]
    comps = evecs[:, order]
    comps *= np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(k)])
    return x.mean(axis=0), comps, evals[order]


def test_fit_matches_exact_pca():
    x = _data()
    basis = PCABasis.fit(x, k=4, seed=3)
    mean, comps, var = _reference(x.numpy(), 4)
    assert basis.components.shape == (12, 4) and basis.components.dtype == torch.float32
    np.testing.assert_allclose(basis.mean.numpy(), mean, atol=1e-4)
    np.testing.assert_allclose(basis.components.numpy(), comps, atol=2e-4)
    np.testing.assert_allclose(basis.explained_variance.numpy(), var, rtol=1e-3)
    gram = basis.components.T @ basis.components
    torch.testing.assert_close(gram, torch.eye(4), atol=1e-5, rtol=0)


def test_fit_is_deterministic_for_a_seed():
    x = _data()
    a, b = PCABasis.fit(x, 5, seed=7), PCABasis.fit(x, 5, seed=7)
    assert torch.equal(a.components, b.components) and torch.equal(a.explained_variance, b.explained_variance)


def test_project_maps_and_rows_agree_with_numpy():
    x = _data(n=300, d=6)
    basis = PCABasis.fit(x, 3)
    maps = torch.randn(2, 6, 5, 4, generator=torch.Generator().manual_seed(0))
    out = basis.project(maps)
    assert out.shape == (2, 3, 5, 4) and out.dtype == torch.float32
    rows = maps.permute(0, 2, 3, 1).reshape(-1, 6).numpy().astype(np.float64)
    expected = (rows - basis.mean.numpy()) @ basis.components.numpy()
    np.testing.assert_allclose(out.permute(0, 2, 3, 1).reshape(-1, 3).numpy(), expected, atol=1e-5)
    by_rows = basis.project_rows(torch.tensor(rows, dtype=torch.float32))
    np.testing.assert_allclose(by_rows.numpy(), expected, atol=1e-5)
    # A full basis is a rotation: projecting the fit data keeps every pairwise distance.
    full = PCABasis.fit(x, 6)
    z = full.project_rows(x)
    def dists(a):
        return (a[:50, None] - a[None, :50]).norm(dim=-1)

    torch.testing.assert_close(dists(z), dists(x), atol=1e-3, rtol=1e-4)


def test_fit_rejects_bad_requests():
    x = _data(n=10, d=4)
    with pytest.raises(ConfigError, match="5 PCA components of 4-channel"):
        PCABasis.fit(x, 5)
    with pytest.raises(DatasetError, match="too few samples"):
        PCABasis.fit(x[:2], 3)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(DatasetError, match="NaN"):
        PCABasis.fit(bad, 2)


def _basis():
    x = _data(n=200, d=8)
    return FeatureBasis(
        stages={"inner": PCABasis.fit(x, 6), "final": PCABasis.fit(x[:, :6], 2)},
        meta={"format": "dualpm-feature-basis", "spec": "{}", "model_id": "m"},
    )


def test_feature_basis_round_trip_and_hash(tmp_path):
    basis = _basis()
    path = tmp_path / "basis.safetensors"
    basis.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["basis.safetensors"]  # no temporary left behind
    loaded = FeatureBasis.load(path)
    assert dict(loaded.meta) == dict(basis.meta)
    for name in basis.stages:
        for part in ("mean", "components", "explained_variance"):
            assert torch.equal(getattr(loaded.stages[name], part), getattr(basis.stages[name], part))
    assert loaded.content_hash() == basis.content_hash()
    final = basis.stages["final"]
    changed = final.components.clone()
    changed[0, 0] += 1e-6
    other = FeatureBasis(
        stages={**basis.stages, "final": PCABasis(final.mean, changed, final.explained_variance)},
        meta=basis.meta,
    )
    assert other.content_hash() != basis.content_hash()
    assert FeatureBasis(basis.stages, {**basis.meta, "model_id": "x"}).content_hash() != basis.content_hash()


def test_feature_basis_bad_files(tmp_path):
    with pytest.raises(DatasetError, match="missing.safetensors"):
        FeatureBasis.load(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(DatasetError, match="corrupt.safetensors"):
        FeatureBasis.load(corrupt)
    tensors = _basis().tensors()
    del tensors["final.mean"]
    with pytest.raises(DatasetError, match="final.mean"):
        FeatureBasis.from_tensors(tensors, {})
