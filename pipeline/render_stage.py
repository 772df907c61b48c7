"""`dualpm-prep render`: source dataset -> column "render" of sparse dual point maps, one Ray task per shard.

Per shard (`render_shard`): group the samples by model, load each mesh once, read the poses, skin
and render in batches (`--batch`), check each sample (unreadable mesh, pose or camera, mesh outside
the view, non-finite values: recorded as that sample's failure), encode, and publish the shard
atomically. A batch that fails is rendered again sample by sample, so one bad sample never costs
the others of its shard.
Each sample holds (`render_fields`; docs/format.md says how each container stores them):

    dpm     the (H, W, L, 7) dual point map, stored sparse: hit counts and `--store-dtype` values of the hits
    mask    0/1 at the source's resolution: the source mask decoded by `dualpm.masks` (any encoding; an
            empty one fails the sample), or without one the rendered layer-1 coverage
    rgb     the source image (WebDataset: the file byte for byte; Zarr: (h, w, 3) uint8), when it has one
    meta    source id, model name, focal length (mm), camera pose (Z-up camera-to-world), the view and
            projection used, the clip planes used and the posed mesh's depth range, resolution, layers,
            backend, where the mask came from and its IoU with the rendered layer-1 coverage

Clip planes (`--near/--far`): the reference's 0.1 and 30 scene units by default, so published data
renders exactly as the reference renders it; `auto` fits them to each sample's posed mesh (depth
range [a, b] in camera space: near = a / 2, far = 2 b), for data in other units (a rig in cm).
A sample whose mesh covers no pixel fails with a message naming the plane that clipped it.

A Zarr column holds one typed array per field, so every sample's mask and image must have one size: the
driver reads them from the first sample with a mask and with an image (`source_sizes`), and a sample of
another size fails with a message saying so (WebDataset columns take any size).

The backend is decided once, in the driver, from the Ray cluster: `cuda` tasks (one GPU each) only
where the cluster has GPUs; `--backend cuda` without any fails before anything is submitted (a task
asking for a GPU that does not exist would wait forever).
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import ray
import torch

from dualpm import __version__
from dualpm.camera import FAR, NEAR, projection_from_focal, view_from_camera_pose
from dualpm.cliutils import FloatOrAuto, OutputFolder, handles_user_errors, renamed_option
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
from dualpm.store.encoding import SparseDualPointMap, rgb8
from dualpm.pointmaps import hits
from dualpm.store.shards import PreparedSample, prepare_sample
from pipeline.cluster import ClusterInfo, concurrent_tasks
from pipeline.remote_out import pull_layout, push_shard, stage_of
from pipeline.runner import PlannedStage, Stage, StageLaunch, StageRun, drive_stage, shard_stage_options

COLUMN = "render"
MAX_RETRIES = 3  # Ray re-runs a shard whose worker died (killed, node lost); the shard appears once
AUTO_NEAR, AUTO_FAR = 0.5, 2.0  # `auto` clip planes: these multiples of the nearest / farthest mesh depth


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
    near: float | str = NEAR  # clip distance, scene units, or "auto" (fitted per sample)
    far: float | str = FAR
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
                 volatile=("backend", "batch", "threads", "tool_version"),
                 implied={"near": NEAR, "far": FAR})  # columns made before --near/--far used these


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


def _read_image_bytes(path: Path) -> tuple[bytes, tuple[int, int]]:
    """The file's bytes, stored as they are, after checking that they decode (a corrupt source image
    fails its sample here rather than every later reader of the shard), and its upright (H, W)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err})") from err
    image = open_image(data, str(path))
    return data, (image.height, image.width)


