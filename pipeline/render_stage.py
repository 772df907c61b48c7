"""`dualpm-prep render`: source dataset -> column "render" of sparse dual point maps, one Ray task per shard.

Per shard (`render_shard`): group the samples by model, load each mesh once, read the poses, skin
and render in batches (`--batch`), check each sample (unreadable mesh or pose, mesh outside the view,
non-finite values: recorded as that sample's failure), encode, and publish the shard atomically.
Each sample holds (`render_fields`; docs/format.md says how each container stores them):

    dpm     the (H, W, L, 7) dual point map, stored sparse: hit counts and `--precision` values of the hits
    mask    0/1 at the source's resolution: the source mask decoded by `dualpm.masks` (any encoding; an
            empty one fails the sample), or without one the rendered layer-1 coverage
    rgb     the source image (WebDataset: the file byte for byte; Zarr: (h, w, 3) uint8), when it has one
    meta    source id, model name, focal length (mm), camera pose (Z-up camera-to-world), the view and
            projection used, resolution, layers, backend, where the mask came from and its IoU with the
            rendered layer-1 coverage

A Zarr column holds one typed array per field, so every sample's mask and image must have one size: the
driver reads them from the first sample with a mask and with an image (`source_sizes`), and a sample of
another size fails with a message saying so (WebDataset columns take any size).

The backend is decided once, in the driver, from the Ray cluster: `cuda` tasks (one GPU each) only
where the cluster has GPUs; `--backend cuda` without any fails before anything is submitted (a task
asking for a GPU that does not exist would wait forever).
"""

from __future__ import annotations

import dataclasses
import functools
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import ray
import torch

from dualpm import __version__
from dualpm.camera import projection_from_focal, view_from_camera_pose
from dualpm.cliutils import handles_user_errors, show_and_save_config
from dualpm.data.source import Layout, SourceDataset, SourceSample
from dualpm.errors import BackendUnavailable, DatasetError, DualPMError, GltfError
from dualpm.gltf import SkinnedMesh, load_skinned_mesh
from dualpm.images import open_image
from dualpm.masks import INSIDE, mask_iou, read_mask, resize_mask
from dualpm.render import cuda_backend_status, render_dual_pointmaps
from dualpm.skinning import read_pose_file, skin
from dualpm.store import (
    FORMATS,
    PRECISION,
    PRECISIONS,
    SCHEMA_VERSION,
    FieldSpec,
    Manifest,
    ShardPlan,
    ShardRecord,
    ShardWriter,
    column_dir,
)
from dualpm.store.encoding import rgb8
from dualpm.store.shards import PreparedSample, prepare_sample
from pipeline.cluster import ClusterInfo, concurrent_tasks, ray_session
from pipeline.runner import (
    Stage,
    check_column,
    describe_plan,
    open_manifest,
    prepare_column,
    require_samples,
    run_shards,
    shard_stage_options,
)

COLUMN = "render"
MAX_RETRIES = 3  # Ray re-runs a shard whose worker died (killed, node lost); the shard appears once


@dataclass(frozen=True)
class RenderConfig:
    """Everything a render task needs; recorded as the column's config in manifest.json."""

    source: str  # absolute path of the source dataset
    resolution: int  # H = W, pixels
    layers: int
    backend: str  # 'cpu' or 'cuda' (resolved)
    batch: int  # images per render call
    format: str  # 'webdataset' or 'zarr'
    threads: int = 1  # encoding threads per task (GPU tasks encode while the GPU renders)
    precision: str = "float16"  # of the stored dual point map values
    mask_size: tuple[int, int] | None = None  # zarr: (h, w) of every stored mask
    image_size: tuple[int, int] | None = None  # zarr: (h, w) of every stored image; None: no images

    def to_json(self) -> dict[str, Any]:
        sizes = {k: None if v is None else list(v)  # as manifest.json gives them back
                 for k, v in (("mask_size", self.mask_size), ("image_size", self.image_size))}
        return asdict(self) | sizes | {"schema_version": SCHEMA_VERSION, "tool_version": __version__}


