"""Generate a synthetic dataset in the published DualPM layout (`dualpm.data.source`), in parallel with Ray.

    plan = make_plan(config)                  # models, sample ids, splits; validates --mesh files
    summary = generate(out, config, plan)     # models first, then chunks of samples of one model each

Determinism: every random draw comes from `numpy.random.default_rng([seed, PURPOSE, index])` with the
model index or the sample's integer id, never from shared state, so the bytes written do not depend
on the number of workers, the chunking or the order tasks finish in. Files are written atomically; a
sample is done when all five of its files exist, the metadata file (written last) included; a model
is done when its glTF loads. A rerun skips what is done; `overwrite` redoes everything.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dualpm import __version__ as dualpm_version
from dualpm.camera import projection_from_focal
from dualpm.data.source import Layout, SampleMetadata, format_metadata
from dualpm.errors import BackendUnavailable, ConfigError, DatasetError, DualPMError, GltfError
from dualpm.fileio import atomic_output, atomic_write_json, atomic_write_text, remove_stale_temporaries
from dualpm.gltf import SkinnedMesh, load_skinned_mesh, save_skinned_mesh, scaled_mesh
from dualpm.render import render_layers
from dualpm.skinning import rest_pose, skin, write_pose_file
from dualpm.animation import load_clips, scale_clip
from dualpm.gltf_material import load_surface
from pipeline.synth.appearance import (
    Appearance,
    albedo,
    background,
    sample_appearance,
    sample_lighting,
    shade,
    vertex_normals,
)
from pipeline.synth.asset_look import AssetLook, shade_look
from pipeline.synth.cameras import frame_camera
from pipeline.synth.poses import PoseSampler
from pipeline.synth.lighting import list_images, sample_scene_light
from pipeline.synth.quadruped import make_quadruped
from pipeline.synth.rig_assets import ASSET_FOLDER, choose_look, choose_pose, copy_asset
from pipeline.synth.sequence import SequenceFrames, make_sequence, sequence_source
from pipeline.synth.config import (
    APPEARANCE,
    AUTO_MESH_SIZE,
    CAMERA,
    CLIP,
    CONFIG_NAME,
    FAILURES_NAME,
    FORWARD,
    HELDOUT,
    LIGHT,
    LOOK,
    POSE,
    SCENE,
    SHAPE,
    SPLIT,
    SUBFOLDERS,
    SYNTH_VERSION,
    ModelSpec,
    Plan,
    SampleResult,
    SampleSpec,
    SynthConfig,
    SynthSummary,
    model_names,
    rng,
    sample_number,
    sequence_rng,
)

def make_plan(config: SynthConfig) -> Plan:
    """Models, samples (contiguous blocks per model) and the validation split.

    User meshes are loaded and their first samples framed here, before anything is written, so a bad
    `--mesh` fails with its file named and leaves nothing behind.
    """
    names = model_names(config)
    user = [load_user_mesh(path, config.mesh_scale) for path in config.meshes]  # GltfError names the file
    models = tuple(ModelSpec(i, n, config.meshes[i], user[i][1]) if user else ModelSpec(i, n, None)
                   for i, n in enumerate(names))
    n, m = config.num_samples, config.num_models
    length = config.sequence or 1  # a sequence's frames are consecutive samples of one model
    units = -(-n // length)
    samples = []
    for k in range(n):
        number = sample_number(k)  # never a multiple of 5000 (tested), so `is_skipped_id` never drops one
        seq, frame = (k // length, k % length) if config.sequence else (-1, -1)
        samples.append(SampleSpec(f"{number:06d}", number, (k // length) * m // units, seq, frame))
    heldout = set(rng(config.seed, HELDOUT, 0).choice(m, config.heldout_models, replace=False).tolist())
    pool = sorted({k // length for k, s in enumerate(samples) if s.model not in heldout})  # samples or sequences
    count = int(round(config.val_fraction * len(pool)))
    chosen = {pool[i] for i in rng(config.seed, SPLIT, 0).choice(len(pool), count, replace=False)}
    val = {s.id for k, s in enumerate(samples) if k // length in chosen or s.model in heldout}
    plan = Plan(
        models=models, samples=tuple(samples), val_ids=tuple(s.id for s in samples if s.id in val),
        val_models=tuple(names[i] for i in sorted(heldout)),
    )
    for model, (mesh, _) in zip(models, user, strict=False):
        if config.poses == "clips" and not load_clips(model.source, mesh.num_nodes):
            raise ConfigError(f"--poses clips: {model.source} has no animation clips")
        _check_user_mesh(config, model, mesh, [s for s in samples if s.model == model.index][:3])
    return plan


def load_user_mesh(path: Path, mesh_scale: float | str) -> tuple[SkinnedMesh, float]:
    """A user rig scaled by `mesh_scale` ("auto": to `AUTO_MESH_SIZE`), and the factor used.

    The factor scales vertices, node translations and inverse binds (`dualpm.gltf.scaled_mesh`);
    poses sampled on the result and the cameras framing it follow, so the dataset is in the new units.
    """
    mesh = load_skinned_mesh(path)
    if mesh_scale != "auto":
        factor = float(mesh_scale)
    else:
        posed = skin(mesh, rest_pose(mesh), dtype=torch.float64)[0]  # (V, 3): the rest mesh in the world
        longest = float((posed.amax(0) - posed.amin(0)).max())
        if not (np.isfinite(longest) and longest > 0):
            raise GltfError(f"{path}: the rest mesh has no extent ({longest}); --mesh-scale auto cannot "
                            "size it")
        factor = AUTO_MESH_SIZE / longest
    return (mesh if factor == 1.0 else scaled_mesh(mesh, factor)), factor


def _check_user_mesh(config: SynthConfig, model: ModelSpec, mesh: SkinnedMesh,
                     first: list[SampleSpec]) -> None:
    sampler = PoseSampler.for_mesh(mesh, yaw=config.yaw)
    for spec in first or [SampleSpec("", 0, model.index)]:
        posed = skin(mesh, sampler.sample(rng(config.seed, POSE, spec.number)))[0]
        frame_camera(posed, rng(config.seed, CAMERA, spec.number), config.image_size, config.cameras,
                     where=str(model.source))


def sample_done(layout: Layout, sample_id: str) -> bool:
    """All five files of a sample exist (the metadata file is written last)."""
    paths = (layout.pose(sample_id), layout.camera(sample_id), layout.rgb(sample_id), layout.mask(sample_id),
             layout.metadata(sample_id))
    return all(p.exists() for p in paths)


def mesh_path(root: Path, model: str) -> Path:
    return root / "shapes" / model / f"{model}_shape.gltf"


# ---------------------------------------------------------------------------------------------
# Work done in Ray tasks (plain functions: also callable directly)


def build_model(root: Path, config: SynthConfig, model: ModelSpec, overwrite: bool) -> str:
    """Write shapes/<name>/<name>_shape.gltf unless a loadable one exists; returns 'written'/'skipped'."""
    path = mesh_path(root, model.name)
    if path.exists() and not overwrite:
        try:
            load_skinned_mesh(path)
            return "skipped"
        except GltfError:
            pass  # a damaged file from an earlier run: rebuild it
    if model.source is None:
        mesh = make_quadruped(model.name, rng(config.seed, SHAPE, model.index), config.faces)
    else:
        copy_asset(model.source, path.parent / ASSET_FOLDER)  # the rig as given: material, textures, clips
        mesh = load_skinned_mesh(model.source)
        mesh = mesh if model.scale == 1.0 else scaled_mesh(mesh, model.scale)
    save_skinned_mesh(mesh, path)
    return "written"


@dataclass(frozen=True, eq=False)
class _ModelState:
    """What every sample of one model shares (built once per chunk)."""

    mesh: SkinnedMesh
    sampler: PoseSampler
    canonical: torch.Tensor  # (V, 3) float32
    faces: torch.Tensor  # (F, 3) int64
    appearance: Appearance
    look: AssetLook | None = None  # the rig's own material (None: it has none)
    clips: tuple = ()  # the rig's animation clips, scaled as the rig
    hdris: tuple[Path, ...] = ()
    photos: tuple[Path, ...] = ()


def _model_state(root: Path, config: SynthConfig, model: ModelSpec) -> _ModelState:
    mesh = load_skinned_mesh(mesh_path(root, model.name))
    forward = np.array(FORWARD) if model.source is None else None
    look, clips = None, ()
    if model.source is not None:
        asset = asset_path(root, model)
        surface = load_surface(asset)
        if len(surface.material) != mesh.num_vertices:
            raise GltfError(f"{asset}: {len(surface.material)} vertices, but {mesh_path(root, model.name)} has "
                            f"{mesh.num_vertices}; rerun with --overwrite")
        look = AssetLook.build(surface) if surface.has_material else None
        clips = tuple(scale_clip(c, model.scale) for c in load_clips(asset, mesh.num_nodes))
    return _ModelState(
        mesh=mesh, sampler=PoseSampler.for_mesh(mesh, yaw=config.yaw, forward=forward),
        canonical=torch.tensor(mesh.vertices), faces=torch.tensor(mesh.faces),
        appearance=sample_appearance(rng(config.seed, APPEARANCE, model.index), mesh.vertices), look=look,
        clips=clips, hdris=list_images(config.hdri, "--hdri") if config.hdri else (),
        photos=list_images(config.backgrounds, "--backgrounds") if config.backgrounds else (),
    )


def asset_path(root: Path, model: ModelSpec) -> Path:
    """The copy of a user rig as given (`rig_assets.copy_asset`)."""
    return root / "shapes" / model.name / ASSET_FOLDER / model.source.name


def make_sample(root: Path, config: SynthConfig, model: ModelSpec, state: _ModelState, spec: SampleSpec,
                backend: str, sequence: SequenceFrames | None = None) -> None:
    """Pose, frame, render and write one sample (metadata last); a sequence's frame takes its pose and
    camera from `sequence` and the sequence's light."""
    layout = Layout(root)
    where = f"sample {spec.id} (model {model.name})"
    clip = None
    if sequence is None:
        pose = state.sampler.sample(rng(config.seed, POSE, spec.number))
        clip = choose_pose(config.poses, state.clips, state.mesh, rng(config.seed, CLIP, spec.number),
                           config.clip_jitter)
        if clip is not None:
            pose = clip[0]
        posed = skin(state.mesh, pose)[0]  # (V, 3) world; one sample per call, as a reader skins it
        camera = frame_camera(posed, rng(config.seed, CAMERA, spec.number), config.image_size, config.cameras,
                              where=where)
        light = sample_lighting(rng(config.seed, LIGHT, spec.number))
    else:
        pose, camera = sequence.poses[spec.frame], sequence.cameras[spec.frame]
        posed = skin(state.mesh, pose)[0]
        light = sample_lighting(sequence_rng(config.seed, LIGHT, spec.sequence))
    view = torch.from_numpy(camera.view)
    # float64 focal and view, as `dualpm-prep render` reads them, so its layer-1 alpha is our mask
    projection = projection_from_focal(torch.tensor([camera.focal_mm], dtype=torch.float64))
    attributes = torch.cat([state.canonical, vertex_normals(posed, state.faces)], dim=1)  # (V, 6)
    look = choose_look(config.appearance, state.look is not None, rng(config.seed, LOOK, spec.number))
    if look == "procedural" and not config.scene_lights:  # the procedural coat, exactly as before
        layers = render_layers(attributes, posed[None], state.faces, view[None], projection, config.image_size,
                               1, backend=backend, workers=1)
        rgb, mask = shade(layers[0, :, :, 0].cpu(), state.appearance, light, view)
    else:
        asset = state.look if look == "asset" else None
        if asset is not None:
            attributes = torch.cat([attributes, asset.attributes], dim=1)
        layers = render_layers(attributes, posed[None], state.faces, view[None], projection, config.image_size,
                               asset.layers if asset else 1, backend=backend, workers=1)[0].cpu()
        scene = sample_scene_light(rng(config.seed, SCENE, spec.number), camera.view, state.hdris, state.photos,
                                   light)
        rot32 = view.to(torch.float32)  # camera space exactly as the renderer computes it (its scene is reused)
        posed_cam = (posed.float() @ rot32[:3, :3].T + rot32[:3, 3]).numpy()
        rgb = shade_look(layers, asset, lambda c: albedo(state.appearance, c), scene, camera.view, projection[0],
                         posed_cam, state.faces.numpy(),
                         lambda: background(light, config.image_size, config.image_size))
        mask = (layers[:, :, 0, -1] > 0).to(torch.uint8).mul(255).numpy()
    meta = format_metadata(SampleMetadata(model.name, camera.focal_mm))
    if clip is not None:  # extra keys: readers of the reference layout ignore them
        meta += f"clip: {json.dumps(clip[1].clip)}\nclip_time: {clip[1].time!r}\n"

    write_pose_file(layout.pose(spec.id), pose)
    atomic_write_text(layout.camera(spec.id), camera.text)
    _write_png(layout.rgb(spec.id), rgb)  # (H, W, 3) uint8: RGB
    _write_png(layout.mask(spec.id), mask > 0)  # bool: 1-bit, the reference reads it as 0/1 (docs/dataset.md)
    atomic_write_text(layout.metadata(spec.id), meta)


