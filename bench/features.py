"""Feature extraction speed: images/s of every extractor.

    .venv/bin/python bench/features.py                 # tiny models on this machine (+ full size on CUDA)
    .venv/bin/python bench/features.py --full          # also full-size sd-dino (SD 1.5 + ViT-B/14) here
    .venv/bin/python bench/features.py --append docs/benchmarks.md

Models have random weights (speed does not depend on the values): tiny ones of the real classes, and
for `--full` the Stable Diffusion 1.5 / DINOv2 ViT-B/14 configurations at the reference sizes (SD at
960 px, DINO at 840 px, 64 output channels; bf16 autocast on CUDA). Each extractor first fits its
basis on a small random sample, then runs `--iters` timed batches after one warm-up batch. Speed only:
there is no target; `--json PATH` writes images/s per extractor as metric rows (bench/gpu_check.py).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch
from gpu_check import Metric, write_metrics  # bench/gpu_check.py, beside this script

from dualpm.cliutils import describe_machine, record_benchmark
from dualpm.features import FeatureSpec, build_extractor, extract, fit_basis, read_packed, write_packed
from dualpm.features.dino import write_random_dinov2
from dualpm.features.sd_dino import write_random_sd


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_extractor(spec: FeatureSpec, device: torch.device, batch: int, iters: int, image_size: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, image_size, image_size, generator=gen)
    masks = torch.ones(batch, 1, image_size, image_size)
    start = time.perf_counter()
    extractor = build_extractor(spec, device)
    _sync(device)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    basis = fit_basis(extractor, lambda: [(images, masks)] * 2, rows_per_image=256)
    _sync(device)
    fit_s = time.perf_counter() - start
    extract(extractor, basis, images, masks)  # warm-up (kernel selection, allocator)
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        feats = extract(extractor, basis, images, masks)
    _sync(device)
    seconds = time.perf_counter() - start
    return dict(
        name=spec.extractor, shape=tuple(feats.shape[1:]), load_s=load_s, fit_s=fit_s,
        images_per_s=batch * iters / seconds,
    )


def _time_precomputed(folder: Path, batch: int, iters: int) -> dict:
    feats = torch.rand(64, 60, 60) * 2 - 1
    paths = [folder / f"{i}_feat.png" for i in range(batch)]
    for p in paths:
        write_packed(p, feats)
    start = time.perf_counter()
    for _ in range(iters):
        out = torch.stack([read_packed(p, 64, 60) for p in paths])
    seconds = time.perf_counter() - start
    rate = batch * iters / seconds
    return dict(name="precomputed", shape=tuple(out.shape[1:]), load_s=0.0, fit_s=0.0, images_per_s=rate)


@click.command()
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--full/--no-full", default=None, help="Full-size sd-dino too (default: only on CUDA).")
@click.option("--batch", default=4, show_default=True)
@click.option("--iters", default=5, show_default=True)
@click.option("--append", "append_to", type=click.Path(dir_okay=False), help="Append the table to this file.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write images/s per extractor to this JSON file.")
def main(device: str, full: bool | None, batch: int, iters: int, append_to: str | None,
         json_path: str | None) -> None:
    device = torch.device(device)
    full = device.type == "cuda" if full is None else full
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_random_sd(tmp / "sd-tiny", "tiny")
        write_random_dinov2(tmp / "dino-tiny", "tiny")
        tiny = dict(dino_path=str(tmp / "dino-tiny"), dino_image_size=224, dim=16)
        sd_tiny = dict(sd_path=str(tmp / "sd-tiny"), sd_image_size=256, sd_pca_dims=(8, 8, 8))
        cases = [
            ("rgb (grid 64)", FeatureSpec("rgb", grid=64, rgb_mask_channel=True), 256),
            ("dino tiny (224 px)", FeatureSpec("dino", **tiny), 256),
            ("sd-dino tiny (SD 256 px, DINO 224 px)",
             FeatureSpec("sd-dino", **sd_tiny, **tiny), 256),
        ]
        if full:
            write_random_sd(tmp / "sd15", "sd15")
            write_random_dinov2(tmp / "vitb14", "vitb14")
            cases += [
                ("dino ViT-B/14 (840 px)", FeatureSpec("dino", dino_path=str(tmp / "vitb14")), 512),
                ("sd-dino SD1.5 + ViT-B/14 (960/840 px)",
                 FeatureSpec("sd-dino", sd_path=str(tmp / "sd15"), dino_path=str(tmp / "vitb14")), 512),
            ]
        for label, spec, size in cases:
            result = _time_extractor(spec, device, batch, iters, size)
            rows.append((label, result))
            click.echo(f"{label:45s} {result['images_per_s']:9.2f} images/s  features {result['shape']}  "
                       f"load {result['load_s']:.1f}s  fit {result['fit_s']:.1f}s")
        result = _time_precomputed(tmp, batch * 8, iters)
        rows.append(("precomputed read_packed (64 x 60 x 60)", result))
        click.echo(f"{rows[-1][0]:45s} {result['images_per_s']:9.2f} images/s")

    lines = [
        f"- {time.strftime('%Y-%m-%d')}, {device.type} on {describe_machine()}, {torch.get_num_threads()} threads, "
        f"batch {batch}:",
        "",
        "| extractor | images/s | output (C, h, w) | fit basis (s) |",
        "|---|---:|---|---:|",
    ] + [f"| {label} | {r['images_per_s']:.2f} | {r['shape']} | {r['fit_s']:.1f} |" for label, r in rows]
    table = "\n".join(lines) + "\n"
    click.echo(table)
    if append_to:
        record_benchmark(append_to, "Feature extraction (`bench/features.py`)", table)
    if json_path:
        write_metrics(json_path, [Metric(f"{label} images/s ({device.type}, batch {batch})",
                                         f"{r['images_per_s']:.2f}") for label, r in rows])


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
