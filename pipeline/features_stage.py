"""`dualpm-prep features`: source images -> column "features" (float16 feature maps), on Ray actors.

    basis = fit once (one Ray task, the workers' resources) or reuse OUT/features.basis.safetensors
    actors = one per GPU (`num_gpus=1`), else one per CPU slot; each builds its extractor once
    run_shards(...): every shard of the plan goes to an idle actor, which publishes it atomically

Each stored sample holds one field, `features`: a (dim, grid, grid) float16 array at the extractor's
native grid (the trainer upsamples). Shard k holds the samples of plan shard k in plan order, so the
column joins the render column by sample id whatever ran first: without a manifest in OUT, the plan is
made here exactly as the render stage makes it (`runner.open_manifest`).

The PCA basis (sd-dino: three decoder-block PCAs and the final one; dino: the final one) is fitted on
`--pca-samples` images drawn from the train split with a fixed seed, before any shard starts, saved
next to the manifest, and handed to every actor, so all shards of all runs use the same basis. A rerun
reuses the stored basis after checking it was fitted for the same spec, weights and sample count
(`--overwrite` refits it). rgb has no PCA (an empty basis) and precomputed no model at all: its actors
import the dataset's packed `features/<id>_feat.png` files.

Inside an actor, the images (and masks, where used) of the next batch are decoded by a small thread
pool while the current batch runs through the models, so the GPU does not wait for PNG decoding.
An unreadable sample (missing, corrupt or truncated image) is recorded as that sample's failure and
the rest of its batch goes on; an actor that dies is restarted and its shard retried by Ray.

Column config (manifest.json, copied into checkpoints): see `dualpm.features.column`, which also
gets the spec back (`spec_from_column`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import ray
import torch

from dualpm import __version__
from dualpm.cliutils import OutputFolder, handles_user_errors
from dualpm.data.source import Layout, SourceDataset
from dualpm.errors import BackendUnavailable, ConfigError, DatasetError, DualPMError
from dualpm.features import (
    EXTRACTORS,
    FeatureBasis,
    FeatureExtractor,
    FeatureSpec,
    build_extractor,
    check_basis,
    extract,
    fit_basis,
    read_packed,
    spec_from_packed,
)
from dualpm.features.base import DINO_PATCH, require_folder
from dualpm.features.column import BASIS_NAME, COLUMN, FIELD, VOLATILE, uses_basis
from dualpm.features.dino import Dinov2Backbone
from dualpm.images import load_image, stack_images
from dualpm.masks import read_mask
from dualpm.store import (
    FORMATS,
    SCHEMA_VERSION,
    FieldSpec,
    Manifest,
    ShardPlan,
    ShardRecord,
    ShardWriter,
    column_dir,
)
from pipeline.cluster import ClusterInfo
from pipeline.remote_out import pull_layout, push_shard, stage_of
from pipeline.runner import PlannedStage, Stage, StageLaunch, StageRun, drive_stage, shard_stage_options

PCA_SEED = 0  # draws the PCA sample and seeds the fit: a refit gives the same basis
MAX_RESTARTS = 2  # a dead actor is restarted, and the shard it was on retried, this many times
SD_PER_GRID = 16  # sd-dino's finest decoder block is 1/16 of the SD input: 960 px -> the 60 x 60 grid


@dataclass(frozen=True)
class FeaturesConfig:
    """Everything a features worker needs (besides the basis)."""

    source: str  # absolute path of the source dataset
    spec: FeatureSpec
    format: str  # 'zarr' or 'webdataset'
    batch: int  # images per extractor call
    device: str  # 'cpu' or 'cuda' (resolved), or 'auto' before Ray starts
    pca_samples: int  # images the basis is fitted on (at most; fewer when the train split is smaller)
    threads: int = 1  # torch threads and image-decoding threads per actor


def column_config(config: FeaturesConfig, basis: FeatureBasis | None) -> dict[str, Any]:
    """The column's config in manifest.json; `basis` None before it is fitted (or without PCA)."""
    fitted = uses_basis(config.spec) and basis is not None
    return config.spec.to_dict() | {
        "basis": BASIS_NAME if uses_basis(config.spec) else None,
        "basis_sha256": basis.content_hash() if fitted else None,
        "model_id": basis.meta.get("model_id", "") if fitted else "",
        "pca_samples": config.pca_samples if uses_basis(config.spec) else None,
        "batch": config.batch,
        "device": config.device,
        "threads": config.threads,
        "schema_version": SCHEMA_VERSION,
        "tool_version": __version__,
    }