def render_fields(config: RenderConfig) -> dict[str, FieldSpec]:
    """What every sample of the render column holds and what it means (the schema block; checked by
    `dualpm-prep verify`). Zarr columns fix the mask and image sizes (`config.mask_size`, `image_size`)."""
    r, layers = config.resolution, config.layers
    zarr = config.format == "zarr"
    mask_size, image_size = (config.mask_size, config.image_size) if zarr else (None, None)
    fields = {
        "dpm": FieldSpec("dpm", (r, r, layers, 7), config.precision, about={
            "channels": ["canonical_x", "canonical_y", "canonical_z", "posed_x", "posed_y", "posed_z",
                         "alpha"],
            "units": "scene units; alpha 1 where layer l of the pixel hit a surface, else all 7 channels 0",
            "frames": "canonical: the mesh's rest pose, Y-up; posed: OpenGL camera, z minus view[2, 3]",
            "resolution": [r, r],
            "layers": layers,
            "precision": PRECISION[config.precision],
        }),
        "mask": FieldSpec("mask", mask_size, "uint8", about={
            "values": "1 inside the object, 0 outside",
            "resolution": list(mask_size) if mask_size else "the source image's (not the dual point map's)",
            "source": "the source mask, or the rendered layer-1 coverage without one (meta.mask says which)",
        }),
        "meta": FieldSpec("json", about={
            "keys": ["source_id", "model_name", "focal_length (mm, 36 mm sensor height)", "camera_pose "
                     "(4x4 camera-to-world, Blender Z-up world)", "view (4x4 world-to-camera, Y-up)",
                     "projection (4x4 OpenGL)", "resolution", "layers", "backend", "mask", "mask_iou"],
        }),
    }
    if not zarr or image_size is not None:
        fields["rgb"] = FieldSpec("image", (*image_size, 3) if zarr else None, "uint8", required=zarr, about={
            "values": "RGB, 8 bits per channel" if zarr else "the source image file, as found",
            "resolution": list(image_size) if zarr else "the source image's",
        })
    return fields


def source_sizes(source: SourceDataset, manifest: Manifest, resolution: int) -> tuple[tuple[int, int],
                                                                                   tuple[int, int] | None]:
    """((h, w) of the masks, (h, w) of the images or None without any) for a Zarr render column: those of
    the first planned sample with a mask file and with an image file (every sample must match them).
    Without mask files, masks are the rendered coverage at the render resolution."""
    sizes: dict[str, tuple[int, int]] = {}
    wanted = {kind: folder for kind, folder in (("mask", "masks"), ("rgb", "renders"))
              if (source.root / folder).is_dir()}
    for sample_id in (i for plan in manifest.plan for i in plan.ids):
        for kind in [k for k in wanted if k not in sizes]:
            path = source.layout.mask(sample_id) if kind == "mask" else source.layout.rgb(sample_id)
            if path.exists():
                width, height = open_image(path).size
                sizes[kind] = (height, width)
        if len(sizes) == len(wanted):
            break
    return sizes.get("mask", (resolution, resolution)), sizes.get("rgb")


def stage_for(config: RenderConfig) -> Stage:
    """The runner's description of the render column (backend, batch and threads do not change the data)."""
    return Stage(COLUMN, config.format, config.to_json(), render_fields(config),
                 volatile=("backend", "batch", "threads", "tool_version"))


# ---- one shard ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _cached_mesh(path: str, mtime_ns: int, size: int) -> SkinnedMesh:
    return load_skinned_mesh(path)


def load_mesh(path: Path) -> SkinnedMesh:
    """`load_skinned_mesh`, cached per worker process: Ray reuses workers, and the shards of a model
    would otherwise parse its glTF again each time. The key includes mtime and size, so an edited
    file is read again; SkinnedMesh arrays are read-only, so sharing them is safe."""
    try:
        stat = path.stat()
    except OSError as err:
        raise GltfError(f"{path}: cannot read the mesh ({err})") from err
    return _cached_mesh(str(path), stat.st_mtime_ns, stat.st_size)