def _write_png(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as tmp:
        # The mode follows the array (a bool array is 1-bit); an explicit mode="1" would misread its bytes.
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


def run_chunk(root: Path, config: SynthConfig, model: ModelSpec, specs: list[SampleSpec], overwrite: bool,
              backend: str) -> list[SampleResult]:
    """Generate the samples of one chunk (all of `model`); per-sample user errors become 'failed'."""
    torch.set_num_threads(1)  # Ray parallelises over chunks; one thread also keeps results bitwise stable
    layout = Layout(root)
    todo = [s for s in specs if overwrite or not sample_done(layout, s.id)]
    results = [SampleResult(s.id, "skipped") for s in specs if s not in todo]
    if not todo:
        return results
    state = _model_state(root, config, model)
    sequences: dict[int, SequenceFrames] = {}
    for spec in todo:
        try:
            if config.sequence and spec.sequence not in sequences:
                source = sequence_source(config.poses, state.clips, sequence_rng(config.seed, CLIP, spec.sequence))
                sequences[spec.sequence] = make_sequence(
                    state.mesh, state.sampler, sequence_rng(config.seed, POSE, spec.sequence),
                    sequence_rng(config.seed, CAMERA, spec.sequence), config.sequence, config.image_size,
                    config.cameras, where=f"sequence {spec.sequence} (model {model.name})", source=source)
            make_sample(root, config, model, state, spec, backend, sequences.get(spec.sequence))
            results.append(SampleResult(spec.id, "written"))
        except DualPMError as err:
            results.append(SampleResult(spec.id, "failed", str(err)))
    return results


# ---------------------------------------------------------------------------------------------
# Driver


def prepare_output(
    root: Path, config: SynthConfig, plan: Plan, overwrite: bool, dry_run: bool = False
) -> None:
    """Check OUT against an earlier run, clean it for `overwrite`, write synth.json and the splits.

    Raises `ConfigError` if OUT holds something else, or a synth dataset made with other settings
    (unless `overwrite`).
    """
    record_path = root / CONFIG_NAME
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not record_path.exists():
        raise ConfigError(f"{root}: folder is not empty and was not written by dualpm-prep synth; "
                          "choose a new or empty folder")
    if record_path.exists():
        try:
            recorded = json.loads(record_path.read_text())
            old, version = recorded["config"], recorded["version"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DatasetError(f"{record_path}: unreadable ({err}); use --overwrite to start again") from err
        if version != SYNTH_VERSION and not overwrite:
            raise ConfigError(f"{root}: was generated by synth version {version}, this is version "
                              f"{SYNTH_VERSION}; use --overwrite or a new folder")
        new = config.record()
        keys = sorted(set(old) | set(new))
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
        if diff and not overwrite:
            raise ConfigError(f"{root}: was generated with other settings ({'; '.join(diff)}); "
                              "use the same options, --overwrite, or a new folder")
    if dry_run:
        return
    if overwrite and record_path.exists():
        for name in SUBFOLDERS:
            shutil.rmtree(root / name, ignore_errors=True)
        (root / FAILURES_NAME).unlink(missing_ok=True)
    for name in SUBFOLDERS:
        (root / name).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root / name)  # leftovers of killed writers (one driver per OUT)
    for model in plan.models:
        remove_stale_temporaries(root / "shapes" / model.name)
    atomic_write_json(record_path, {
        "generator": "dualpm-prep synth", "version": SYNTH_VERSION, "dualpm_version": dualpm_version,
        "config": config.record(), "backend": config.backend,
        "conventions": {"world": "Y-up glTF", "forward": "+Z", "left": "+X", "units": "metres",
                        "ids": "zero-padded integers from 1, multiples of 5000 skipped"},
        "models": [m.name for m in plan.models], "val_models": list(plan.val_models),
        "mesh_scales": {m.name: m.scale for m in plan.models if m.source is not None},
        "num_val": len(plan.val_ids),
    })
    atomic_write_text(root / "splits" / "val.txt", "".join(f"{i}\n" for i in plan.val_ids))
    if plan.val_models:
        atomic_write_text(root / "splits" / "val_models.txt", "".join(f"{m}\n" for m in plan.val_models))
    else:
        (root / "splits" / "val_models.txt").unlink(missing_ok=True)


def chunks(
    config: SynthConfig, plan: Plan, root: Path, overwrite: bool
) -> list[tuple[ModelSpec, list[SampleSpec]]]:
    """Chunks of unfinished samples, each of one model (consecutive ids, at most `chunk_size`)."""
    layout = Layout(root)
    out = []
    for model in plan.models:
        specs = [s for s in plan.samples
                 if s.model == model.index and (overwrite or not sample_done(layout, s.id))]
        if config.sequence:  # one task per sequence: its poses and cameras are made once
            out += [(model, [s for s in specs if s.sequence == q]) for q in sorted({s.sequence for s in specs})]
            continue
        out += [(model, specs[i : i + config.chunk_size]) for i in range(0, len(specs), config.chunk_size)]
    return out


def generate(
    root: str | os.PathLike,
    config: SynthConfig,
    plan: Plan,
    overwrite: bool = False,
    address: str | None = None,
    workers: int | None = None,
    connect_timeout: float = 60.0,
) -> SynthSummary:
    """Write the dataset of `plan` to `root` with Ray (local unless `address`).

    Args:
        workers: at most this many tasks at a time (default: the cluster's CPUs); locally also the
            CPUs offered to the Ray started here.
        connect_timeout: with `address`: seconds the cluster has to answer (`ray_session`).
    Raises:
        ConfigError / DatasetError for an incompatible OUT; `DualPMError` if a task fails.
    """
    from pipeline.cluster import Stopwatch, ray_session

    root = Path(root)
    clock = Stopwatch()
    prepare_output(root, config, plan, overwrite, dry_run=True)  # refuse a bad OUT before Ray starts
    with ray_session(address, num_cpus=workers, connect_timeout=connect_timeout) as info:
        import ray

        if config.backend == "cuda" and info.gpus == 0:  # GPU tasks would wait forever
            where = f"the Ray cluster at {address}" if address else "the local Ray"
            raise BackendUnavailable(f"--backend cuda: {where} has no GPU; use --backend cpu or auto")
        prepare_output(root, config, plan, overwrite)
        todo = chunks(config, plan, root, overwrite)
        skipped = len(plan.samples) - sum(len(c) for _, c in todo)
        limit = max(1, workers or info.cpus or 1)
        gpu = config.backend == "cuda" or (config.backend == "auto" and info.gpus > 0)
        options = {"num_cpus": 1, "num_gpus": 0.25 if gpu else 0, "max_retries": 1}
        build = ray.remote(build_model).options(**options)
        builds = [(lambda m=m: build.remote(root, config, m, overwrite), 1) for m in plan.models]
        models = _run_windowed(builds, limit, "models", "model")
        model_status = [status for status, _ in models]
        sampling = Stopwatch()
        work = ray.remote(run_chunk).options(**options)
        jobs = [(lambda m=m, c=c: work.remote(root, config, m, c, overwrite, config.backend), len(c))
                for m, c in todo]
        results = [r for chunk, _ in _run_windowed(jobs, limit, "synth", "sample") for r in chunk]
        sample_seconds = sampling.seconds
    failures = [r for r in results if r.status == "failed"]
    failures_path = root / FAILURES_NAME
    if failures:
        lines = [json.dumps({"id": r.id, "error": r.error}) + "\n" for r in failures]
        atomic_write_text(failures_path, "".join(lines))
    else:
        failures_path.unlink(missing_ok=True)
    return SynthSummary(
        written=sum(r.status == "written" for r in results),
        skipped=skipped + sum(r.status == "skipped" for r in results),
        failed=len(failures),
        models_written=model_status.count("written"),
        models_skipped=model_status.count("skipped"),
        seconds=clock.seconds,
        sample_seconds=sample_seconds,
    )


def _run_windowed(jobs, limit: int, desc: str, unit: str) -> list:
    """Run (submit, weight) jobs with at most `limit` in flight; results in job order, with a progress bar.

    A task that raised a `DualPMError` stops the run with that message (other errors propagate as
    they are); tasks in flight are left to finish (their samples are written atomically; a rerun
    skips them) or to end with the local Ray.
    """
    import ray

    from pipeline.cluster import TaskWindow

    results: dict[int, object] = {}
    window = TaskWindow(range(len(jobs)), lambda index: jobs[index][0](), limit, desc, unit,
                        weight=lambda index: jobs[index][1])
    for index, ref in window:
        try:
            results[index] = (ray.get(ref), jobs[index][1])
        except ray.exceptions.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, DualPMError):  # a user error met on a worker: one clear line
                raise DualPMError(f"{desc}: a task failed: {cause}") from err
            raise  # a bug: keep Ray's traceback
    return [results[i] for i in range(len(jobs))]