def feature_fields(spec: FeatureSpec) -> dict[str, FieldSpec]:
    """The one field of the features column, and what it means (the schema block)."""
    about = {"channels": f"{spec.dim} {spec.extractor} features (through the PCA basis {BASIS_NAME} if any)",
             "grid": [spec.grid, spec.grid], "precision": "float16, rounded to nearest",
             "resolution": "the extractor's grid over the source image; the trainer upsamples it bilinearly"}
    return {FIELD: FieldSpec("array", (spec.dim, spec.grid, spec.grid), "float16", about=about)}


def stage_for(config: FeaturesConfig, basis: FeatureBasis | None, fitted: bool = True) -> Stage:
    """The runner's description of the column. `fitted=False`: the basis is not known yet, so its
    hash and the weights' fingerprint are left out of the comparison with a recorded config."""
    volatile = VOLATILE if fitted else VOLATILE + ("basis_sha256", "model_id")
    return Stage(COLUMN, config.format, column_config(config, basis), feature_fields(config.spec), volatile=volatile)


# ---- image loading, overlapped with compute -------------------------------------------------------

Loaded = tuple[torch.Tensor, torch.Tensor | None]  # image (3, H, W), mask (1, H, W) or None


def _load_sample(layout: Layout, sample_id: str, mask: str) -> Loaded:
    """Decode one sample's image, and its mask when `mask` is 'required' or 'optional' (if present)."""
    image = load_image(layout.rgb(sample_id))
    path = layout.mask(sample_id)
    if mask == "required" or (mask == "optional" and path.exists()):
        return image, torch.from_numpy(read_mask(path))[None]
    return image, None


def prefetched_batches(
    layout: Layout, ids: list[str], batch: int, mask: str, pool: ThreadPoolExecutor
) -> Iterator[list[tuple[str, Loaded | str]]]:
    """Batches of (id, decoded sample or failure reason), decoding batch i+1 in `pool` while the
    caller works on batch i (decoding releases the GIL; PIL and numpy do the work)."""
    chunks = [ids[i : i + batch] for i in range(0, len(ids), batch)]

    def start(chunk: list[str]) -> list[Future]:
        return [pool.submit(_load_sample, layout, sid, mask) for sid in chunk]

    pending = start(chunks[0]) if chunks else []
    for k, chunk in enumerate(chunks):
        current, pending = pending, (start(chunks[k + 1]) if k + 1 < len(chunks) else [])
        out: list[tuple[str, Loaded | str]] = []
        for sid, future in zip(chunk, current, strict=True):
            try:
                out.append((sid, future.result()))
            except DualPMError as err:  # missing, corrupt, truncated: this sample's failure
                out.append((sid, str(err)))
        yield out


def _stack(loaded: list[Loaded], size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, 3, size, size) images and (B, 1, size, size) masks (None unless every sample has one)."""
    images = stack_images([im for im, _ in loaded], size)
    masks = [m for _, m in loaded]
    return images, (stack_images(masks, size) if all(m is not None for m in masks) else None)


# ---- the extractor and the basis (worker side) -----------------------------------------------------


def build_worker_extractor(config: FeaturesConfig) -> FeatureExtractor:
    """`build_extractor` on this worker's device, quietly (no download or loading progress bars)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"Ray worker on {socket.gethostname()}: CUDA is not available to torch here")
    if uses_basis(config.spec):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        if config.spec.extractor == "sd-dino":
            import diffusers

            diffusers.utils.logging.disable_progress_bar()
    return build_extractor(config.spec, config.device)


