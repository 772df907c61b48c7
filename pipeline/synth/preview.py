"""Contact sheet of a synthetic dataset's first samples (`dualpm-prep synth --preview`)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from dualpm.data.source import SourceDataset
from dualpm.errors import DatasetError
from dualpm.fileio import atomic_output
from dualpm.masks import read_mask
from dualpm.viz import image_grid



def write_preview(root: str | os.PathLike, path: str | os.PathLike, count: int = 8, columns: int = 4) -> int:
    """Contact sheet of the first `count` samples: RGB and mask side by side, `columns` samples a row.

    Reads through `SourceDataset` (what any consumer sees). Returns the number of samples shown.
    """
    dataset = SourceDataset(root)
    lay = dataset.layout
    ids = [i for i in dataset.ids if lay.rgb(i).exists() and lay.mask(i).exists()][:count]
    if not ids:
        raise DatasetError(f"{root}: no sample with an image and a mask to preview")
    tiles, labels = [], []
    for sample_id in ids:
        meta = dataset.sample(sample_id)
        tiles += [np.asarray(Image.open(meta.rgb_path).convert("RGB")),
                  (read_mask(meta.mask_path) * 255).astype(np.uint8)]
        labels += [f"{sample_id} {meta.model_name}", f"mask, f={meta.focal_length:g} mm"]
    sheet = image_grid(tiles, labels, columns=2 * min(columns, len(ids)))
    with atomic_output(path) as tmp:
        sheet.save(tmp, format="PNG")
    return len(ids)
