"""Rigid fits shared by skeleton fitting and evaluation: weighted Kabsch-Umeyama, similarity matrices (numpy).

Also the package's error (`SkeletonError`) and its point-array check.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from dualpm.errors import DualPMError
from dualpm.geometry import checked_points


class SkeletonError(DualPMError):
    """Skeleton inputs that cannot be fitted (wrong shapes, non-finite values, too little support, bad files)."""


def as_points(name: str, points: ArrayLike) -> np.ndarray:
    """`points` as a (N, 3) float64 array; raises `SkeletonError` naming `name` if it is not finite (N, 3)."""
    return checked_points(name, points, SkeletonError)


def umeyama_from_moments(
    mean_src: np.ndarray, mean_dst: np.ndarray, cov: np.ndarray, var_src: np.ndarray, with_scale: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Closed-form similarity fit from weighted moments (Umeyama 1991), batched over leading dims.

    Args:
        mean_src, mean_dst: (..., 3) weighted means of the source and destination points.
        cov: (..., 3, 3) weighted cross-covariance `sum_i w_i (dst_i - mean_dst)(src_i - mean_src)^T`
            with weights summing to 1.
        var_src: (...,) weighted variance of the source, `sum_i w_i |src_i - mean_src|^2`.
        with_scale: fit a uniform scale; otherwise the scale is 1.
    Returns:
        rotation (..., 3, 3) proper (det +1), translation (..., 3), scale (...,), and the weighted mean
        squared residual without `var_dst` (add `var_dst` to get it): `-2 s tr(DS) + s^2 var_src`.
    """
    u, singular, vt = np.linalg.svd(cov)
    # Reflection-safe: flip the weakest axis when U V^T would be a reflection (det < 0).
    sign = np.where(np.linalg.det(u) * np.linalg.det(vt) < 0, -1.0, 1.0)  # (...,)
    u = u.copy()
    u[..., :, 2] *= sign[..., None]
    rotation = u @ vt
    trace = singular[..., 0] + singular[..., 1] + sign * singular[..., 2]  # tr(D S)
    if with_scale:
        scale = np.divide(trace, var_src, out=np.ones_like(trace), where=var_src > 0)
    else:
        scale = np.ones_like(trace)
    translation = mean_dst - scale[..., None] * np.einsum("...ab,...b->...a", rotation, mean_src)
    partial_mse = -2.0 * scale * trace + scale**2 * var_src
    return rotation, translation, scale, partial_mse


def kabsch_umeyama(
    src: ArrayLike, dst: ArrayLike, weights: ArrayLike | None = None, with_scale: bool = False
) -> tuple[np.ndarray, np.ndarray, float | np.ndarray]:
    """Weighted least-squares rigid (or similarity) transform taking `src` onto `dst`.

    Minimises `sum_i w_i |s R src_i + t - dst_i|^2` over rotations R (det +1: reflections are never
    returned, even when the data are mirrored), translations t and, if `with_scale`, scales s > 0.
    Batched over any leading dimensions.

    Args:
        src: (..., N, 3) source points, float, scene units.
        dst: (..., N, 3) corresponding destination points.
        weights: (..., N) non-negative weights (any scale), or None for uniform; each batch entry
            needs a positive total. Fewer than 3 non-collinear weighted points leave R undetermined.
        with_scale: also fit a uniform scale.
    Returns:
        R (..., 3, 3), t (..., 3) float64 and s (float, or (...,) array when batched) with
        `dst ~= s * src @ R.T + t`.
    """
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim < 2 or src.shape[-1] != 3:
        raise SkeletonError(f"kabsch_umeyama: src and dst must both be (..., N, 3), got {src.shape}, {dst.shape}")
    w = np.ones(src.shape[:-1]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != src.shape[:-1] or not np.isfinite(w).all() or (w < 0).any():
        raise SkeletonError(f"kabsch_umeyama: weights must be finite, >= 0 and of shape {src.shape[:-1]}")
    total = w.sum(axis=-1)
    if (total <= 0).any():
        raise SkeletonError("kabsch_umeyama: the weights sum to zero; there is nothing to fit")
    w = w / total[..., None]
    mean_src = np.einsum("...n,...nc->...c", w, src)
    mean_dst = np.einsum("...n,...nc->...c", w, dst)
    src_c, dst_c = src - mean_src[..., None, :], dst - mean_dst[..., None, :]
    cov = np.einsum("...n,...na,...nb->...ab", w, dst_c, src_c)
    var_src = np.einsum("...n,...nc,...nc->...", w, src_c, src_c)
    rotation, translation, scale, _ = umeyama_from_moments(mean_src, mean_dst, cov, var_src, with_scale)
    return rotation, translation, (float(scale) if scale.ndim == 0 else scale)


def similarity_matrix(
    rotation: np.ndarray, translation: np.ndarray, scale: float | np.ndarray = 1.0
) -> np.ndarray:
    """(..., 4, 4) matrices `[s R | t]` from rotation (..., 3, 3), translation (..., 3), scale (...,)."""
    rotation = np.asarray(rotation, dtype=np.float64)
    out = np.zeros(rotation.shape[:-2] + (4, 4))
    out[..., :3, :3] = np.asarray(scale, dtype=np.float64)[..., None, None] * rotation
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1.0
    return out