def pca_sample_ids(manifest: Manifest, count: int) -> list[str]:
    """`count` train ids (all of them if fewer), drawn with a fixed seed, in plan order."""
    train = [sid for plan in manifest.plan if plan.split == "train" for sid in plan.ids]
    if not train:
        raise DatasetError("no train samples to fit the feature PCA basis on (every sample is in splits/val.txt)")
    pick = np.random.default_rng(PCA_SEED).choice(len(train), min(count, len(train)), replace=False)
    return [train[i] for i in sorted(pick)]


def fit_or_check_basis(config: FeaturesConfig, path: str, ids: list[str], overwrite: bool) -> str:
    """Check the basis stored at `path` against the extractor, or fit it on `ids` and save it there.

    Runs once per run, before the actors start, as a Ray task with the actors' resources (the fit
    needs the models, on the GPU when there is one). Returns a line for the log.
    """
    torch.set_num_threads(config.threads)
    extractor = build_worker_extractor(config)
    target = Path(path)
    if target.exists() and not overwrite:
        basis = FeatureBasis.load(target)
        try:
            check_basis(basis, extractor, source=str(target))
            if basis.meta.get("pca_samples") != str(config.pca_samples):
                raise ConfigError(
                    f"{target}: fitted with --pca-samples {basis.meta.get('pca_samples')}, "
                    f"not {config.pca_samples}"
                )
        except ConfigError as err:
            raise ConfigError(f"{err}; pass --overwrite to refit it (this redoes every shard)") from err
        return f"feature basis: reusing {target} (fitted on {basis.meta.get('pca_images')} train images)"
    layout = Layout(Path(config.source))
    skipped: dict[str, str] = {}
    with ThreadPoolExecutor(max(1, config.threads)) as pool:

        def sample() -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
            for chunk in prefetched_batches(layout, ids, config.batch, "optional", pool):
                skipped.update({sid: r for sid, r in chunk if isinstance(r, str)})
                good = [r for _, r in chunk if not isinstance(r, str)]
                if good:
                    yield _stack(good, extractor.input_size)

        try:
            basis = fit_basis(extractor, sample, seed=PCA_SEED)
        except DatasetError as err:
            first = next(iter(skipped.items()), None)
            hint = f" (unreadable: {first[0]}: {first[1]})" if first else ""
            raise DatasetError(f"cannot fit the feature basis on {len(ids)} train images: {err}{hint}") from err
    used = len(ids) - len(skipped)
    basis = FeatureBasis(basis.stages, dict(basis.meta) | {"pca_samples": str(config.pca_samples),
                                                           "pca_images": str(used)})
    target.parent.mkdir(parents=True, exist_ok=True)
    basis.save(target)
    return f"feature basis: fitted on {used} train images ({len(skipped)} unreadable skipped) -> {target}"


# ---- one shard --------------------------------------------------------------------------------------


def _half(features: np.ndarray) -> tuple[np.ndarray, bool]:
    """(C, h, w) float32 -> float16 copy, and whether every value is finite in float16."""
    half = features.astype(np.float16)
    return half, bool(np.isfinite(half).all())


