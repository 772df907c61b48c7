"""`dualpm-prep synth` end to end: the dataset reads back through the reference conventions (and loads in
the reference code's operations, tests/reference_reader.py), is the same bytes with 1 or 2 workers,
resumes, and takes user meshes (written here with pygltflib) in any units, or refuses them."""

from __future__ import annotations

import json

import numpy as np
import pygltflib
import pytest
import torch
import trimesh
from click.testing import CliRunner
from PIL import Image

import reference_reader
from dualpm.camera import project_points, projection_from_focal, read_camera_txt, view_from_camera_pose
from dualpm.data.source import SourceDataset
from dualpm.errors import BackendUnavailable, ConfigError
from dualpm.gltf import load_skinned_mesh, scaled_mesh
from dualpm.render import render_dual_pointmaps
from dualpm.skinning import read_pose_file, skin
from pipeline.cli import main
from pipeline.synth.generate import (
    AUTO_MESH_SIZE,
    SynthConfig,
    build_model,
    generate,
    make_plan,
    prepare_output,
    run_chunk,
)

TINY = dict(num_samples=6, num_models=2, image_size=64, faces=2000, chunk_size=2)
CLI_TINY = ["--image-size", "64", "--faces", "2000", "--chunk-size", "2"]


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local):
    """The same tiny dataset generated with 1 and with 2 workers."""
    config = SynthConfig(**TINY)
    roots = []
    for workers in (1, 2):
        root = tmp_path_factory.mktemp(f"synth{workers}")
        summary = generate(root, config, make_plan(config), workers=workers)
        assert (summary.written, summary.skipped, summary.failed, summary.models_written) == (6, 0, 0, 2)
        roots.append(root)
    return config, roots


def test_one_and_two_workers_write_identical_bytes(dataset):
    _, (one, two) = dataset
    a, b = files(one), files(two)
    assert sorted(a) == sorted(b)
    for kind in ("metadata/", "poses/", "cameras/", "renders/", "masks/", "shapes/", "splits/", "synth.json"):
        assert any(k.startswith(kind) for k in a), kind
    different = [k for k in a if a[k] != b[k]]
    assert different == []


def test_dataset_reads_back_and_reproduces_its_masks(dataset):
    config, (root, _) = dataset
    ds = SourceDataset(root)
    assert ds.ids == [f"{i:06d}" for i in range(1, 7)]
    assert ds.models == ["quadruped_000", "quadruped_001"]
    splits = ds.splits()
    assert len(splits["val"]) == 1 and len(splits["train"]) == 5
    record = json.loads((root / "synth.json").read_text())
    assert record["version"] == 2 and record["config"]["seed"] == 0 and record["models"] == ds.models
    for sample_id in ds.ids:
        sample = ds.sample(sample_id)
        mesh = load_skinned_mesh(ds.layout.mesh(sample.model_name))
        pose = read_pose_file(sample.pose_path, mesh.num_nodes)
        posed = skin(mesh, pose)  # (1, V, 3)
        view = view_from_camera_pose(torch.from_numpy(sample.camera_pose))[None]  # (1, 4, 4) float64
        projection = projection_from_focal(torch.tensor([sample.focal_length], dtype=torch.float64))
        canonical, faces = torch.tensor(mesh.vertices), torch.tensor(mesh.faces)
        maps = render_dual_pointmaps(canonical, posed, faces, view, projection, config.image_size, 2,
                                     backend="cpu", workers=1)
        mask = np.asarray(Image.open(sample.mask_path))
        assert Image.open(sample.mask_path).mode == "1" and Image.open(sample.rgb_path).mode == "RGB"
        np.testing.assert_array_equal(mask, maps[0, :, :, 0, 6].numpy() > 0)
        assert 0.02 < (mask > 0).mean() < 0.9
        # Every posed vertex projects inside the image, with the generator's margin.
        cam = posed[0].double() @ view[0, :3, :3].T + view[0, :3, 3]
        pixels, w = project_points(cam, projection[0], config.image_size, config.image_size)
        assert (w > 0).all() and pixels.min() >= 0.03 * 64 - 1e-6 and pixels.max() <= 0.97 * 64 + 1e-6
        rgb = np.asarray(Image.open(sample.rgb_path))
        assert rgb.shape == (64, 64, 3) and rgb[mask > 0].std() > 1  # shaded, not flat


