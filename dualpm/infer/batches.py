"""Model inputs in batches: a prepared dataset's stored features, or image folders turned into features.

Both yield `Batch`es in a fixed order (the dataset's plan order; image ids sorted). Decoding runs one
batch ahead in a background thread (`prefetch`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from dualpm.data.reader import DatasetInfo, ShardStream, decode_sample
from dualpm.errors import DatasetError
from dualpm.features import FeatureBasis, extract
from dualpm.images import load_image, stack_images
from dualpm.infer import InferError
from dualpm.masks import INSIDE, read_mask, resize_mask
from dualpm.store import StoredSample
from dualpm.store.manifest import SAMPLE_ID_RE, SAMPLE_ID_RULE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
T = TypeVar("T")


@dataclass
class Batch:
    """B input samples. features: (B, C, H, W) float32 CPU (None for the oracle); mask: (B, H, W) float32
    in {0, 1}; target: (B, H, W, L, 7) ground truth (oracle only); images: (h, w, 3) uint8 inputs for the
    sheets, or None; meta: per sample, the render column's meta (dataset) or {} (images)."""

    ids: list[str]
    features: torch.Tensor | None
    mask: torch.Tensor
    target: torch.Tensor | None
    images: list[np.ndarray | None]
    meta: list[dict[str, Any]]


def prefetch(items: Iterator[T]) -> Iterator[T]:
    """Yield from `items`, producing the next item in a background thread while the caller works on this
    one (decoding PNGs and dual point maps releases the GIL)."""
    done = object()
    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
        future = pool.submit(next, items, done)
        while (item := future.result()) is not done:
            future = pool.submit(next, items, done)
            yield item


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def dataset_batches(
    info: DatasetInfo, split: str, layers: int, resolution: tuple[int, int], batch: int, limit: int,
    with_target: bool,
) -> Iterator[Batch]:
    """Batches of a dataset split in plan order, decoded as the trainer decodes them.

    layers, resolution: what the model predicts (the target is cut and resampled to them).
    limit: at most this many samples (0: all).
    """
    stream = ShardStream(info, split, layers, resolution, seed=0, shuffle=False, infinite=False)
    records = stream.records(epoch=0, consumer=0, consumers=1)
    if limit:
        records = itertools.islice(records, limit)

    def decoded(chunk: list[tuple[int, str, StoredSample, StoredSample]]) -> Batch:
        samples, images, meta = [], [], []
        for shard, sample_id, fields, feats in chunk:
            where = f"{info.root}: shard {shard} sample {sample_id!r}"
            samples.append(decode_sample(fields, feats, layers, resolution, where))
            images.append(fields["rgb"] if "rgb" in fields else None)
            meta.append(fields.get("meta") or {})
        return Batch(
            ids=[r[1] for r in chunk],
            features=torch.stack([s["features"] for s in samples]),
            mask=torch.stack([s["mask"] for s in samples]),
            target=torch.stack([s["target"] for s in samples]) if with_target else None,
            images=images,
            meta=meta,
        )

    return (decoded(chunk) for chunk in _chunks(records, batch))