def extract_shard(
    config: FeaturesConfig,
    extractor: FeatureExtractor | None,
    basis: FeatureBasis | None,
    plan: ShardPlan,
    out_column: str,
    pool: ThreadPoolExecutor,
) -> ShardRecord:
    """Extract (or, for precomputed, import) the features of shard `plan.index` and publish it.

    Args:
        extractor: from `build_worker_extractor` (None for precomputed).
        basis: the run's basis (empty for rgb, None for precomputed).
        pool: decoding threads (the next batch is decoded while this one is extracted).
    Per-sample problems are recorded in the shard; anything else (a model error, CUDA out of memory)
    raises, and the run stops with the message.
    """
    spec = config.spec
    layout = Layout(Path(config.source))
    results: dict[str, np.ndarray | str] = {}
    bad_values = "features are not finite in float16 (NaN, inf, or beyond +-65504)"
    if extractor is None:  # precomputed: read the packed PNGs
        futures = [pool.submit(read_packed, layout.feature(sid), spec.dim, spec.grid) for sid in plan.ids]
        for sid, future in zip(plan.ids, futures, strict=True):
            try:
                half, finite = _half(future.result().numpy())
            except DualPMError as err:
                results[sid] = str(err)
                continue
            results[sid] = half if finite else bad_values
    else:
        mask = "required" if spec.rgb_mask_channel else "none"
        for chunk in prefetched_batches(layout, list(plan.ids), config.batch, mask, pool):
            results.update({sid: r for sid, r in chunk if isinstance(r, str)})
            good = [(sid, r) for sid, r in chunk if not isinstance(r, str)]
            if not good:
                continue
            images, masks = _stack([r for _, r in good], extractor.input_size)
            device = extractor.device
            masks = None if masks is None else masks.to(device)
            feats = extract(extractor, basis, images.to(device), masks).cpu().numpy()  # (B, dim, h, w)
            for (sid, _), f in zip(good, feats, strict=True):
                half, finite = _half(f)
                results[sid] = half if finite else bad_values
    # The driver removed any earlier copy; overwrite covers a retry whose dead predecessor published.
    with ShardWriter(out_column, plan, config.format, feature_fields(spec), overwrite=True) as writer:
        for sid in plan.ids:  # plan order
            result = results[sid]
            if isinstance(result, str):
                writer.fail(sid, result)
            else:
                writer.add(sid, {FIELD: result})
    return push_shard(out_column, writer.record)  # OUT on object storage: upload it from this node


class FeatureWorker:
    """Ray actor: on first use (once per process, so also after a restart) builds its extractor and
    loads the run's basis from `basis_path`, refusing a file whose hash is not `basis_sha256` (it
    changed during the run); then extracts whole shards. The basis travels as a path, not as an
    object in Ray's store, so a restart never depends on an object's lifetime."""

    def __init__(self, config: FeaturesConfig, basis_path: str | None, basis_sha256: str | None):
        torch.set_num_threads(config.threads)
        self.config, self.basis_path, self.basis_sha256 = config, basis_path, basis_sha256
        self.extractor: FeatureExtractor | None = None
        self.basis: FeatureBasis | None = None
        self.pool = ThreadPoolExecutor(max(1, config.threads), thread_name_prefix="decode")

    def _ready(self) -> None:
        if self.extractor is not None or self.config.spec.extractor == "precomputed":
            return
        extractor = build_worker_extractor(self.config)
        if self.basis_path is None:  # rgb: no PCA stages
            self.basis = fit_basis(extractor, lambda: [])
        else:
            basis = FeatureBasis.load(self.basis_path)
            if basis.content_hash() != self.basis_sha256:
                raise ConfigError(f"{self.basis_path}: the feature basis changed while this run was using it")
            self.basis = basis
        self.extractor = extractor

    def extract_shard(self, plan: ShardPlan, out_column: str) -> ShardRecord:
        pull_layout(out_column)  # OUT on object storage, another node: the Zarr metadata and basis first
        self._ready()
        return extract_shard(self.config, self.extractor, self.basis, plan, out_column, self.pool)


class ShardDispatcher:
    """Ray async actor handing each shard to an idle `FeatureWorker`.

    Calling the workers directly would queue shards per actor up front (a slow or restarting actor
    would hold its queue); through this, `run` returns one ref per shard for the runner at once,
    while the work goes to whichever actor is free.
    """

    def __init__(self, workers: list[Any]):
        self.idle: asyncio.Queue = asyncio.Queue()
        for worker in workers:
            self.idle.put_nowait(worker)

    async def run(self, plan: ShardPlan, out_column: str) -> ShardRecord:
        worker = await self.idle.get()
        try:
            return await worker.extract_shard.remote(plan, out_column)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, DualPMError):  # a user error: its one-line message, not two tracebacks
                raise err.cause from None
            raise
        finally:
            self.idle.put_nowait(worker)


# ---- driver -----------------------------------------------------------------------------------------


