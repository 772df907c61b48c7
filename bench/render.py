"""Dual point maps per second for a ~20k-triangle skinned mesh, per backend.

    .venv/bin/python bench/render.py                            # print
    .venv/bin/python bench/render.py --append docs/benchmarks.md

A procedural quadruped from `pipeline.synth` (~20k triangles), 32 random poses skinned once, cameras
that frame each pose; then `render_dual_pointmaps` at 160x160 with 4 and 8 layers, batch 32, for
every backend available here: cpu with one process (the per-core number the target is stated in)
and with all cores, and cuda when nvdiffrast and a GPU exist, in instanced mode (one shared triangle
list) and in range mode (the same mesh passed as B separate meshes, as batches of mixed models render).
Best of `--repeats` timed passes after a warm-up. With cuda, the 8-layer cpu and cuda maps are also
compared (parity, as tests/test_render.py measures it on its analytic scene).

The cpu backend with one process is measured side by side with its limit (bench/embree_limit.py): the
same scenes built and exactly the same rays cast by Embree alone, through embreex and through the
renderer's own direct binding (`dualpm.render.embree_direct`), passes interleaved. The metric row
compares CPU seconds (this process, all threads) with the direct binding alone: on a shared machine
wall-clock ratios move with the load; both are printed.

Targets: cpu >= 40 maps/s per core at 160x160x8, and >= 80% of Embree alone; cuda >= 5,000 maps/s on one H100/H200 and >= 50x the
cpu backend with one process; parity: coverage agreement >= 99.5% away from silhouettes, points
within 1e-3 of the object's size. `--json PATH` writes these as metric rows (bench/gpu_check.py).
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
from embree_limit import direct_scene, record_rays, replay  # bench/embree_limit.py, beside this script
from gpu_check import Metric, write_metrics  # bench/gpu_check.py, beside this script

from dualpm.camera import projection_from_focal
from dualpm.cliutils import describe_machine, record_benchmark
from dualpm.render import cuda_backend_status, render_dual_pointmaps
from dualpm.render.embree import EmbreexScene, default_workers
from dualpm.skinning import skin
from dualpm.pointmaps import hits
from pipeline.synth.cameras import CameraRanges, frame_camera
from pipeline.synth.poses import PoseSampler
from pipeline.synth.quadruped import make_quadruped

TARGET_CPU_PER_CORE, TARGET_CUDA, TARGET_CUDA_VS_CPU = 40.0, 5000.0, 50.0
TARGET_AGREE, TARGET_POINTS = 0.995, 1e-3  # parity: coverage away from silhouettes; points / object size
TARGET_OF_LIMIT = 0.8  # cpu, 1 process: >= 80% of the Embree-only limit (bench/embree_limit.py)


def side_by_side(args, layers: int, repeats: int) -> tuple[dict, float, torch.Tensor]:
    """The cpu backend (one process) and Embree alone replaying exactly its scenes and rays
    (bench/embree_limit.py), through embreex and through the renderer's direct binding, in interleaved
    passes so that a change of load hits all three alike.

    Returns ({name: (best wall s, best CPU s, best build wall s)} for "renderer", "sparse" (the renderer
    asked for the stored sparse form, as `dualpm-prep render` asks), "embreex", "direct" (build 0 for
    the renderers; "direct" missing where the binding cannot load), rays per map, the renderer's last
    (B, 160, 160, layers, 7) maps)."""
    canon, posed, faces, views, proj = args
    run = lambda: render_dual_pointmaps(canon, posed, faces, views, proj, 160, layers, "cpu", 1)  # noqa: E731
    sparse = lambda: render_dual_pointmaps(canon, posed, faces, views, proj, 160, layers, "cpu", 1,  # noqa: E731
                                           sparse=True)
    images = record_rays(run)  # also the warm-up
    sparse()
    builders = {"embreex": EmbreexScene, "direct": direct_scene()}
    best: dict[str, tuple[float, float, float]] = {}

    def keep(name, wall, cpu, build):
        old = best.get(name, (float("inf"),) * 3)
        best[name] = (min(old[0], wall), min(old[1], cpu), build if wall < old[0] else old[2])

    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        out = run()
        keep("renderer", time.perf_counter() - wall, time.process_time() - cpu, 0.0)
        cpu, wall = time.process_time(), time.perf_counter()
        sparse()
        keep("sparse", time.perf_counter() - wall, time.process_time() - cpu, 0.0)
        for name, build in builders.items():
            if build is not None:
                build_s, cast_s, cpu_s = replay(images, build)
                keep(name, build_s + cast_s, cpu_s, build_s)
    return best, sum(image.rays for image in images) / len(images), out


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


def maps_per_second(args, layers: int, backend: str, workers: int | None, repeats: int,
                    range_mode: bool = False) -> tuple[float, torch.Tensor]:
    """(best maps/s over `repeats` passes, the last pass's (B, 160, 160, layers, 7) maps on the CPU).

    range_mode: pass the shared mesh as B separate meshes (nvdiffrast's range mode on cuda)."""
    canon, posed, faces, views, proj = args
    if range_mode:
        canon, posed, faces = [canon] * len(posed), list(posed), [faces] * len(posed)
    run = lambda: render_dual_pointmaps(canon, posed, faces, views, proj, 160, layers, backend, workers)  # noqa: E731
    run()  # warm-up (process pool start, CUDA context, kernels)
    best = float("inf")
    for _ in range(repeats):
        if backend == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = run()
        if backend == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return len(posed) / best, out.cpu()


def parity(cpu: torch.Tensor, gpu: torch.Tensor, posed: torch.Tensor) -> tuple[float, float]:
    """(coverage agreement away from silhouettes, max point difference / object size) of two renders.

    cpu, gpu: (B, H, W, L, 7) float32 maps of the same scene; posed: (B, V, 3) posed vertices (scene
    units). "Away from silhouettes": pixels whose 3x3 neighbourhood in the cpu render's first layer is
    all covered or all empty (an edge pixel's coverage depends on sub-pixel rounding of either
    rasteriser). Points are compared where both renders hit.
    """
    alpha_c, alpha_g = hits(cpu), hits(gpu)  # (B, H, W, L)
    mask = alpha_c[..., 0].float()[:, None]  # (B, 1, H, W)
    inner = -torch.nn.functional.max_pool2d(-mask, 3, 1, 1)[:, 0] > 0
    outer = torch.nn.functional.max_pool2d(mask, 3, 1, 1)[:, 0] == 0
    away = (inner | outer)[..., None].expand_as(alpha_c)
    agree = (alpha_c == alpha_g)[away].float().mean().item()
    both = alpha_c & alpha_g & away
    size = (posed.amax(dim=(0, 1)) - posed.amin(dim=(0, 1))).max()
    diff = (cpu[..., :6] - gpu[..., :6]).abs().amax(-1)[both]
    return agree, (diff.max() / size).item() if diff.numel() else 0.0


@click.command()
@click.option("--batch", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--faces", type=click.IntRange(1000, 500000), default=20000, show_default=True)
@click.option("--repeats", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--append", type=click.Path(dir_okay=False), default=None, help="Append the results to this markdown file.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the measures against their targets to this JSON file.")
def main(batch: int, faces: int, repeats: int, seed: int, append: str | None, json_path: str | None) -> None:
    torch.set_num_threads(1)  # one core means one core: the target is per core
    mesh, *args = scene(batch, faces, seed)
    cores = default_workers()
    desc = f"quadruped {mesh.faces.shape[0]} triangles, {mesh.num_joints} joints, 160x160, batch {batch}"
    rows, one_core, maps = [], {}, {}
    limits, of_limit, sparse_of_limit = [], {}, {}  # renderer / Embree alone (direct binding), CPU seconds
    for layers in (4, 8):
        best, rays_per_map, maps["cpu", layers] = side_by_side(args, layers, repeats)
        one = batch / best["renderer"][0]
        one_core[layers] = one
        rows.append(f"| cpu, 1 process | {layers} | {one:.1f} | {one:.1f} | {one / TARGET_CPU_PER_CORE:.2f} |")
        text = f"{layers} layers: {rays_per_map:.0f} rays per map (primary + continuation). Alone, same scenes and rays:"
        for name, label in (("direct", "the direct binding"), ("embreex", "embreex")):
            if name not in best:
                text += f" {label}: not loadable here;"
                continue
            wall, cpu, build = best[name]
            limit = batch / wall
            rows.append(f"| {label} alone, same rays, 1 process | {layers} | {limit:.1f} | {limit:.1f} | "
                        f"{limit / TARGET_CPU_PER_CORE:.2f} |")
            text += (f" {label} {limit:.1f} maps/s ({build / wall:.0%} of it building scenes, casting at "
                     f"{rays_per_map * batch / (wall - build) / 1e6:.2f} M rays/s), the renderer = {one / limit:.0%} "
                     f"of it ({cpu / best['renderer'][1]:.0%} in CPU seconds);")
        limit_cpu = best["direct" if "direct" in best else "embreex"][1]
        of_limit[layers] = limit_cpu / best["renderer"][1]
        sparse_of_limit[layers] = limit_cpu / best["sparse"][1]
        text += (f" the renderer asked for the sparse form (what the render stage stores) "
                 f"{batch / best['sparse'][0]:.1f} maps/s, {sparse_of_limit[layers]:.0%} of the limit in CPU seconds;")
        limits.append(text[:-1] + f". Target: >= {TARGET_OF_LIMIT:.0%} of the direct binding alone.")
        click.echo(limits[-1])
        if cores > 1:
            allc, _ = maps_per_second(args, layers, "cpu", cores, repeats)
            rows.append(f"| cpu, {cores} processes | {layers} | {allc:.1f} | {allc / cores:.1f} | "
                        f"{allc / cores / TARGET_CPU_PER_CORE:.2f} |")
    cpu8 = one_core[8]
    results = [Metric("cpu maps/s, 1 process, 8 layers", f"{cpu8:.1f}", f">= {TARGET_CPU_PER_CORE:.0f}",
                      cpu8 >= TARGET_CPU_PER_CORE),
               Metric("cpu maps/s / Embree alone casting the same rays, 1 process, 8 layers", f"{of_limit[8]:.0%}",
                      f">= {TARGET_OF_LIMIT:.0%}", of_limit[8] >= TARGET_OF_LIMIT),
               Metric("the same, sparse maps (the render stage's form)", f"{sparse_of_limit[8]:.0%}",
                      f">= {TARGET_OF_LIMIT:.0%}", sparse_of_limit[8] >= TARGET_OF_LIMIT)]
    notes = ""
    reason = cuda_backend_status()
    if reason is None:
        rate = {}
        for mode in ("instanced", "range"):
            for layers in (4, 8):
                rate[mode, layers], maps[mode, layers] = maps_per_second(args, layers, "cuda", None, repeats,
                                                                         mode == "range")
                rows.append(f"| cuda, {mode} mode | {layers} | {rate[mode, layers]:.0f} | - | "
                            f"{rate[mode, layers] / TARGET_CUDA:.2f} |")
        speedup = rate["instanced", 8] / cpu8
        agree, points = parity(maps["cpu", 8], maps["instanced", 8], args[1])
        mode_diff = (maps["instanced", 8] - maps["range", 8]).abs().max().item()
        results += [
            *(Metric(f"cuda maps/s, {mode} mode, 8 layers", f"{rate[mode, 8]:.0f}", f">= {TARGET_CUDA:.0f}",
                     rate[mode, 8] >= TARGET_CUDA) for mode in ("instanced", "range")),
            Metric("cuda (instanced) / cpu (1 process), 8 layers", f"{speedup:.0f}x",
                   f">= {TARGET_CUDA_VS_CPU:.0f}x", speedup >= TARGET_CUDA_VS_CPU),
            Metric("parity cpu vs cuda: coverage away from silhouettes", f"{agree:.2%}",
                   f">= {TARGET_AGREE:.1%}", agree >= TARGET_AGREE),
            Metric("parity cpu vs cuda: max point difference / object size", f"{points:.1e}",
                   f"< {TARGET_POINTS:.0e}", points < TARGET_POINTS),
            Metric("cuda range vs instanced mode: max difference", f"{mode_diff:.1e}", "<= 1e-5",
                   mode_diff <= 1e-5),
        ]
        notes = (f"\nParity (8 layers, cpu vs cuda instanced): coverage agreement {agree:.2%} away from "
                 f"silhouettes, max point difference {points:.1e} of the object's size; cuda x{speedup:.0f} "
                 f"the cpu backend with one process; range and instanced mode differ by at most "
                 f"{mode_diff:.1e}.\n")
    load = os.getloadavg()[0]
    text = (
        f"\n- {datetime.date.today()} - {describe_machine()} (load average {load:.1f}); {desc}"
        + ("" if reason is None else f"; cuda backend not run: {reason.split(';')[0]}")
        + "\n\n| backend | layers | maps/s | maps/s per core | x target |\n|---|---:|---:|---:|---:|\n"
        + "\n".join(rows) + "\n\n" + "\n".join(f"- {line}" for line in limits) + "\n" + notes
    )
    click.echo(text)
    if append:
        record_benchmark(append, "Renderer", text, intro=(
            "`bench/render.py`: dual point maps/s for a ~20k-triangle skinned quadruped at 160x160, batch 32. "
            f"Targets: cpu >= {TARGET_CPU_PER_CORE:.0f} maps/s per core at 8 layers; cuda >= {TARGET_CUDA:.0f} "
            "maps/s on one H100."))
        click.echo(f"appended to {append}")
    if json_path:
        write_metrics(json_path, results)


if __name__ == "__main__":
    main()