@dataclass(frozen=True)
class ClipPlanes:
    """The clip planes of one sample and the posed mesh's depth range they were chosen for."""

    near: float  # scene units
    far: float
    depth: tuple[float, float]  # nearest and farthest posed vertex, camera-space depth (scene units)
    problem: str | None = None  # why no usable planes exist (then near/far are placeholders)

    def clipped_by(self) -> list[str]:
        """The planes that cut the mesh (partly or wholly)."""
        cuts = (("near", self.depth[0] < self.near), ("far", self.depth[1] > self.far))
        return [name for name, cut in cuts if cut]

    def uncovered(self) -> str:
        """Why a mesh covers no pixel: which plane clipped it, or (within both) the camera or pose."""
        lo, hi = self.depth
        where = f"the posed mesh's depth range is [{lo:.4g}, {hi:.4g}] scene units"
        if lo >= self.far:
            return (f"mesh outside the view: no pixel covered, the whole mesh is beyond the far plane "
                    f"({self.far:g}): {where}; use --far auto (or --near/--far VALUES)")
        if hi <= self.near:
            return (f"mesh outside the view: no pixel covered, the whole mesh is nearer than the near plane "
                    f"({self.near:g}): {where}; use --near auto (or --near/--far VALUES)")
        return f"mesh outside the view: no pixel covered (check the camera and pose files; {where})"


def clip_planes(depth_min: float, depth_max: float, near: float | str, far: float | str) -> ClipPlanes:
    """Clip planes of one sample: the fixed `near`/`far`, or for "auto" fitted to its depth range.

    Args:
        depth_min, depth_max: nearest and farthest posed vertex depth (camera space, scene units).
    """
    depth = (depth_min, depth_max)
    if near == "auto" and not depth_min > 0:
        return ClipPlanes(NEAR, FAR, depth, (
            f"--near auto: the posed mesh reaches behind the camera (depth range [{depth_min:.4g}, "
            f"{depth_max:.4g}] scene units); use a fixed --near (the mesh is then clipped there)"))
    planes = ClipPlanes(AUTO_NEAR * depth_min if near == "auto" else float(near),
                        AUTO_FAR * depth_max if far == "auto" else float(far), depth)
    if not planes.near < planes.far:
        return ClipPlanes(NEAR, FAR, depth, (
            f"near plane {planes.near:.4g} is not before far plane {planes.far:.4g} (the posed mesh's depth "
            f"range is [{depth_min:.4g}, {depth_max:.4g}] scene units); use --near auto --far auto"))
    return planes


def _zarr_size(what: str, path: Path, shape: tuple[int, ...], size: tuple[int, int] | None,
               config: RenderConfig) -> str | None:
    """Why an image or mask of `shape` cannot go into the Zarr column (which stores `size`), or None."""
    if config.format != "zarr" or tuple(shape[:2]) == size:
        return None
    return (f"{path}: {what} is {shape[0]}x{shape[1]}, the Zarr render column stores {size[0]}x{size[1]} "
            "(the first sample's size); resize the source, or render with --format webdataset, which keeps "
            "every size")


def _sample_fields(
    sample: SourceSample, dpm: SparseDualPointMap | np.ndarray, view: np.ndarray, projection: np.ndarray,
    config: RenderConfig, clip: ClipPlanes,
) -> PreparedSample | str:
    """The stored fields of one rendered sample, checked and encoded for the column, or why it failed.

    Args:
        dpm: the rendered map: sparse (cpu backend), or (H, W, L, 7) float32 dense on the CPU (cuda: split
            here, in the task's encoding threads, while the GPU renders the next batch).
        view, projection: (4, 4) used to render it.
        clip: the clip planes in `projection`, and the depth range they were chosen for.
    """
    if clip.problem is not None:
        return clip.problem
    sparse = isinstance(dpm, SparseDualPointMap)
    if not np.isfinite(dpm.values if sparse else dpm).all():
        return "non-finite values in the rendered dual point map (degenerate pose or mesh)"
    coverage = dpm.counts > 0 if sparse else hits(dpm[:, :, 0])  # (H, W) layer-1 hits
    if not coverage.any():
        return clip.uncovered()
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
            image, size = _read_image_bytes(sample.rgb_path)
            if sample.mask_path and tuple(mask.shape) != size:
                return (f"{sample.mask_path}: the mask is {mask.shape[1]}x{mask.shape[0]} pixels, its image "
                        f"{sample.rgb_path.name} is {size[1]}x{size[0]}: a mask must have its image's size")
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
        "near": clip.near,
        "far": clip.far,
        "depth_range": [float(f"{d:.6g}") for d in clip.depth],  # posed mesh, camera space
        "clipped_by": clip.clipped_by(),  # planes that cut the mesh (the reference renders such cuts too)
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


