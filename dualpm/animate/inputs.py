"""What `dualpm-animate` reads: the predictions' frames in order, and the rig they are fitted to.

The template the model was trained for is found through what `dualpm-infer` recorded: the prepared
dataset (`--data`, or the checkpoint's `data.root`), its manifest's `source` dataset, the model name in
the source's metadata of the frames (or its only `shapes/` model), and `synth.json`'s `mesh_scales` (the
factor `dualpm-prep synth --mesh-scale` applied to a user's rig).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dualpm.animate.fit import Observation
from dualpm.data.source import Layout, read_metadata
from dualpm.errors import DatasetError, DualPMError
from dualpm.predictions import PredictionsReader, keep_mask, kept_points, recorded_thresholds
from dualpm.store.manifest import load_manifest
from dualpm.train.checkpoint import load_checkpoint

SYNTH_RECORD = "synth.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def natural_key(text: str) -> tuple:
    """Sort key comparing runs of digits as numbers: frame2 < frame10."""
    return tuple((0, int(part), part) if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", text) if part)


def frame_order(ids: Sequence[str], order_file: Path | None) -> list[str]:
    """Frame ids in natural order, or as listed in `order_file` (one id per line, a subset of `ids`)."""
    if order_file is None:
        if not ids:
            raise DatasetError("the predictions hold no frames")
        return sorted(ids, key=natural_key)
    listed = [line.strip() for line in order_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    unknown = [i for i in listed if i not in set(ids)]
    if unknown:
        raise DatasetError(f"{order_file}: {len(unknown)} ids have no prediction (e.g. {unknown[0]!r})")
    if len(set(listed)) != len(listed):
        raise DatasetError(f"{order_file}: lists an id more than once")
    if not listed:
        raise DatasetError(f"{order_file}: lists no frame")
    return listed


def read_frames(preds: PredictionsReader, ids: Sequence[str]) -> list[Observation | None]:
    """The kept points of each frame (thresholds as recorded by dualpm-infer) with their pixels' NDC; None
    for a frame with fewer than 3 (the animal not seen: its pose is interpolated from its neighbours)."""
    occ, conf = recorded_thresholds(preds)
    row_of = {sample_id: row for row, sample_id in enumerate(preds.ids)}
    frames = []
    for sample_id in ids:
        maps = preds.sample(row_of[sample_id])
        keep = keep_mask(maps, occ, conf)
        canonical, posed = kept_points(maps, keep)
        if len(canonical) < 3:
            frames.append(None)
            continue
        _, rows, cols = np.nonzero(keep)  # same order as kept_points: layer by layer, raster order
        height, width = keep.shape[-2:]
        pixels = np.stack([2.0 * (cols + 0.5) / width - 1.0, 2.0 * (rows + 0.5) / height - 1.0], axis=1)
        confidence = maps.confidence[keep].astype(np.float64)
        frames.append(Observation(canonical, posed, confidence, pixels))
    return frames


def input_images(preds: PredictionsReader, ids: Sequence[str]) -> dict[str, Path]:
    """The input image file of each frame that has one: `<id>.png` / `<id>_rgb.png` (any image suffix) in the
    --images folder, or the source dataset's renders/ for predictions made from --data."""
    found: dict[str, Path] = {}
    folder = preds.attrs.get("images")
    if folder and Path(folder).is_dir():
        wanted = set(ids)
        for path in sorted(Path(folder).iterdir()):
            stem = path.stem[:-4] if path.stem.endswith("_rgb") else path.stem
            if path.suffix.lower() in IMAGE_SUFFIXES and stem in wanted:
                found[stem] = path
        return found
    source = _source_of(preds)
    for sample_id in ids if source is not None else ():
        path = Layout(source).rgb(sample_id)
        if path.is_file():
            found[sample_id] = path
    return found