def _read_image_bytes(path: Path) -> bytes:
    """The file's bytes, stored as they are, after checking that they decode: a corrupt source
    image fails its sample here rather than every later reader of the shard."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err})") from err
    open_image(data, str(path))
    return data


def _zarr_size(what: str, path: Path, shape: tuple[int, ...], size: tuple[int, int] | None,
               config: RenderConfig) -> str | None:
    """Why an image or mask of `shape` cannot go into the Zarr column (which stores `size`), or None."""
    if config.format != "zarr" or tuple(shape[:2]) == size:
        return None
    return (f"{path}: {what} is {shape[0]}x{shape[1]}, the Zarr render column stores {size[0]}x{size[1]} "
            "(the first sample's size); resize the source, or render with --format webdataset, which keeps "
            "every size")


def _sample_fields(
    sample: SourceSample, dpm: np.ndarray, view: np.ndarray, projection: np.ndarray, config: RenderConfig
) -> PreparedSample | str:
    """The stored fields of one rendered sample, checked and encoded for the column, or why it failed.

    Args:
        dpm: (H, W, L, 7) float32 rendered map, CPU. view, projection: (4, 4) used to render it.
    """
    if not np.isfinite(dpm).all():
        return "non-finite values in the rendered dual point map (degenerate pose or mesh)"
    coverage = dpm[:, :, 0, 6] > 0  # (H, W) layer-1 hits
    if not coverage.any():
        return "mesh outside the view: no pixel covered (check the camera and pose files)"
    fields: dict[str, Any] = {"dpm": dpm}
    try:
        mask, iou = coverage, 1.0
        if sample.mask_path:
            mask = read_mask(sample.mask_path) > INSIDE  # (h, w) bool at the source's resolution
            if not mask.any():
                return (f"{sample.mask_path}: the mask is empty, but the render covers {int(coverage.sum())} "
                        "pixels of layer 1 (a mask saved with other values than the file's type suggests?)")
            iou = mask_iou(resize_mask(mask, coverage.shape), coverage)
            if reason := _zarr_size("the mask", sample.mask_path, mask.shape, config.mask_size, config):
                return reason
        elif config.format == "zarr" and mask.shape != config.mask_size:  # coverage at the column's size
            mask = resize_mask(mask, config.mask_size).numpy() > INSIDE
        fields["mask"] = mask
        if sample.rgb_path and (config.format == "webdataset" or config.image_size is not None):
            image = _read_image_bytes(sample.rgb_path)
            if config.format == "zarr":
                image = rgb8(image, str(sample.rgb_path))  # (h, w, 3) uint8
                if reason := _zarr_size("the image", sample.rgb_path, image.shape, config.image_size, config):
                    return reason
            fields["rgb"] = image
        elif config.format == "zarr" and config.image_size is not None:
            return (f"no image {Layout(Path(config.source)).rgb(sample.id)}: a Zarr render column stores one "
                    "per sample (add it, or render with --format webdataset)")
    except DualPMError as err:
        return str(err)
    fields["meta"] = {
        "source_id": sample.id,
        "model_name": sample.model_name,
        "focal_length": sample.focal_length,
        "camera_pose": sample.camera_pose.tolist(),
        "view": view.tolist(),
        "projection": projection.tolist(),
        "resolution": [config.resolution, config.resolution],
        "layers": config.layers,
        "backend": config.backend,
        "mask": "source" if sample.mask_path else "rendered",
        "mask_iou": round(iou, 4),  # source mask (area-resized) vs rendered layer-1 coverage
    }
    try:  # encodes (compresses) here, in the task's encoding threads
        return prepare_sample(render_fields(config), config.format, fields, f"sample {sample.id!r}")
    except DualPMError as err:  # EncodingError: values beyond float16, etc.
        return str(err)


def _render_model(
    source: SourceDataset,
    model: str,
    samples: list[SourceSample],
    config: RenderConfig,
    pool: ThreadPoolExecutor | None,
    results: dict[str, PreparedSample | str | Future],
) -> None:
    """Render the samples of one model into `results` (fields, failure reason, or a pending encode)."""
    try:
        mesh = load_mesh(source.layout.mesh(model))
    except DualPMError as err:
        results.update({s.id: f"model {model!r}: {err}" for s in samples})
        return
    poses = {}
    for s in samples:
        try:
            poses[s.id] = read_pose_file(s.pose_path, mesh.num_nodes)
        except DualPMError as err:
            results[s.id] = str(err)
    good = [s for s in samples if s.id in poses]
    device = "cuda" if config.backend == "cuda" else "cpu"
    canonical = torch.tensor(mesh.vertices, device=device)  # copies: the mesh arrays are read-only
    faces = torch.tensor(mesh.faces, device=device)
    for start in range(0, len(good), config.batch):
        chunk = good[start : start + config.batch]
        posed = skin(mesh, np.stack([poses[s.id] for s in chunk]), device=device)  # (B, V, 3) world
        views = view_from_camera_pose(torch.tensor(np.stack([s.camera_pose for s in chunk])))  # (B, 4, 4) f64
        focals = torch.tensor([s.focal_length for s in chunk], dtype=torch.float64)
        projections = projection_from_focal(focals)  # (B, 4, 4)
        maps = render_dual_pointmaps(
            canonical, posed, faces, views.to(device), projections.to(device), config.resolution,
            config.layers, backend=config.backend, workers=1,  # Ray already runs one task per core
        ).cpu().numpy()  # (B, H, W, L, 7)
        for s, dpm, view, projection in zip(chunk, maps, views.numpy(), projections.numpy(), strict=True):
            if pool is None:
                results[s.id] = _sample_fields(s, dpm, view, projection, config)
            else:
                results[s.id] = pool.submit(_sample_fields, s, dpm, view, projection, config)


def render_shard(config: RenderConfig, plan: ShardPlan, out_column: str) -> ShardRecord:
    """Render, encode and publish shard `plan.index` of the render column in `out_column`.

    Per-sample problems are recorded in the shard (and so in failures.jsonl); problems of the
    worker itself (no usable CUDA backend here) raise `BackendUnavailable`.
    """
    if config.backend == "cuda":
        reason = cuda_backend_status()
        if reason is not None:
            raise BackendUnavailable(f"Ray worker on {socket.gethostname()}: {reason}")
    source = SourceDataset(config.source)
    results: dict[str, PreparedSample | str | Future] = {}
    by_model: dict[str, list[SourceSample]] = {}
    for sample_id in plan.ids:
        try:
            sample = source.sample(sample_id)
        except DualPMError as err:  # metadata or camera file missing or malformed
            results[sample_id] = str(err)
            continue
        by_model.setdefault(sample.model_name, []).append(sample)
    pool = ThreadPoolExecutor(config.threads) if config.threads > 1 else None
    try:
        for model, samples in by_model.items():
            _render_model(source, model, samples, config, pool, results)
        # The driver removed any earlier copy of this shard; overwrite covers a retry of this task
        # whose killed predecessor got as far as publishing.
        with ShardWriter(out_column, plan, config.format, render_fields(config), overwrite=True) as writer:
            for sample_id in plan.ids:  # plan order
                result = results[sample_id]
                result = result.result() if isinstance(result, Future) else result
                if isinstance(result, str):
                    writer.fail(sample_id, result)
                else:
                    writer.add(sample_id, result)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return writer.record


# ---- driver -------------------------------------------------------------------------------------


def choose_backend(requested: str, cluster: ClusterInfo) -> str:
    """'cpu' or 'cuda' for the tasks, from the cluster's resources (never a GPU task without GPUs)."""
    if requested == "cuda" and cluster.gpus == 0:
        where = f"the Ray cluster at {cluster.address}" if cluster.address else "the local Ray cluster"
        raise BackendUnavailable(
            f"--backend cuda: there is no GPU in {where} ({cluster.nodes} nodes, {cluster.cpus} CPUs, "
            "0 GPUs); use --backend cpu (or auto) to render with Embree on CPUs"
        )
    if requested == "auto":
        return "cuda" if cluster.gpus > 0 else "cpu"
    return requested