class _ShardResults:
    """What became of each sample of one shard: its fields (or their pending encode) or why it failed."""

    def __init__(self, source: SourceDataset):
        self.source = source
        self.results: dict[str, dict[str, Any] | str | Future] = {}
        self.rendered = 0  # samples whose maps were rendered
        self.unexpected: list[str] = []  # "<id>: <reason>" of failures that were not the data's fault

    def fail(self, sample_id: str, err: Exception, doing: str, prefix: str = "") -> None:
        """Record `err` as the failure of `sample_id`. A `DualPMError` is a problem of the sample's files
        and says which; anything else is unexpected (a bug, a broken worker): its type and message are
        kept, marked as such, so that it shows in failures.jsonl and the run's summary."""
        if isinstance(err, DualPMError):
            self.results[sample_id] = prefix + str(err)
            return
        layout, message = self.source.layout, " ".join(str(err).split())
        self.results[sample_id] = reason = (
            f"{prefix}unexpected {type(err).__name__} {doing} ({message}); pose {layout.pose(sample_id)}, "
            f"camera {layout.camera(sample_id)}: a bug or a broken worker, please report it"
        )
        self.unexpected.append(f"{sample_id}: {reason}")


Rendered = tuple[list[SourceSample], list[SparseDualPointMap] | np.ndarray, np.ndarray, np.ndarray, list["ClipPlanes"]]
# samples, maps (sparse, or cuda's (B, H, W, L, 7) dense), views, projections, clip planes


def _render_batch(
    mesh: SkinnedMesh, canonical: torch.Tensor, faces: torch.Tensor, poses: dict[str, np.ndarray],
    config: RenderConfig, chunk: list[SourceSample],
) -> Rendered:
    """Render `chunk` in one call: (chunk, maps, (B, 4, 4) views, (B, 4, 4) projections, clip planes),
    numpy on the CPU; maps: B sparse maps (cpu backend), or (B, H, W, L, 7) dense ones (cuda: split in the
    encoding threads, overlapping the GPU). canonical: (V, 3), faces: (F, 3), on the render device."""
    device = canonical.device
    posed = skin(mesh, np.stack([poses[s.id] for s in chunk]), device=device)  # (B, V, 3) world
    views = view_from_camera_pose(torch.tensor(np.stack([s.camera_pose for s in chunk])))  # (B, 4, 4) f64
    row = views[:, 2].to(posed.device)  # (B, 4): camera-space z = row . [x, y, z, 1]
    depth = -(posed.double() @ row[:, :3, None] + row[:, 3, None, None])[..., 0]  # (B, V)
    clips = [clip_planes(lo, hi, config.near, config.far)
             for lo, hi in zip(depth.amin(1).tolist(), depth.amax(1).tolist(), strict=True)]
    projections = torch.stack([  # (B, 4, 4) float64
        projection_from_focal(torch.tensor(s.focal_length, dtype=torch.float64), near=c.near, far=c.far)
        for s, c in zip(chunk, clips, strict=True)
    ])
    # cpu: the stored form straight from the hits (no dense block filled, scanned and split again)
    sparse = config.backend == "cpu"
    maps = render_dual_pointmaps(
        canonical, posed, faces, views.to(device), projections.to(device), config.resolution,
        config.layers, backend=config.backend, workers=1,  # Ray already runs one task per core
        sparse=sparse,
    )
    maps = maps if sparse else maps.cpu().numpy()  # (B, H, W, L, 7)
    return chunk, maps, views.numpy(), projections.numpy(), clips


def _render_chunk(render: Callable[[list[SourceSample]], Rendered], chunk: list[SourceSample],
                  shard: _ShardResults) -> list[Rendered]:
    """`render(chunk)` as one batch; if that raises, each sample alone, so only the one at fault fails."""
    alone = "rendering this sample alone"
    try:
        return [render(chunk)]
    except Exception as err:
        if len(chunk) == 1:
            shard.fail(chunk[0].id, err, alone)
            return []
    # Outside the handler: its traceback holds the failed batch's tensors (GPU memory).
    out = []
    for sample in chunk:
        try:
            out.append(render([sample]))
        except Exception as err:
            shard.fail(sample.id, err, alone)
    return out