def test_what_synth_writes_loads_in_the_reference_code_unchanged(dataset):
    # docs/dataset.md: the published layout is a contract both ways. Synth wrote float32 poses (the
    # reference's float64 skinning refused them) and 0/255 masks (its mask assert refused them).
    config, (root, _) = dataset
    ds = SourceDataset(root)
    assert reference_reader.ids(root) == ds.ids
    positions = reference_reader.shapes(root)
    assert sorted(positions) == ds.models
    for model, values in positions.items():
        np.testing.assert_array_equal(values, load_skinned_mesh(ds.layout.mesh(model)).vertices)
    size = (config.image_size, config.image_size)
    for sample_id in ds.ids:
        sample = ds.sample(sample_id)
        with np.load(sample.pose_path) as npz:
            assert npz["poses"].dtype == np.float64 and npz.files == ["poses"]
        matrices = reference_reader.pose_matrices(sample.pose_path)  # (N, 4, 4) float64
        pose = read_pose_file(sample.pose_path)
        np.testing.assert_allclose(matrices[:, :3, 3].numpy(), pose[:, 4:], rtol=1e-6)
        mask = reference_reader.mask(sample.mask_path, size)
        np.testing.assert_array_equal(mask.numpy() > 0, np.asarray(Image.open(sample.mask_path)))
        assert reference_reader.rgb(sample.rgb_path, size).shape == (*size, 3)
        camera = reference_reader.camera(ds.layout.camera(sample_id))
        np.testing.assert_array_equal(camera, sample.camera_pose)
        meta = reference_reader.metadata(ds.layout.metadata(sample_id), root)
        assert (meta["model_name"], meta["focal_length"]) == (sample.model_name, sample.focal_length)


def test_the_reference_reader_refuses_float32_poses_and_0_255_masks(tmp_path):
    # The checks above can fail: the forms the reference refuses are refused here too.
    np.savez(tmp_path / "p.npz", poses=np.tile(np.array([1, 0, 0, 0, 0, 0, 0], np.float32), (3, 1)))
    with pytest.raises(reference_reader.ReferenceRefusal, match="Double|dtype"):
        reference_reader.pose_matrices(tmp_path / "p.npz")
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(reference_reader.ReferenceRefusal, match="range"):
        reference_reader.mask(tmp_path / "m.png", (4, 4))
    # Two spaces between numbers: the reference splits at single spaces.
    (tmp_path / "c.txt").write_text("".join("  ".join(str(v) for v in row) + "\n" for row in np.eye(4)))
    with pytest.raises(reference_reader.ReferenceRefusal):
        reference_reader.camera(tmp_path / "c.txt")
    read_camera_txt(tmp_path / "c.txt")  # which we read


def test_rerun_skips_finished_samples_and_redoes_a_missing_one(dataset, tmp_path, ray_local):
    config, (root, _) = dataset
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    before = files(copy)
    (copy / "metadata" / "000004_metadata.txt").unlink()  # sample 4 counts as unfinished
    (copy / "renders" / "000004_rgb.png").unlink()
    (copy / "poses" / ".tmp-000004_pose.npz.x").write_bytes(b"half")  # a killed writer's leftover
    summary = generate(copy, config, make_plan(config), workers=2)
    assert (summary.written, summary.skipped, summary.models_skipped, summary.models_written) == (1, 5, 2, 0)
    assert files(copy) == before
    with pytest.raises(ConfigError, match="seed"):
        other = SynthConfig(**TINY | {"seed": 1})
        prepare_output(copy, other, make_plan(other), False)