def task_resources(backend: str, cluster: ClusterInfo) -> tuple[dict[str, float], int]:
    """(Ray resources of one shard task, encoding threads in it)."""
    if backend == "cuda":
        # One task per GPU; the CPUs that come with a GPU encode while the GPU renders the next batch.
        threads = max(1, cluster.cpus // max(cluster.gpus, 1))
        return {"num_gpus": 1, "num_cpus": threads}, threads
    return {"num_cpus": 1}, 1


@click.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--resolution", type=click.IntRange(8, 4096), default=160, show_default=True,
              help="Image side, pixels.")
@click.option("--layers", type=click.IntRange(1, 255), default=8, show_default=True,
              help="Depth layers stored.")
@click.option("--backend", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="cuda (nvdiffrast, one GPU per task) where the Ray cluster has GPUs, else cpu (Embree).")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="zarr", show_default=True,
              help="Shard container: zarr (typed arrays; one image size per column) or webdataset (tar "
                   "shards; any image size). docs/format.md.")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="float16", show_default=True,
              help="Stored dual point map values (float16: relative error <= 4.9e-4; docs/format.md).")
@click.option("--batch", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Images per render call.")
@click.option("--workers", type=click.IntRange(min=1), default=None, show_default="all CPUs",
              help="CPUs of the local Ray (ignored with --address).")
@click.option("--overwrite", is_flag=True,
              help="Redo every shard, also complete ones, and accept a new config.")
@shard_stage_options
@handles_user_errors
def render(src: Path, out: Path, resolution: int, layers: int, shard_size: int | None, backend: str, fmt: str,
           precision: str, batch: int, workers: int | None, address: str | None, overwrite: bool,
           max_failures: int | None, dry_run: bool) -> None:
    """Render the dual point maps of source dataset SRC into the sharded store OUT (column "render")."""
    source = SourceDataset(src)
    manifest = open_manifest(out, source, shard_size)
    require_samples(manifest, source)
    mask_size, image_size = source_sizes(source, manifest, resolution) if fmt == "zarr" else (None, None)
    config = RenderConfig(str(source.root.resolve()), resolution, layers, backend, batch, fmt,
                          precision=precision, mask_size=mask_size, image_size=image_size)
    check_column(out, manifest, stage_for(config), overwrite)  # before Ray starts or anything is written
    if dry_run:
        show_and_save_config(config.to_json() | {"backend": f"{backend} (resolved when Ray starts)"}, None,
                             "render config (dry run)")
        click.echo(describe_plan(manifest))
        return
    with ray_session(address, None if address else workers) as cluster:
        chosen = choose_backend(backend, cluster)
        resources, threads = task_resources(chosen, cluster)
        config = dataclasses.replace(config, backend=chosen, threads=threads)
        stage = stage_for(config)
        out.mkdir(parents=True, exist_ok=True)
        show_and_save_config(config.to_json(), out / "render.config.yaml", "render config")
        resources_line = f"Ray: {cluster.nodes} nodes, {cluster.cpus} CPUs, {cluster.gpus} GPUs"
        click.echo(f"{describe_plan(manifest)}; {resources_line}")
        todo = prepare_column(out, manifest, stage, overwrite)
        task = ray.remote(render_shard).options(max_retries=MAX_RETRIES, **resources)
        folder = str(column_dir(out, COLUMN).resolve())
        # One task queued beyond what runs keeps every worker busy between shards.
        summary = run_shards(out, manifest, stage, todo, lambda plan: task.remote(config, plan, folder),
                             max_failures, concurrent_tasks(cluster, resources) + 1)
    click.echo(summary.line())
