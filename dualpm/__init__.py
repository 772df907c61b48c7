"""DualPM: dual posed-canonical point maps (Kaye et al., CVPR 2025).

The library: cameras, glTF skinning, dual point map rendering, dataset storage and reading, the
two-stage network, its loss, training, inference and evaluation. The preprocessing pipeline that
produces datasets lives in the sibling package `pipeline` (console script `dualpm-prep`).
"""

__version__ = "0.1.0"