def test_overwrite_replaces_the_dataset_and_a_foreign_folder_is_refused(dataset, tmp_path, ray_local):
    config, (root, _) = dataset
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    smaller = SynthConfig(**TINY | {"num_samples": 4, "seed": 3})
    summary = generate(copy, smaller, make_plan(smaller), overwrite=True, workers=2)
    assert (summary.written, summary.models_written) == (4, 2)
    ds = SourceDataset(copy)
    assert ds.ids == ["000001", "000002", "000003", "000004"]  # no stale samples of the old run
    assert json.loads((copy / "synth.json").read_text())["config"]["seed"] == 3
    pose = "poses/000001_pose.npz"
    assert (copy / pose).read_bytes() != (root / pose).read_bytes()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not written by dualpm-prep synth"):
        prepare_output(foreign, config, make_plan(config), overwrite=True)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_unframable_samples_are_recorded_and_leave_no_files(tmp_path, ray_local):
    from pipeline.synth.cameras import CameraRanges

    # A fill far beyond the field of view and a single attempt: no sample can be framed.
    config = SynthConfig(**TINY | {"heldout_models": 1}, cameras=CameraRanges(fill=(5.0, 5.0), attempts=1))
    summary = generate(tmp_path, config, make_plan(config), workers=2)
    assert (summary.written, summary.failed) == (0, 6)
    lines = [json.loads(line) for line in (tmp_path / "synth_failures.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"{i:06d}" for i in range(1, 7)]
    assert all("cannot frame" in x["error"] and "sample " + x["id"] in x["error"] for x in lines)
    for folder in ("poses", "cameras", "renders", "masks", "metadata"):
        assert list((tmp_path / folder).iterdir()) == []
    (held,) = (tmp_path / "splits" / "val_models.txt").read_text().split()
    assert held in ("quadruped_000", "quadruped_001")
    assert len((tmp_path / "splits" / "val.txt").read_text().split()) == 3 + round(0.1 * 3)


def test_heldout_models_and_val_fraction_plan():
    config = SynthConfig(num_samples=40, num_models=4, heldout_models=1, val_fraction=0.25, faces=2000)
    plan = make_plan(config)
    by_model = {m.index: [s.id for s in plan.samples if s.model == m.index] for m in plan.models}
    assert [len(v) for v in by_model.values()] == [10, 10, 10, 10]
    (held,) = plan.val_models
    held_index = next(m.index for m in plan.models if m.name == held)
    val = set(plan.val_ids)
    assert set(by_model[held_index]) <= val
    assert len(val) == 10 + round(0.25 * 30)
    assert plan == make_plan(config)


# ---- user meshes ------------------------------------------------------------------------------------


def write_user_mesh(path, offset=0.0, nan=False, skinned=True, primitives=1, joints=True, unit=1.0):
    """A capsule 'animal' along +Z skinned to Hips -> Spine -> Head under a non-joint Armature node.

    `unit`: scene units per metre, as an exporter writes them: positions, node translations and inverse
    bind translations times `unit`. Positions lie on a 1/1024 grid, so times 100 is exact in float32.
    """
    capsule = trimesh.creation.capsule(height=1.0, radius=0.25, count=[12, 12])
    positions = np.round(capsule.vertices * 1024) / 1024 + offset
    positions = (positions * unit).astype(np.float32)
    if nan:
        positions[5, 1] = np.nan
    z = positions[:, 2] / np.float32(unit) - np.float32(offset)
    centres = np.array([-0.5, 0.0, 0.5])
    hat = np.clip(1 - np.abs(z[:, None] - centres[None]) / 0.5, 0, 1)  # (V, 3) linear blend along z
    hat[z < -0.5, 0], hat[z > 0.5, 2] = 1.0, 1.0
    weights = np.zeros((len(z), 4), np.float32)
    weights[:, :3] = hat / hat.sum(1, keepdims=True)
    joint_ids = np.tile(np.array([0, 1, 2, 0], np.uint8), (len(z), 1))
    indices = capsule.faces.astype(np.uint32).reshape(-1)
    ibm = np.stack([np.eye(4, dtype=np.float32)] * 3)
    ibm[:, :3, 3] = -(centres[:, None] * [0, 0, 1] + offset) * unit  # joints at z = -0.5, 0, 0.5 (+ offset)
    parts = [positions.tobytes(), joint_ids.tobytes(), weights.tobytes(), indices.tobytes(),
             ibm.transpose(0, 2, 1).astype("<f4").tobytes()]
    offsets = np.cumsum([0] + [len(p) for p in parts])
    views = [pygltflib.BufferView(buffer=0, byteOffset=int(offsets[i]), byteLength=len(parts[i]))
             for i in range(5)]
    accessors = [
        pygltflib.Accessor(bufferView=0, componentType=5126, count=len(positions), type="VEC3",
                           min=np.nan_to_num(positions).min(0).tolist(),
                           max=np.nan_to_num(positions).max(0).tolist()),
        pygltflib.Accessor(bufferView=1, componentType=5121, count=len(positions), type="VEC4"),
        pygltflib.Accessor(bufferView=2, componentType=5126, count=len(positions), type="VEC4"),
        pygltflib.Accessor(bufferView=3, componentType=5125, count=len(indices), type="SCALAR"),
        pygltflib.Accessor(bufferView=4, componentType=5126, count=3, type="MAT4"),
    ]
    attributes = pygltflib.Attributes(POSITION=0, JOINTS_0=1, WEIGHTS_0=2)
    primitive = pygltflib.Primitive(attributes=attributes, indices=3)
    nodes = [
        pygltflib.Node(name="Critter", mesh=0, skin=0 if skinned else None),
        pygltflib.Node(name="Armature", translation=[offset * unit] * 3, children=[2]),  # carries the offset
        pygltflib.Node(name="Hips", translation=[0.0, 0.0, -0.5 * unit], children=[3]),
        pygltflib.Node(name="Spine", translation=[0.0, 0.0, 0.5 * unit], children=[4]),
        pygltflib.Node(name="Head", translation=[0.0, 0.0, 0.5 * unit]),
    ]
    gltf = pygltflib.GLTF2(
        scene=0, scenes=[pygltflib.Scene(nodes=[0, 1])], nodes=nodes,
        meshes=[pygltflib.Mesh(name="critter", primitives=[primitive] * primitives)],
        skins=[pygltflib.Skin(joints=[2, 3, 4] if joints else [], inverseBindMatrices=4)] if skinned else [],
        accessors=accessors, bufferViews=views, buffers=[pygltflib.Buffer(byteLength=int(offsets[-1]))],
    )
    gltf.set_binary_blob(b"".join(parts))
    path.write_bytes(b"".join(gltf.save_to_bytes()))
    return path


def test_user_mesh_goes_through_the_cli(tmp_path, ray_local):
    mesh_file = write_user_mesh(tmp_path / "my critter.glb")
    mesh = load_skinned_mesh(mesh_file)  # the test file is a valid rig
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["synth", str(out), "--num-samples", "3", "--mesh", str(mesh_file),
                                       "--workers", "2", "--preview", *CLI_TINY])
    assert result.exit_code == 0, result.output
    assert "3 samples written" in result.output
    ds = SourceDataset(out)
    assert ds.models == ["my_critter"] and len(ds) == 3
    copy = load_skinned_mesh(ds.layout.mesh("my_critter"))
    factor = json.loads((out / "synth.json").read_text())["mesh_scales"]["my_critter"]
    assert factor == pytest.approx(AUTO_MESH_SIZE / 1.5)  # --mesh-scale auto: the capsule is 1.5 long
    assert f"scaled by {factor:.6g}" in result.output
    np.testing.assert_array_equal(copy.vertices, scaled_mesh(mesh, factor).vertices)
    np.testing.assert_array_equal(copy.weights, mesh.weights)
    assert copy.node_names == mesh.node_names
    for sample_id in ds.ids:
        sample = ds.sample(sample_id)
        assert sample.model_name == "my_critter"
        pose = read_pose_file(sample.pose_path, copy.num_nodes)
        assert not np.allclose(pose[2:, :4], [1, 0, 0, 0])  # the joints were posed
    assert Image.open(out / "preview.png").size[0] > 64


@pytest.mark.parametrize(
    "kind,message",
    [
        (dict(skinned=False), "no skin"),
        (dict(primitives=0), "no primitives"),  # several primitives are one skinned mesh (test_appearance)
        (dict(joints=False), "no joints"),
        (dict(nan=True), "NaN"),
        (dict(offset=1e6), "cannot frame"),
    ],
)
def test_bad_user_meshes_fail_naming_the_file_and_write_nothing(tmp_path, kind, message):
    mesh_file = write_user_mesh(tmp_path / "bad.glb", **kind)
    out = tmp_path / "out"
    args = ["synth", str(out), "--num-samples", "2", "--mesh", str(mesh_file), *CLI_TINY]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert str(mesh_file) in result.output and message in result.output, result.output
    assert not out.exists()


def synth_here(root, config):
    """`generate` without Ray: the same task functions, run in this process."""
    plan = make_plan(config)
    prepare_output(root, config, plan, overwrite=False)
    for model in plan.models:
        build_model(root, config, model, overwrite=False)
    results = run_chunk(root, config, plan.models[0], list(plan.samples), False, "cpu")
    assert [r.status for r in results] == ["written"] * len(plan.samples)
    return plan, files(root)


def test_a_rig_in_cm_gives_the_dataset_of_the_rig_in_metres(tmp_path):
    # A real rig exported in cm (object 150 units long) was refused: "it must be roughly metre-sized".
    # --mesh-scale auto sizes both rigs alike, so every file of the two datasets is the same.
    datasets = []
    for unit in (1.0, 100.0):
        (tmp_path / f"unit{unit:g}").mkdir()
        mesh_file = write_user_mesh(tmp_path / f"unit{unit:g}" / "critter.glb", offset=0.125, unit=unit)
        config = SynthConfig(num_samples=3, num_models=1, image_size=48, meshes=(mesh_file,))
        plan, written = synth_here(tmp_path / f"out{unit:g}", config)
        assert plan.models[0].scale == pytest.approx(AUTO_MESH_SIZE / (1.5 * unit))
        datasets.append(written)
    metres, cm = datasets
    assert sorted(metres) == sorted(cm) and len(metres) > 15
    # synth.json: its mesh hash and factor differ; shapes/<model>/asset/: the user's files as given
    assert [k for k in metres if metres[k] != cm[k]] == ["shapes/critter/asset/critter.glb", "synth.json"]
    # An explicit factor gives the rig in metres, unscaled: cm * 0.01 == m * 1 (the same files again).
    explicit = []
    for unit, factor in ((1.0, 1.0), (100.0, 0.01)):
        config = SynthConfig(num_samples=1, num_models=1, image_size=48, mesh_scale=factor,
                             meshes=(tmp_path / f"unit{unit:g}" / "critter.glb",))
        explicit.append(synth_here(tmp_path / f"explicit{unit:g}", config)[1])
    assert [k for k in explicit[0] if explicit[0][k] != explicit[1][k]] == ["shapes/critter/asset/critter.glb",
                                                                          "synth.json"]
    mesh = load_skinned_mesh(tmp_path / "explicit1" / "shapes" / "critter" / "critter_shape.gltf")
    assert np.ptp(mesh.vertices[:, 2]) == pytest.approx(1.5)  # its own size, metres


def test_mesh_scale_without_meshes_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "out"), "--mesh-scale", "0.01", *CLI_TINY])
    assert result.exit_code != 0 and "--mesh-scale applies to --mesh" in result.output
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "out"), "--mesh-scale", "-1", *CLI_TINY])
    assert result.exit_code != 0 and "'auto' or a finite number above 0" in result.output