def _render_model(
    source: SourceDataset,
    model: str,
    samples: list[SourceSample],
    config: RenderConfig,
    pool: ThreadPoolExecutor | None,
    shard: _ShardResults,
) -> None:
    """Render the samples of one model into `shard` (fields, failure reason, or a pending encode)."""
    try:
        mesh = load_mesh(source.layout.mesh(model))
    except Exception as err:
        for s in samples:
            shard.fail(s.id, err, "loading the mesh", prefix=f"model {model!r}: ")
        return
    poses = {}
    for s in samples:
        try:
            poses[s.id] = read_pose_file(s.pose_path, mesh.num_nodes)
        except Exception as err:
            shard.fail(s.id, err, "reading the pose")
    good = [s for s in samples if s.id in poses]
    device = "cuda" if config.backend == "cuda" else "cpu"
    canonical = torch.tensor(mesh.vertices, device=device)  # copies: the mesh arrays are read-only
    faces = torch.tensor(mesh.faces, device=device)
    render = functools.partial(_render_batch, mesh, canonical, faces, poses, config)
    for start in range(0, len(good), config.batch):
        for chunk, maps, views, projections, clips in _render_chunk(render, good[start : start + config.batch],
                                                                    shard):
            shard.rendered += len(chunk)
            for s, dpm, view, projection, clip in zip(chunk, maps, views, projections, clips, strict=True):
                if pool is None:
                    shard.results[s.id] = _sample_fields(s, dpm, view, projection, config, clip)
                else:
                    shard.results[s.id] = pool.submit(_sample_fields, s, dpm, view, projection, config, clip)


def render_shard(config: RenderConfig, plan: ShardPlan, out_column: str) -> ShardRecord:
    """Render, encode and publish shard `plan.index` of the render column in `out_column`.

    Per-sample problems are recorded in the shard (and so in failures.jsonl): problems of its files
    as they are, any other error as "unexpected" with its type. A batch that fails is rendered again
    sample by sample, so only the sample at fault fails. Problems of the worker itself raise: no
    usable CUDA backend here (`BackendUnavailable`), or a shard in which nothing rendered and some
    sample failed unexpectedly (a broken worker or a bug, not the data: the run stops, and a rerun
    redoes the shard rather than keeping its samples as failed).
    """
    if config.backend == "cuda":
        reason = cuda_backend_status()
        if reason is not None:
            raise BackendUnavailable(f"Ray worker on {socket.gethostname()}: {reason}")
    source = SourceDataset(config.source)
    shard = _ShardResults(source)
    by_model: dict[str, list[SourceSample]] = {}
    for sample_id in plan.ids:
        try:
            sample = source.sample(sample_id)
        except Exception as err:  # metadata or camera file missing or malformed (DatasetError), or worse
            shard.fail(sample_id, err, "reading the metadata and camera")
            continue
        by_model.setdefault(sample.model_name, []).append(sample)
    pool = ThreadPoolExecutor(config.threads) if config.threads > 1 else None
    try:
        for model, samples in by_model.items():
            _render_model(source, model, samples, config, pool, shard)
        if shard.unexpected and not shard.rendered:
            raise RuntimeError(f"shard {plan.index}: no sample rendered; {len(shard.unexpected)} failed "
                               f"unexpectedly, the first: {shard.unexpected[0]}")
        # The driver removed any earlier copy of this shard; overwrite covers a retry of this task
        # whose killed predecessor got as far as publishing.
        pull_layout(out_column)
        with ShardWriter(out_column, plan, config.format, render_fields(config), overwrite=True) as writer:
            for sample_id in plan.ids:  # plan order
                result = shard.results[sample_id]
                if isinstance(result, Future):
                    try:
                        result = result.result()
                    except Exception as err:
                        shard.fail(sample_id, err, "storing the rendered map")
                        result = shard.results[sample_id]
                if isinstance(result, str):
                    writer.fail(sample_id, result)
                else:
                    writer.add(sample_id, result)
        push_shard(out_column, writer.record)  # OUT on object storage: upload it from this node
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
@click.argument("out", type=OutputFolder(urls=True))
@click.option("--resolution", type=click.IntRange(8, 4096), default=160, show_default=True,
              help="Image side, pixels.")