def make_spec(source: SourceDataset, manifest: Manifest, extractor: str, sd_model: str | None,
              dino_model: str | None, dim: int | None, grid: int | None, timestep: int | None,
              sd_pca_dims: tuple[int, int, int] | None, mask_channel: bool) -> FeatureSpec:
    """The `FeatureSpec` of the command-line options (None: the spec's default).

    `grid` sets the input sizes of the models: DINOv2 14 * grid pixels and Stable Diffusion 16 * grid
    (its finest decoder block is 1/16 of the input). precomputed reads its grid off the first
    packed file of the plan.
    """
    options: dict[str, Any] = {"dim": dim}
    if timestep is not None:
        options["timestep"] = timestep
    if sd_pca_dims is not None:
        options["sd_pca_dims"] = tuple(sd_pca_dims)
    if mask_channel:
        options["rgb_mask_channel"] = True
    if extractor == "sd-dino":
        if not sd_model:
            raise ConfigError(
                "--extractor sd-dino needs --sd-model PATH (or DUALPM_SD_MODEL): a local diffusers Stable "
                "Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/); see the README"
            )
        options["sd_path"] = str(Path(sd_model).expanduser().resolve())
        if grid is not None:
            options["sd_image_size"] = SD_PER_GRID * grid
    if extractor in ("sd-dino", "dino"):
        if not dino_model:
            raise ConfigError(
                f"--extractor {extractor} needs --dino-model PATH (or DUALPM_DINO_MODEL): a local "
                "transformers DINOv2 folder (e.g. facebook/dinov2-base); see the README"
            )
        options["dino_path"] = str(Path(dino_model).expanduser().resolve())
        if grid is not None:
            options["dino_image_size"] = DINO_PATCH * grid
    if extractor == "rgb":
        options["grid"] = grid
    if extractor == "precomputed":
        found = [p for p in (Layout(source.root).feature(i) for plan in manifest.plan for i in plan.ids)
                 if p.exists()]
        if not found:
            raise DatasetError(
                f"{source.root / 'features'}: no packed feature file (<id>_feat.png) for any sample; "
                "--extractor precomputed imports the published dataset's features"
            )
        packed = spec_from_packed(found[0], 64 if dim is None else dim)
        if grid is not None and grid != packed.grid:
            raise ConfigError(f"--grid {grid}: the packed features in {found[0].parent} are {packed.grid} wide")
        return packed
    return FeatureSpec(extractor, **options)


def check_weights(spec: FeatureSpec) -> None:
    """Cheap checks of the model folders before Ray starts: they exist, and the DINOv2 one holds a
    DINOv2 config. The Stable Diffusion folder's classes and configs are checked (by the library,
    before it loads anything) in the basis task, still before any shard is written."""
    if spec.sd_path is not None:
        require_folder(spec.sd_path, "--sd-model: Stable Diffusion (diffusers layout: unet/, vae/, ...)")
    if spec.dino_path is not None:
        Dinov2Backbone(spec.dino_path, spec.dino_image_size)


def actor_device(requested: str, spec: FeatureSpec, cluster: ClusterInfo) -> str:
    """'cpu' or 'cuda' for the actors. auto: cuda for the model extractors where the cluster has GPUs;
    rgb and precomputed are decoding-bound, one actor per CPU serves them better."""
    if spec.extractor == "precomputed":
        return "cpu"
    if requested == "cuda" and cluster.gpus == 0:
        where = f"the Ray cluster at {cluster.address}" if cluster.address else "the local Ray cluster"
        raise BackendUnavailable(
            f"--device cuda: there is no GPU in {where} ({cluster.nodes} nodes, {cluster.cpus} CPUs, 0 GPUs); "
            "use --device cpu (or auto)"
        )
    if requested == "auto":
        return "cuda" if cluster.gpus > 0 and uses_basis(spec) else "cpu"
    return requested