def image_aspect(preds: PredictionsReader, ids: Sequence[str]) -> float:
    """Width / height of the input images (all frames must share one size), else of the predicted maps."""
    sizes: dict[str, tuple[int, int]] = {}
    for sample_id, path in input_images(preds, ids).items():
        try:
            with Image.open(path) as image:
                sizes[sample_id] = image.size
        except OSError as err:
            raise DatasetError(f"{path}: cannot read the image ({err})") from err
    if len(set(sizes.values())) > 1:
        (a, size_a) = next(iter(sizes.items()))
        b, size_b = next((k, v) for k, v in sizes.items() if v != size_a)
        raise DatasetError(f"frames of different sizes: {a} is {size_a[0]}x{size_a[1]}, {b} is "
                           f"{size_b[0]}x{size_b[1]}; one camera cannot show both (animate one size at a "
                           "time)")
    if not sizes:
        height, width = preds.arrays["mask"].shape[-2:]
        return width / height
    width, height = next(iter(sizes.values()))
    return width / height


def dataset_focal_lengths(preds: PredictionsReader, ids: Sequence[str]) -> np.ndarray | None:
    """(F,) focal lengths (mm) from the source dataset's metadata of the frames, or None where the
    predictions were not made from a dataset (--images) or a frame has no metadata file."""
    source = _source_of(preds) if preds.attrs.get("data") else None
    if source is None:
        return None
    files = [Layout(source).metadata(i) for i in ids]
    if not all(f.is_file() for f in files):
        return None
    return np.array([read_metadata(f).focal_length for f in files], dtype=np.float64)


def training_focal_length(preds: PredictionsReader, limit: int = 200) -> float | None:
    """Median focal length (mm) of the dataset behind the predictions (at most `limit` metadata files, in
    name order), or None where it cannot be found."""
    source = _source_of(preds)
    folder = source / "metadata" if source is not None else None
    if folder is None or not folder.is_dir():
        return None
    files = sorted(folder.glob("*_metadata.txt"))[:limit]
    return float(np.median([read_metadata(f).focal_length for f in files])) if files else None


@dataclass(frozen=True)
class Template:
    """The rig the model was trained for: its file (in the model's units), model name and the
    `synth --mesh-scale` factor applied to the user's original (1.0 when none)."""

    path: Path
    model: str
    mesh_scale: float


def _source_of(preds: PredictionsReader) -> Path | None:
    """The source dataset (published layout) behind the predictions, or None when it cannot be found."""
    prepared = preds.attrs.get("data")
    if not prepared and preds.attrs.get("checkpoint"):
        try:
            state = load_checkpoint(preds.attrs["checkpoint"])
        except DualPMError:
            return None
        prepared = ((state.get("config") or {}).get("data") or {}).get("root")
    if not prepared:
        return None
    try:
        source = Path(load_manifest(prepared).source)
    except DualPMError:
        return None
    return source if (source / "shapes").is_dir() else None


def find_template(preds: PredictionsReader, ids: Sequence[str]) -> Template | None:
    """The template of the frames (see the module docstring), or None if the chain breaks."""
    source = _source_of(preds)
    if source is None:
        return None
    layout = Layout(source)
    models = {read_metadata(layout.metadata(i)).model_name for i in ids if layout.metadata(i).is_file()}
    if not models:
        models = {p.name for p in (source / "shapes").iterdir() if p.is_dir()}
    if len(models) != 1:
        names = ", ".join(sorted(models)[:4])
        raise DatasetError(f"{source}: the frames use {len(models)} models ({names}); "
                           "one animation needs one rig: pass --rig or --order with frames of one model")
    model = models.pop()
    scale = 1.0
    record = source / SYNTH_RECORD
    if record.is_file():
        try:
            scales = json.loads(record.read_text(encoding="utf-8")).get("mesh_scales") or {}
        except (OSError, ValueError) as err:
            raise DatasetError(f"{record}: unreadable ({err})") from err
        scale = float(scales.get(model, 1.0))
    path = layout.mesh(model)
    if not path.is_file():
        raise DatasetError(f"{path}: the template of model {model!r} is missing")
    return Template(path, model, scale)
