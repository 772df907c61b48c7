"""Render pipeline speed and size: end-to-end vs raw renderer samples/s, bytes/sample vs the reference npz.

    .venv/bin/python bench/render_pipeline.py                       # CPU backend, prints numbers
    .venv/bin/python bench/render_pipeline.py --append docs/benchmarks.md

Builds its own source dataset (one procedural ~20k-triangle quadruped from `pipeline.synth` when it
is available, else a dense skinned tube; random poses and cameras; no RGB, so the store holds what
the renderer produced: dual point map, rendered mask, metadata), then measures in the same run:

* raw renderer: `render_dual_pointmaps` alone on pre-skinned batches, one process (workers=1), the
  same backend, batch, resolution and layers;
* end to end: the real `dualpm-prep render` command on a local Ray with 1 CPU (like for like with the
  raw number) and with every CPU, from SRC to published shards (Ray already started and its workers
  warm; the time includes planning, skinning, rendering, encoding, writing, checksums, manifest);
* bytes per stored sample (whole shard files over stored samples) vs `baseline_npz_bytes` of the same
  samples (the reference code's sparse float32 npz).

Sizes: 1,024 samples in shards of 256 (the render stage's own default shard) by default. A run has fixed
costs (Ray dispatch, planning, Zarr metadata, manifest; ~0.2 s here) and each shard its own (publishing,
digests, fsync), which a real dataset (thousands of samples) amortises. With the raw renderer at 150-170
maps/s on an idle core, a 256-sample run lasts under 2 s and spends a tenth of it on them: 78-82% end to
end against 86-91% at the default size (2026-12-07, docs/benchmarks.md).

Targets (from the issues): end to end >= 80% of raw (issue 26; 70% before); bytes <= 30% of the
baseline; >= 2,000 samples/s end to end on one H100 node (cuda backend; recorded when a GPU is available). `--json PATH` writes
these as metric rows (bench/gpu_check.py).
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages, installed or not

import click
import numpy as np
import ray
import torch
from gpu_check import Metric, write_metrics  # bench/gpu_check.py, beside this script

from dualpm.camera import (
    camera_pose_from_view,
    format_camera_txt,
    look_at,
    projection_from_focal,
    view_from_camera_pose,
)
from dualpm.cliutils import describe_machine, record_benchmark
from dualpm.data.source import Layout, SampleMetadata, SourceDataset, format_metadata
from dualpm.fileio import atomic_write_text
from dualpm.geometry import axis_angle_to_quaternion, quaternion_multiply
from dualpm.gltf import SkinnedMesh, load_skinned_mesh, save_skinned_mesh
from dualpm.render import render_dual_pointmaps, resolve_backend
from dualpm.skinning import read_pose_file, rest_pose, skin, write_pose_file
from dualpm.store import (
    SCHEMA_VERSION,
    ColumnInfo,
    Manifest,
    ShardWriter,
    baseline_npz_bytes,
    load_manifest,
    publish_layout,
    read_shard,
)
from pipeline.cluster import ray_session
from pipeline.render_stage import render

TARGET_RATIO, TARGET_BYTES, TARGET_GPU = 0.80, 0.30, 2000.0
SECTION_INTRO = """`bench/render_pipeline.py`: raw renderer (one process, one thread) vs the real `dualpm-prep render` on local
Ray, best of 3 passes (raw passes alternate with the 1-CPU runs); bytes per stored sample vs the reference npz.
Targets: end to end >= 80% of raw (70% before 2026-12-07), bytes <= 30% of the npz (<= 40% before store
schema 2), >= 2,000 samples/s on one H100 node. Bytes are measured in the container rendered (`--format`) and in the other one (the same maps copied).
"""


def _tube(faces: int) -> SkinnedMesh:
    """A dense capped tube skinned to 3 bones (fallback when pipeline.synth is not there)."""
    segments = 64
    rings = max(2, faces // (2 * segments))
    x = np.linspace(-1.1, 1.1, rings)
    angle = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    vertices = np.stack([np.repeat(x, segments), 0.3 * np.tile(np.cos(angle), rings),
                         0.3 * np.tile(np.sin(angle), rings)], 1)  # (rings * segments, 3)
    a = (np.arange(rings - 1)[:, None] * segments + np.arange(segments)[None]).ravel()
    b = (np.arange(rings - 1)[:, None] * segments + (np.arange(segments)[None] + 1) % segments).ravel()
    tri = np.concatenate([np.stack([a, b, a + segments], 1), np.stack([b, b + segments, a + segments], 1)])
    bone_x = np.array([-0.7, 0.0, 0.7])
    t = np.clip(np.interp(vertices[:, 0], bone_x, [0.0, 1.0, 2.0]), 0, 2)
    lower = np.minimum(np.floor(t), 1).astype(np.int64)
    joints = np.stack([lower, lower + 1, 0 * lower, 0 * lower], 1)
    weights = np.stack([1 - (t - lower), t - lower, 0 * t, 0 * t], 1)
    ibm = np.tile(np.eye(4), (3, 1, 1))
    ibm[:, 0, 3] = -bone_x
    return SkinnedMesh("tube", vertices, tri, joints, weights, [1, 2, 3], ibm, ("tube", "b0", "b1", "b2"),
                       [-1, -1, 1, 2], [[0, 0, 0], [-0.7, 0, 0], [0.7, 0, 0], [0.7, 0, 0]],
                       np.tile([1.0, 0, 0, 0], (4, 1)), np.ones((4, 3)), 0)


def build_source(root: Path, samples: int, faces: int, seed: int) -> str:
    """Write a one-model dataset in the reference layout; returns a description of the mesh."""
    rng = np.random.default_rng(seed)
    try:
        from pipeline.synth.quadruped import make_quadruped

        mesh, kind = make_quadruped("animal", rng, faces), "procedural quadruped"
    except ImportError:
        mesh, kind = _tube(faces), "skinned tube"
    layout = Layout(root)
    for sub in ("poses", "cameras", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    layout.mesh("animal").parent.mkdir(parents=True, exist_ok=True)
    save_skinned_mesh(mesh, layout.mesh("animal"))
    # Poses: every joint turned by up to 20 degrees about a random axis.
    rest = torch.tensor(rest_pose(mesh), dtype=torch.float64)
    axis = torch.tensor(rng.normal(size=(samples, mesh.num_nodes, 3)))
    angle = torch.tensor(rng.uniform(0, np.radians(20), (samples, mesh.num_nodes)))
    poses = rest.expand(samples, -1, -1).clone()
    poses[..., :4] = quaternion_multiply(rest[..., :4], axis_angle_to_quaternion(axis, angle))
    poses[:, mesh.mesh_node, :4] = rest[mesh.mesh_node, :4]
    # Cameras on a sphere around the origin, framing a ~2 unit object at 50 mm.
    azimuth, elevation = rng.uniform(0, 2 * np.pi, samples), rng.uniform(0.1, 0.6, samples)
    ce, se = np.cos(elevation), np.sin(elevation)
    eye = 4.0 * np.stack([ce * np.sin(azimuth), se, ce * np.cos(azimuth)], 1)  # (samples, 3)
    views = look_at(torch.tensor(eye), torch.zeros(samples, 3, dtype=torch.float64))
    for k in range(samples):
        sid = f"{k + 1:06d}"
        write_pose_file(layout.pose(sid), poses[k].numpy())
        atomic_write_text(layout.camera(sid), format_camera_txt(camera_pose_from_view(views[k]).numpy()))
        atomic_write_text(layout.metadata(sid), format_metadata(SampleMetadata("animal", 50.0)))
    return f"{kind}, {len(mesh.faces)} triangles, {mesh.num_vertices} vertices, {mesh.num_joints} joints"


def raw_pass(root: Path, resolution: int, layers: int, batch: int, backend: str) -> Callable[[], float]:
    """A function timing one pass of `render_dual_pointmaps` alone over every sample (skinned beforehand,
    one process, one thread); returns samples/s."""
    source = SourceDataset(root)
    mesh = load_skinned_mesh(source.layout.mesh("animal"))
    device = "cuda" if backend == "cuda" else "cpu"
    samples = [source.sample(i) for i in source.ids]
    posed = skin(mesh, np.stack([read_pose_file(s.pose_path) for s in samples]), device=device)
    views = view_from_camera_pose(torch.tensor(np.stack([s.camera_pose for s in samples]))).to(device)
    projections = projection_from_focal(torch.tensor([s.focal_length for s in samples])).to(device)
    canonical, faces = torch.tensor(mesh.vertices, device=device), torch.tensor(mesh.faces, device=device)

    def run(start: int, stop: int) -> None:
        out = render_dual_pointmaps(canonical, posed[start:stop], faces, views[start:stop],
                                    projections[start:stop], resolution, layers, backend=backend, workers=1)
        out.cpu()  # the pipeline needs the maps on the host too

    def timed() -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # like a Ray task with one CPU
        try:
            start = time.perf_counter()
            for k in range(0, len(samples), batch):
                run(k, k + batch)
            return len(samples) / (time.perf_counter() - start)
        finally:
            torch.set_num_threads(threads)

    run(0, min(batch, len(samples)))  # warm-up (CUDA context, kernels)
    return timed


def end_to_end(src: Path, out: Path, cpus: int, args: list[str], repeats: int,
               raw: Callable[[], float] | None = None) -> tuple[float, float]:
    """Best samples/s of the real render command on a local Ray with `cpus` CPUs (workers warmed), and
    of `raw` passes run between them (so both see the same load on a shared machine; 0 without).

    Each of the `repeats` runs writes a fresh OUT (the last one is kept).
    """

    @ray.remote(num_cpus=1)
    def warm() -> None:
        import pipeline.render_stage  # noqa: F401  (the imports a render task needs)

    best_raw, best = 0.0, float("inf")
    with ray_session(None, cpus):
        ray.get([warm.remote() for _ in range(cpus)])
        time.sleep(3.0)  # let Ray's own daemons finish starting: we time the steady state
        for _ in range(repeats):  # best of: other load on the machine only ever slows a pass down
            best_raw = max(best_raw, raw()) if raw is not None else 0.0
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            render.main([str(src), str(out), *args], standalone_mode=False)
            best = min(best, time.perf_counter() - start)
    records = load_manifest(out).columns["render"].shards.values()
    return sum(r.count for r in records) / best, best_raw


def store_sizes(out: Path, copy: Path) -> tuple[dict[str, float], float]:
    """({container: stored bytes per sample}, baseline npz bytes per sample) over every stored sample.

    The render column of `out` is copied sample by sample into the other container (in `copy`), so both
    are measured on the same maps; bytes are those of the shard data (what the records count).
    """
    manifest = load_manifest(out)
    column = manifest.columns["render"]
    other = "webdataset" if column.format == "zarr" else "zarr"
    twin = Manifest.create(manifest.source, manifest.shard_size, manifest.plan)
    twin.columns["render"] = ColumnInfo("render", other, SCHEMA_VERSION, column.config, column.fields)
    (copy / "render").mkdir(parents=True)
    publish_layout(copy, twin)
    baseline = []
    for plan in manifest.plan:
        with ShardWriter(copy / "render", plan, other, column.fields) as writer:
            for sample_id, fields in read_shard(out, column, plan.index):
                baseline.append(baseline_npz_bytes(fields["dpm"]))
                values = {name: fields[name] for name in fields} | {"mask": fields["mask"] > 0.5}
                writer.add(sample_id, values)
        twin.columns["render"].shards[plan.index] = writer.record
    per_sample = {}
    for name, records in ((column.format, column.shards), (other, twin.columns["render"].shards)):
        per_sample[name] = sum(r.bytes for r in records.values()) / sum(r.count for r in records.values())
    return per_sample, float(np.mean(baseline))


@click.command()
@click.option("--samples", type=click.IntRange(min=8), default=1024, show_default=True)
@click.option("--faces", type=click.IntRange(min=100), default=20000, show_default=True,
              help="Mesh triangles.")
@click.option("--resolution", type=click.IntRange(8, 4096), default=160, show_default=True)
@click.option("--layers", type=click.IntRange(1, 255), default=8, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--shard-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["zarr", "webdataset"]), default="zarr", show_default=True,
              help="Render column container.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed passes of each measurement; the best counts (the machine may be busy).")
@click.option("--append", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Markdown file to append a dated result line to (e.g. docs/benchmarks.md).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the measures against their targets to this JSON file.")
def main(samples: int, faces: int, resolution: int, layers: int, batch: int, shard_size: int, backend: str,
         fmt: str, repeats: int, append: Path | None, json_path: Path | None) -> None:
    backend = resolve_backend(backend)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="dualpm-bench-") as tmp:
        src = Path(tmp) / "src"
        mesh = build_source(src, samples, faces, seed=0)
        click.echo(f"{describe_machine()}; {samples} samples of a {mesh}; {resolution}px, {layers} layers, batch {batch}, "
                   f"{backend} backend")
        args = ["--resolution", str(resolution), "--layers", str(layers), "--batch", str(batch),
                "--shard-size", str(shard_size), "--backend", backend, "--format", fmt]
        raw_timer = raw_pass(src, resolution, layers, batch, backend)
        runs, raw = {}, 0.0
        for n in sorted({1, cpus}) if backend == "cpu" else [cpus]:
            # Raw passes alternate with the like-for-like run (1 CPU; the GPU run on CUDA).
            timer = raw_timer if n == 1 or backend == "cuda" else None
            runs[n], measured = end_to_end(src, Path(tmp) / f"out{n}", n, args, repeats, timer)
            raw = max(raw, measured)
        click.echo(f"raw renderer (1 thread):     {raw:8.1f} samples/s")
        for n, rate in runs.items():
            click.echo(f"end to end, Ray {n:2d} CPU(s): {rate:8.1f} samples/s")
        sizes, baseline = store_sizes(Path(tmp) / f"out{max(runs)}", Path(tmp) / "copy")
    ratio, size_ratio = runs[min(runs)] / raw, sizes[fmt] / baseline
    verdict = lambda ok: "OK" if ok else "MISSED"  # noqa: E731
    lines = [
        f"end to end (1 CPU) / raw:    {ratio:8.1%}  (target >= {TARGET_RATIO:.0%}: {verdict(ratio >= TARGET_RATIO)})",
        f"bytes per sample ({fmt}):{' ' * (10 - len(fmt))}{sizes[fmt] / 1024:8.1f} KiB stored, {baseline / 1024:.1f} "
        f"KiB baseline npz = {size_ratio:.1%}  (target <= {TARGET_BYTES:.0%}: {verdict(size_ratio <= TARGET_BYTES)})",
    ] + [f"bytes per sample ({name}):{' ' * (10 - len(name))}{size / 1024:8.1f} KiB = {size / baseline:.1%} "
         "(the same maps copied into the other container)" for name, size in sizes.items() if name != fmt]
    if backend == "cuda":
        lines.append(f"GPU end to end:              {runs[cpus]:8.1f} samples/s  (target >= {TARGET_GPU:.0f}: "
                     f"{verdict(runs[cpus] >= TARGET_GPU)})")
    click.echo("\n".join(lines))
    if json_path is not None:
        ray_cpus = f"Ray, {min(runs)} CPU" + ("s" if min(runs) > 1 else "")
        metrics = [
            Metric(f"{backend} end to end ({ray_cpus}) / raw renderer", f"{ratio:.0%}",
                   f">= {TARGET_RATIO:.0%}", ratio >= TARGET_RATIO),
            Metric("bytes per sample / reference npz", f"{size_ratio:.0%}", f"<= {TARGET_BYTES:.0%}",
                   size_ratio <= TARGET_BYTES),
        ]
        if backend == "cuda":
            metrics.append(Metric(f"cuda end to end samples/s ({cpus} CPUs, raw renderer {raw:.0f})",
                                  f"{runs[cpus]:.0f}", f">= {TARGET_GPU:.0f}", runs[cpus] >= TARGET_GPU))
        write_metrics(json_path, metrics)
    if append is not None:
        all_cpus = f", {runs[cpus]:.1f} with {cpus} CPUs" if cpus in runs and cpus != min(runs) else ""
        entry = (
            f"- {datetime.date.today().isoformat()} — {describe_machine()}; {mesh}; {resolution}px, {layers} layers, {fmt}, "
            f"batch {batch}, {backend}: raw renderer {raw:.1f} samples/s, end to end {runs[min(runs)]:.1f} with "
            f"{min(runs)} CPU ({ratio:.0%} of raw){all_cpus}; "
            + ", ".join(f"{name} {size / 1024:.1f} KiB/sample = {size / baseline:.0%}" for name, size in sizes.items())
            + f" of the reference npz ({baseline / 1024:.1f} KiB)\n"
        )
        record_benchmark(append, "Render pipeline", entry, intro=SECTION_INTRO)
        click.echo(f"appended to {append}")


if __name__ == "__main__":
    main()
