"""Skeleton fitting: the core shared by `dualpm-infer --skeleton`, `dualpm-eval` and `dualpm-animate`.

- `rigid`: weighted Kabsch-Umeyama, similarity matrices, `SkeletonError`.
- `joints`: skin weights of predicted canonical points, the per-bone Kabsch fit (the reference's method),
  reposing, joint errors, skeleton.json.
- `kinematics`: forward kinematics of a rig in NumPy with the derivatives the fit needs.
- `fit`: `fit_sequence` - per-bone Kabsch converted to node-local poses (`method="kabsch"`) or the
  rigid-skeleton fit against the full linear-blend-skinning residual (`method="lbs"`).
- `smooth`: filtering of pose sequences on the rotation manifold; jitter.
- `retarget`: local rotations of one rig onto another.

The modules import `dualpm.skeleton.<module>` directly; this package re-exports nothing.
"""
