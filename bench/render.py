"""Dual point maps per second for a ~20k-triangle skinned mesh, per backend.

    .venv/bin/python bench/render.py                            # print
    .venv/bin/python bench/render.py --append docs/benchmarks.md

A procedural quadruped from `pipeline.synth` (~20k triangles), 32 random poses skinned once, cameras
that frame each pose; then `render_dual_pointmaps` at 160x160 with 4 and 8 layers, batch 32, for
every backend available here: cpu with one process (the per-core number the target is stated in)
and with all cores, and cuda when nvdiffrast and a GPU exist. Targets: cpu >= 40 maps/s per core
at 160x160x8; cuda >= 5,000 maps/s on one H100. Best of `--repeats` timed passes after a warm-up.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click
import numpy as np
import torch

from dualpm.camera import projection_from_focal
from dualpm.cliutils import describe_machine, record_benchmark
from dualpm.render import cuda_backend_status, render_dual_pointmaps
from dualpm.render.embree import default_workers
from dualpm.skinning import skin
from pipeline.synth.cameras import CameraRanges, frame_camera
from pipeline.synth.poses import PoseSampler
from pipeline.synth.quadruped import make_quadruped

TARGET_CPU_PER_CORE, TARGET_CUDA = 40.0, 5000.0


def scene(batch: int, faces: int, seed: int):
    rng = np.random.default_rng(seed)
    mesh = make_quadruped("bench", rng, target_faces=faces)
    sampler = PoseSampler.for_mesh(mesh)
    poses = torch.tensor(np.stack([sampler.sample(rng) for _ in range(batch)]))
    posed = skin(mesh, poses)  # (B, V, 3)
    cams = [frame_camera(p, rng, 160, CameraRanges(), "bench") for p in posed]
    views = torch.tensor(np.stack([c.view for c in cams]), dtype=torch.float32)
    proj = projection_from_focal(torch.tensor([c.focal_mm for c in cams]))
    return mesh, torch.tensor(mesh.vertices), posed, torch.tensor(mesh.faces), views, proj


def maps_per_second(args, layers: int, backend: str, workers: int | None, repeats: int) -> float:
    canon, posed, faces, views, proj = args
    run = lambda: render_dual_pointmaps(canon, posed, faces, views, proj, 160, layers, backend, workers)  # noqa: E731
    run()  # warm-up (process pool start, CUDA context, kernels)
    best = float("inf")
    for _ in range(repeats):
        if backend == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if backend == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return posed.shape[0] / best


@click.command()
@click.option("--batch", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--faces", type=click.IntRange(1000, 500000), default=20000, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--append", type=click.Path(dir_okay=False), default=None, help="Append the results to this markdown file.")
def main(batch: int, faces: int, repeats: int, seed: int, append: str | None) -> None:
    torch.set_num_threads(1)  # one core means one core: the target is per core
    mesh, *args = scene(batch, faces, seed)
    cores = default_workers()
    desc = f"quadruped {mesh.faces.shape[0]} triangles, {mesh.num_joints} joints, 160x160, batch {batch}"
    rows = []
    for layers in (4, 8):
        one = maps_per_second(args, layers, "cpu", 1, repeats)
        rows.append(f"| cpu, 1 process | {layers} | {one:.1f} | {one:.1f} | {one / TARGET_CPU_PER_CORE:.2f} |")
        if cores > 1:
            allc = maps_per_second(args, layers, "cpu", cores, repeats)
            rows.append(f"| cpu, {cores} processes | {layers} | {allc:.1f} | {allc / cores:.1f} | "
                        f"{allc / cores / TARGET_CPU_PER_CORE:.2f} |")
    reason = cuda_backend_status()
    if reason is None:
        for layers in (4, 8):
            gpu = maps_per_second(args, layers, "cuda", None, repeats)
            rows.append(f"| cuda | {layers} | {gpu:.0f} | - | {gpu / TARGET_CUDA:.2f} |")
    load = os.getloadavg()[0]
    text = (
        f"\n- {datetime.date.today()} - {describe_machine()} (load average {load:.1f}); {desc}"
        + ("" if reason is None else f"; cuda backend not run: {reason.split(';')[0]}")
        + "\n\n| backend | layers | maps/s | maps/s per core | x target |\n|---|---:|---:|---:|---:|\n"
        + "\n".join(rows) + "\n"
    )
    click.echo(text)
    if append:
        record_benchmark(append, "Renderer", text, intro=(
            "`bench/render.py`: dual point maps/s for a ~20k-triangle skinned quadruped at 160x160, batch 32. "
            f"Targets: cpu >= {TARGET_CPU_PER_CORE:.0f} maps/s per core at 8 layers; cuda >= {TARGET_CUDA:.0f} "
            "maps/s on one H100."))
        click.echo(f"appended to {append}")


if __name__ == "__main__":
    main()