def pair_images(images_dir: Path, masks_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[dict[str, str]]]:
    """Pair image and mask files by id and list what cannot be paired.

    The id of `photo.png` and of `photo_rgb.png` is "photo"; its mask is `photo.png` or `photo_mask.png`
    (any image suffix) in `masks_dir`. Returns ([(id, image, mask)] sorted by id, failures).
    """
    def files(folder: Path, tag: str) -> dict[str, list[Path]]:
        if not folder.is_dir():
            raise InferError(f"{folder}: folder not found")
        found: dict[str, list[Path]] = {}
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                stem = path.stem[: -len(tag)] if path.stem.endswith(tag) and path.stem != tag else path.stem
                found.setdefault(stem, []).append(path)
        return found

    images, masks = files(images_dir, "_rgb"), files(masks_dir, "_mask")
    pairs, failures = [], []
    for path in sorted(images_dir.iterdir()):  # what is not taken is said, not skipped in silence
        if not path.name.startswith(".") and path.suffix.lower() not in IMAGE_SUFFIXES:
            why = "a folder" if path.is_dir() else f"not an image of a known kind ({', '.join(IMAGE_SUFFIXES)})"
            failures.append({"id": path.stem, "image": str(path), "reason": f"{path.name}: {why}"})
    for sample_id, paths in sorted(images.items()):
        where = {"id": sample_id, "image": str(paths[0])}
        if not SAMPLE_ID_RE.match(sample_id):  # the one id rule of every command (dualpm.store.manifest)
            failures.append(where | {"reason": f"{paths[0].name}: the file name is not usable as a sample id "
                                               f"({SAMPLE_ID_RULE})"})
        elif len(paths) > 1:
            failures.append(where | {"reason": f"several images for one id: {', '.join(p.name for p in paths)}"})
        elif sample_id not in masks:
            failures.append(where | {"reason": f"no mask {sample_id}.png or {sample_id}_mask.png in {masks_dir}"})
        elif len(masks[sample_id]) > 1:
            names = ", ".join(p.name for p in masks[sample_id])
            failures.append(where | {"reason": f"several masks for one id: {names}"})
        else:
            pairs.append((sample_id, paths[0], masks[sample_id][0]))
    return pairs, failures


def image_batches(
    pairs: list[tuple[str, Path, Path]], extractor: Any, basis: FeatureBasis, resolution: tuple[int, int],
    batch: int, failures: list[dict[str, str]],
) -> Iterator[Batch]:
    """Batches of raw images turned into model inputs: features by the checkpoint's extractor and basis,
    upsampled bilinearly to `resolution` (as the trainer upsamples stored features). Unreadable images
    or masks are appended to `failures` and skipped."""

    def load(chunk: list[tuple[str, Path, Path]]) -> list[tuple[str, torch.Tensor, torch.Tensor, Path]]:
        loaded = []
        for sample_id, image_path, mask_path in chunk:
            try:
                mask = torch.from_numpy(read_mask(mask_path))  # (h, w) float32 in [0, 1]
                if not bool((mask > INSIDE).any()):
                    raise DatasetError(f"{mask_path}: the mask is empty (no pixel inside): nothing to predict")
                image = load_image(image_path)  # (3, H, W)
                if tuple(mask.shape) != tuple(image.shape[1:]):
                    (h, w), (H, W) = mask.shape, image.shape[1:]
                    raise DatasetError(f"{mask_path}: the mask is {w}x{h} pixels, its image {image_path.name} is "
                                       f"{W}x{H}: a mask must have its image's size (stretched, it would cover "
                                       "other pixels)")
                loaded.append((sample_id, image, mask, image_path))
            except DatasetError as err:  # missing, truncated, not an image, empty mask: this sample's failure
                failures.append({"id": sample_id, "image": str(image_path), "reason": str(err)})
        return loaded

    size = extractor.input_size
    for loaded in prefetch(load(chunk) for chunk in _chunks(pairs, batch)):
        if not loaded:
            continue
        images = stack_images([im for _, im, _, _ in loaded], size).to(extractor.device)
        masks = stack_images([m[None] for _, _, m, _ in loaded], size).to(extractor.device)
        feats = extract(extractor, basis, images, masks).float()  # (B, C, g, g)
        if tuple(feats.shape[-2:]) != tuple(resolution):
            feats = F.interpolate(feats, size=tuple(resolution), mode="bilinear", align_corners=False)
        yield Batch(
            ids=[s for s, _, _, _ in loaded],
            features=feats.cpu(),
            mask=torch.stack([resize_mask(m, resolution) for _, _, m, _ in loaded]),
            target=None,
            images=[(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for _, im, _, _ in loaded],
            meta=[{"image": str(p)} for _, _, _, p in loaded],
        )