def test_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "out"
    args = ["synth", str(out), "--num-samples", "7", "--num-models", "2", "--dry-run", *CLI_TINY]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "7 to do in 4 tasks" in result.output and not out.exists()


def test_render_stage_consumes_the_dataset_unchanged(dataset, tmp_path, ray_local):
    from dualpm.store import load_manifest, read_shard, verify_store

    config, (root, _) = dataset
    out = tmp_path / "store"
    args = ["render", str(root), str(out), "--resolution", str(config.image_size), "--layers", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert verify_store(out) == []
    manifest = load_manifest(out)
    seen = 0
    for plan in manifest.plan:
        for sample_id, fields in read_shard(out, manifest.columns["render"], plan.index):
            coverage = fields["dpm"][:, :, 0, 6] > 0
            mask = np.asarray(Image.open(root / "masks" / f"{sample_id}_mask.png")) > 0
            np.testing.assert_array_equal(coverage, mask)  # its layer-1 alpha is our mask
            seen += 1
    assert seen == 6


def test_missing_mesh_file_and_conflicting_model_count_are_usage_errors(tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "nowhere.glb"
    result = CliRunner().invoke(main, ["synth", str(out), "--mesh", str(missing), *CLI_TINY])
    assert result.exit_code != 0 and str(missing) in result.output and not out.exists()
    mesh_file = write_user_mesh(tmp_path / "one.glb")
    args = ["synth", str(out), "--mesh", str(mesh_file), "--num-models", "3", *CLI_TINY]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "--num-models 3" in result.output and not out.exists()


def test_a_mesh_inside_out_is_refused(dataset):
    config, (root, _) = dataset
    mesh_file = next(root.glob("shapes/*/*_shape.gl*"))
    before = files(root)
    args = ["synth", str(root), "--mesh", str(mesh_file), "--overwrite", "--dry-run", *CLI_TINY]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    message = f"Error: {mesh_file}: a --mesh file is inside OUT ({root}); give OUT a folder of its own"
    assert message in result.output
    assert files(root) == before


def test_cuda_backend_without_gpus_is_refused(tmp_path, ray_local):
    if ray_local.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this Ray has GPUs")
    config = SynthConfig(**TINY | {"backend": "cuda"})
    with pytest.raises(BackendUnavailable, match="no GPU"):
        generate(tmp_path / "out", config, make_plan(config), workers=1)
    assert not (tmp_path / "out").exists()