def worker_resources(device: str, cluster: ClusterInfo, workers: int | None) -> tuple[dict[str, float], int, int]:
    """(Ray resources of one actor, its threads, how many actors): one per GPU, or one per CPU slot,
    at most `workers`. A GPU actor takes its share of the CPUs for decoding."""
    if device == "cuda":
        threads = max(1, cluster.cpus // max(cluster.gpus, 1))
        return {"num_gpus": 1, "num_cpus": threads}, threads, min(workers or cluster.gpus, cluster.gpus)
    return {"num_cpus": 1}, 1, max(1, min(workers or cluster.cpus, cluster.cpus))


def _unwrap(err: ray.exceptions.RayTaskError) -> Exception:
    """A task's user error as itself (one line for the CLI); anything else stays Ray's error."""
    return err.cause if isinstance(err.cause, DualPMError) else err


def prepare_basis(
    out: Path, config: FeaturesConfig, manifest: Manifest, resources: dict[str, float], overwrite: bool
) -> tuple[FeatureBasis | None, str]:
    """(the stored basis, log line): fitted or checked by one Ray task for sd-dino / dino; None for rgb
    (no PCA) and precomputed (no model)."""
    if not uses_basis(config.spec):
        return None, f"feature basis: none ({config.spec.extractor} features have no PCA)"
    path = out / BASIS_NAME
    # max_calls=1: the task's process exits afterwards, giving its GPU memory back to the actors.
    task = ray.remote(max_calls=1, max_retries=MAX_RESTARTS, **resources)(fit_or_check_basis)
    try:
        line = ray.get(task.remote(config, str(path.resolve()), pca_sample_ids(manifest, config.pca_samples),
                                   overwrite))
    except ray.exceptions.RayTaskError as err:
        raise _unwrap(err) from None
    return FeatureBasis.load(path), line


def start_workers(
    config: FeaturesConfig, out: Path, basis: FeatureBasis | None, resources: dict[str, float], count: int
) -> list[Any]:
    """`count` FeatureWorker actors and, last, the ShardDispatcher feeding them (nothing for 0)."""
    if count == 0:
        return []
    actor = ray.remote(FeatureWorker).options(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS,
                                              **resources)
    path = str((out / BASIS_NAME).resolve()) if basis is not None else None
    sha256 = basis.content_hash() if basis is not None else None
    workers = [actor.remote(config, path, sha256) for _ in range(count)]
    click.echo(f"features: {count} {config.device} actors, each {resources}")
    return workers + [ray.remote(num_cpus=0)(ShardDispatcher).remote(workers)]


@click.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=OutputFolder(urls=True))
@click.option("--extractor", type=click.Choice(list(EXTRACTORS)), default="sd-dino", show_default=True,
              help="sd-dino (ODISE-DINO: Stable Diffusion + DINOv2), dino (DINOv2 only), rgb (pixels, no "
                   "weights), precomputed (import SRC/features/<id>_feat.png).")
@click.option("--sd-model", type=str, envvar="DUALPM_SD_MODEL", show_envvar=True, default=None,
              help="Local diffusers Stable Diffusion 1.5-style folder (sd-dino).")
@click.option("--dino-model", type=str, envvar="DUALPM_DINO_MODEL", show_envvar=True, default=None,
              help="Local transformers DINOv2 folder, e.g. dinov2-base (sd-dino, dino).")
@click.option("--dim", type=click.IntRange(1, 4096), default=None,
              show_default="64; rgb: 3, or 4 with --mask-channel", help="Feature channels stored.")
@click.option("--grid", type=click.IntRange(1, 1024), default=None,
              show_default="60 (sd-dino, dino); 64 (rgb); precomputed: the files'",
              help="Side of the feature grid; sets the model input sizes (DINOv2 14x, SD 16x).")
@click.option("--timestep", type=click.IntRange(0, 999), default=None, show_default="100",
              help="sd-dino: diffusion timestep the latent is noised to.")
@click.option("--sd-pca-dims", type=click.IntRange(min=1), nargs=3, default=None, show_default="256 256 256",
              help="sd-dino: PCA components kept of the three decoder blocks.")
@click.option("--mask-channel", is_flag=True, help="rgb: append the object mask as a 4th channel.")
@click.option("--batch", type=click.IntRange(1, 4096), default=8, show_default=True,
              help="Images per extractor call.")