@click.option("--layers", type=click.IntRange(1, 255), default=8, show_default=True,
              help="Depth layers stored.")
@click.option("--backend", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="cuda (nvdiffrast, one GPU per task) where the Ray cluster has GPUs, else cpu (Embree).")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="zarr", show_default=True,
              help="Shard container: zarr (typed arrays; one image size per column) or webdataset (tar "
                   "shards; any image size). docs/format.md.")
@click.option("--store-dtype", "precision", type=click.Choice(list(PRECISIONS)), default="float16",
              show_default=True,
              help="dtype the dual point map values are stored in (float16: relative error <= 4.9e-4; "
                   "docs/format.md).")
@renamed_option("--precision", new="--store-dtype", meaning="the stored dtype; --precision is the arithmetic "
                "precision of dualpm-infer and train.precision")
@click.option("--batch", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Images per render call.")
@click.option("--near", type=FloatOrAuto(), default=NEAR, show_default=True,
              help="Near clip plane, scene units; auto: half the nearest posed mesh depth, per sample.")
@click.option("--far", type=FloatOrAuto(), default=FAR, show_default=True,
              help="Far clip plane, scene units; auto: twice the farthest posed mesh depth, per sample "
                   "(for data not in metres, e.g. a rig in cm).")
@click.option("--workers", type=click.IntRange(min=1), default=None, show_default="all CPUs",
              help="Processes rendering at once: the CPUs a local Ray starts with (with --address, the cluster's).")
@click.option("--overwrite", is_flag=True,
              help="Redo every shard, also complete ones, and accept a new config.")
@shard_stage_options
@handles_user_errors
def render(src: Path, out: Path, resolution: int, layers: int, shard_size: int | None, backend: str, fmt: str,
           precision: str, batch: int, near: float | str, far: float | str, workers: int | None,
           address: str | None, connect_timeout: float, overwrite: bool, max_failures: int | None,
           dry_run: bool) -> None:
    """Render the dual point maps of source dataset SRC into the sharded store OUT (column "render");
    OUT may be an s3:// or gs:// URL (written through --stage)."""
    out = stage_of(out)
    if isinstance(near, float) and isinstance(far, float) and not near < far:
        raise click.BadParameter(f"--near {near:g} must be below --far {far:g}", param_hint="--near/--far")

    def plan(source: SourceDataset, manifest: Manifest) -> PlannedStage:
        mask_size, image_size = source_sizes(source, manifest, resolution) if fmt == "zarr" else (None, None)
        config = RenderConfig(str(source.root.resolve()), resolution, layers, backend, batch, fmt, near=near,
                              far=far, precision=precision, mask_size=mask_size, image_size=image_size)
        dry = config.to_json() | {"backend": f"{backend} (resolved when Ray starts)"}
        return PlannedStage(config, stage_for(config), dry)

    run = StageRun(COLUMN, src, out, shard_size, workers, address, connect_timeout, overwrite, max_failures, dry_run)
    drive_stage(run, plan, lambda cluster, planned, _: RenderLaunch(cluster, planned.config, out))


class RenderLaunch(StageLaunch):
    """Render shards as Ray tasks: one per CPU (Embree) or per GPU (nvdiffrast), one more queued."""

    def __init__(self, cluster: ClusterInfo, config: RenderConfig, out: Path):
        chosen = choose_backend(config.backend, cluster)
        self.resources, threads = task_resources(chosen, cluster)
        self.config = replace(config, backend=chosen, threads=threads)
        self.cluster, self.folder = cluster, str(column_dir(out, COLUMN).resolve())

    def stage(self) -> Stage:
        return stage_for(self.config)

    def start(self, todo: list[ShardPlan]) -> tuple[Callable[[ShardPlan], Any], int]:
        task = ray.remote(render_shard).options(max_retries=MAX_RETRIES, **self.resources)
        # One task queued beyond what runs keeps every worker busy between shards.
        return (lambda plan: task.remote(self.config, plan, self.folder)), \
            concurrent_tasks(self.cluster, self.resources) + 1