@click.option("--pca-samples", type=click.IntRange(1, 1_000_000), default=128, show_default=True,
              help="Train images the PCA basis is fitted on (once; reruns reuse it).")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="zarr", show_default=True,
              help="Shard container (Zarr: dense float16 arrays).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: one actor per GPU for sd-dino/dino where the Ray cluster has GPUs, else one per CPU.")
@click.option("--workers", type=click.IntRange(min=1), default=None, show_default="one per GPU or CPU",
              help="Most actors to start (and CPUs of a local Ray).")
@click.option("--overwrite", is_flag=True,
              help="Refit the basis, redo every shard, also complete ones, and accept a new config.")
@shard_stage_options
@click.pass_context
@handles_user_errors
def features(ctx: click.Context, src: Path, out: Path, extractor: str, sd_model: str | None,
             dino_model: str | None, dim: int | None, grid: int | None, timestep: int | None,
             sd_pca_dims: tuple[int, int, int] | None, mask_channel: bool, batch: int, pca_samples: int,
             fmt: str, device: str, shard_size: int | None, workers: int | None, address: str | None,
             connect_timeout: float, overwrite: bool, max_failures: int | None, dry_run: bool) -> None:
    """Extract image features of source dataset SRC into the sharded store OUT (column "features");
    OUT may be an s3:// or gs:// URL (written through --stage)."""
    out = stage_of(out)
    # A path from the environment applies only where the extractor uses it; a typed one must apply.
    for name, used in (("sd_model", extractor == "sd-dino"), ("dino_model", extractor in ("sd-dino", "dino"))):
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE and not used:
            raise ConfigError(f"--{name.replace('_', '-')} does not apply to --extractor {extractor}")
    sd_model = sd_model if extractor == "sd-dino" else None
    dino_model = dino_model if extractor in ("sd-dino", "dino") else None

    def plan(source: SourceDataset, manifest: Manifest) -> PlannedStage:
        spec = make_spec(source, manifest, extractor, sd_model, dino_model, dim, grid, timestep, sd_pca_dims,
                         mask_channel)
        check_weights(spec)
        config = FeaturesConfig(str(source.root.resolve()), spec, fmt, batch, device, pca_samples)
        return PlannedStage(config, stage_for(config, None, fitted=False), column_config(config, None))

    def launch(cluster: ClusterInfo, planned: PlannedStage, manifest: Manifest) -> FeaturesLaunch:
        return FeaturesLaunch(cluster, planned.config, out, manifest, overwrite, workers)

    run = StageRun(COLUMN, src, out, shard_size, workers, address, connect_timeout, overwrite, max_failures, dry_run)
    drive_stage(run, plan, launch)


class FeaturesLaunch(StageLaunch):
    """Ray actors holding the models (one per GPU, or per CPU slot) fed by one dispatcher; the PCA basis
    fitted (or checked) once before they start."""

    def __init__(self, cluster: ClusterInfo, config: FeaturesConfig, out: Path, manifest: Manifest,
                 overwrite: bool, workers: int | None):
        chosen = actor_device(config.device, config.spec, cluster)
        self.resources, threads, self.actors = worker_resources(chosen, cluster, workers)
        self.config = dataclasses.replace(config, device=chosen, threads=threads)
        self.basis, line = prepare_basis(out, self.config, manifest, self.resources, overwrite)
        click.echo(line)
        self.out, self.handles = out, []

    def stage(self) -> Stage:
        return stage_for(self.config, self.basis)

    def start(self, todo: list[ShardPlan]) -> tuple[Any, int]:
        self.handles = start_workers(self.config, self.out, self.basis, self.resources, min(self.actors, len(todo)))
        dispatcher = self.handles[-1] if self.handles else None
        folder = str(column_dir(self.out, COLUMN).resolve())
        return (lambda plan: dispatcher.run.remote(plan, folder)), max(1, len(self.handles))  # one queued each

    def stop(self) -> None:
        for handle in self.handles:  # free the GPUs / CPUs now (a cluster outlives this command)
            ray.kill(handle)
