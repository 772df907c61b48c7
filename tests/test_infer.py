"""`dualpm-infer` end to end on a tiny prepared dataset and a tiny trained model.

The dataset is made with the real stages (`dualpm-prep render` and `features --extractor rgb`, on the
session's local Ray), the model trained for two steps (learning is irrelevant here: what is checked is
that the predictions are the model's, that the files agree with the Zarr, how bad inputs are reported,
and that features are made as the model was trained on them).
"""

from __future__ import annotations

import re
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from datagen import cli_output as run
from datagen import make_source_dataset, sample_id
from dualpm.data.reader import ShardStream, open_dataset
from dualpm.errors import ConfigError
from dualpm.eval.summary import RATIO_KEY
from dualpm.eval.cli import main as eval_main
from dualpm.features import FeatureSpec, build_extractor, extract, fit_basis
from dualpm.features.dino import write_random_dinov2
from dualpm.infer import InferError
from dualpm.infer.batches import Batch
from dualpm.infer.cli import main as infer_main
from dualpm.infer.predictors import ModelPredictor, build_image_features, load_model
from dualpm.model import DualPMNet, ModelConfig, UNetConfig
from dualpm.pointcloud import read_ply
from dualpm.predictions import keep_mask, open_predictions
from dualpm.train import config_from_dict, load_checkpoint, train
from dualpm.train.checkpoint import FEATURE_BASIS, save_checkpoint
from dualpm.viz import canonical_to_rgb
from pipeline.cli import main as prep_main
from test_train import write_bad_checkpoints

REPO = Path(__file__).parents[1]
RESOLUTION = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("infer")
    ds = make_source_dataset(root / "src", num_samples=10, models=2, val=3, image_size=RESOLUTION)
    out = root / "out"
    run(prep_main, "render", ds.root, out, "--resolution", RESOLUTION, "--layers", 3, "--shard-size", 4)
    run(prep_main, "features", ds.root, out, "--extractor", "rgb", "--grid", 16, "--mask-channel", "--workers", 1)
    raw = {
        "data": {"root": str(out), "batch_size": 4, "loader_workers": 0, "shuffle_buffer": 0},
        "model": {"in_channels": 4, "num_layers": 2, "unet": {
            "base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [],
            "dropout": 0.0, "num_groups": 8}},
        "train": {"out_dir": str(root / "run"), "steps": 2, "validate_every": 0, "progress": False},
    }
    result = train(config_from_dict(raw), verbose=False)
    return SimpleNamespace(src=ds.root, out=out, run=root / "run", checkpoint=result.checkpoint, ds=ds)


def reference_forward(setup) -> dict[str, torch.Tensor]:
    """The model of the checkpoint run on the val split's stored features, as the trainer reads them."""
    state = load_checkpoint(setup.checkpoint)
    model = DualPMNet(config_from_dict(state["config"]).model)
    model.load_state_dict(state["model"])
    stream = ShardStream(open_dataset(setup.out), "val", 2, (RESOLUTION, RESOLUTION), seed=0, shuffle=False,
                         infinite=False)
    samples = list(stream)
    with torch.no_grad():
        pred = model.eval()(torch.stack([s["features"] for s in samples]))
    return {"ids": [s["id"] for s in samples], "canonical": pred.canonical, "posed": pred.posed,
            "occupancy": torch.sigmoid(pred.occupancy_logit), "mask": torch.stack([s["mask"] for s in samples])}


def test_dataset_predictions_are_the_models_and_the_files_agree_with_the_zarr(setup, tmp_path):
    pred = tmp_path / "pred"
    # Thresholds that keep every in-mask point, so the clouds are not empty for an untrained model.
    output = run(infer_main, "--checkpoint", setup.run, "--data", setup.out, "--out", pred,
                 "--occupancy-threshold", 0.0, "--confidence-threshold", 1.0)
    assert "infer: 3 samples predicted, 0 failed" in output
    store = open_predictions(pred)
    assert store.ids == setup.ds.val_ids
    assert store.attrs["checkpoint"] == str(setup.run / "checkpoints" / "latest.pt")  # the run's latest
    assert store.attrs["occupancy_threshold"] == 0.0 and store.attrs["mode"] == "model"
    shapes = {name: (a.shape, str(a.dtype)) for name, a in store.arrays.items()}
    assert shapes == {
        "canonical": ((3, 2, 3, 32, 32), "float16"), "posed": ((3, 2, 3, 32, 32), "float16"),
        "occupancy": ((3, 2, 32, 32), "float16"), "confidence": ((3, 2, 32, 32), "float16"),
        "mask": ((3, 32, 32), "uint8"),
    }
    want = reference_forward(setup)
    assert want["ids"] == store.ids
    for name in ("canonical", "posed", "occupancy"):
        np.testing.assert_array_equal(store.arrays[name][...], want[name].numpy().astype(np.float16))
    np.testing.assert_array_equal(store.arrays["mask"][...], want["mask"].numpy().astype(np.uint8))

    for i, sid in enumerate(store.ids):
        maps = store.sample(i)
        keep = keep_mask(maps, 0.0, 1.0)
        assert keep.sum() == 2 * maps.mask.sum() > 0  # every layer of every in-mask pixel
        canonical = np.moveaxis(maps.canonical, 1, -1)[keep].astype(np.float32)  # (L, H, W, 3)[keep]: (N, 3)
        posed = np.moveaxis(maps.posed, 1, -1)[keep].astype(np.float32)
        clouds = {name: trimesh.load(pred / "samples" / sid / f"{name}.ply") for name in ("canonical", "posed")}
        np.testing.assert_array_equal(clouds["canonical"].vertices, canonical)
        np.testing.assert_array_equal(clouds["posed"].vertices, posed)
        # Posed points wear their canonical colours: correspondences are visible.
        colours = canonical_to_rgb(canonical)
        for cloud in clouds.values():
            np.testing.assert_array_equal(np.asarray(cloud.colors)[:, :3], colours)
        with Image.open(pred / "samples" / sid / "sheet.png") as sheet:
            assert sheet.width >= 3 * 128 and sheet.height >= 3 * 128  # 3 rows of tiles: inputs + 2 layers
    assert (pred / "failures.jsonl").read_text() == ""
    assert (pred / "infer.config.yaml").exists()

    # The reference thresholds; --skeleton: where too few points are kept the fit fails for that sample
    # only, and the sample is still predicted.
    again = tmp_path / "reference"
    output = run(infer_main, "--checkpoint", setup.checkpoint, "--data", setup.out, "--out", again, "--skeleton")
    store = open_predictions(again)
    for i, sid in enumerate(store.ids):
        keep = keep_mask(store.sample(i), 0.5, 2.0)
        points, _ = read_ply(again / "samples" / sid / "posed.ply")  # may be empty: trimesh.load gives a Scene
        assert len(points) == keep.sum()
    lines = [json.loads(line) for line in (again / "failures.jsonl").read_text().splitlines()]
    assert all(f["step"] == "skeleton" for f in lines)
    assert len(lines) == sum(not (again / "samples" / sid / "skeleton.json").exists() for sid in store.ids)

    # Existing predictions are only replaced on request.
    assert "exists; pass --overwrite" in run(infer_main, "--checkpoint", setup.run, "--data", setup.out,
                                             "--out", again, exit_code=1)


def test_image_folder_reports_missing_mask_and_unreadable_file_and_processes_the_others(setup, tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    shutil.copytree(setup.src / "renders", images)  # <id>_rgb.png
    shutil.copytree(setup.src / "masks", masks)  # <id>_mask.png
    no_mask, corrupt = sample_id(2), sample_id(5)
    (masks / f"{no_mask}_mask.png").unlink()
    (images / f"{corrupt}_rgb.png").write_bytes(b"not a png")
    pred = tmp_path / "pred"
    output = run(infer_main, "--checkpoint", setup.checkpoint, "--images", images, "--masks", masks, "--out", pred,
                 "--batch", 3)
    assert f"infer: 8 samples predicted, 2 failed ({no_mask}, {corrupt})" in output
    failures = {f["id"]: f["reason"] for f in map(json.loads, (pred / "failures.jsonl").read_text().splitlines())}
    assert sorted(failures) == [no_mask, corrupt]
    assert "no mask" in failures[no_mask] and "cannot read image" in failures[corrupt]
    store = open_predictions(pred)
    assert store.ids == [i for i in setup.ds.ids if i not in (no_mask, corrupt)]
    assert store.attrs["images"] == str(images.resolve())

    # From raw images the checkpoint's extractor (rgb + mask channel, 16 x 16) makes the features the
    # dataset stores (as float16): the predictions agree with those from the stored features.
    from_data = open_predictions(_predict_val(setup, tmp_path / "data"))
    for sid in setup.ds.val_ids:
        a, b = store.sample(store.ids.index(sid)), from_data.sample(from_data.ids.index(sid))
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_allclose(a.canonical.astype(np.float32), b.canonical.astype(np.float32), atol=3e-3)
        np.testing.assert_allclose(a.occupancy.astype(np.float32), b.occupancy.astype(np.float32), atol=3e-3)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no sample could be predicted" in run(infer_main, "--checkpoint", setup.checkpoint, "--images", empty,
                                                 "--masks", masks, "--out", tmp_path / "none", exit_code=1)


def test_image_folder_takes_ids_in_any_script_as_every_command_does(setup, tmp_path):
    """One id rule (dualpm.store.manifest): a unicode id with a dot is predicted; a leading '_' is refused."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    first, second = setup.ds.ids[:2]
    for new_id, old_id in [("füchs.ü1", first), ("_hidden", second)]:
        shutil.copy(setup.src / "renders" / f"{old_id}_rgb.png", images / f"{new_id}.png")
        shutil.copy(setup.src / "masks" / f"{old_id}_mask.png", masks / f"{new_id}.png")
    pred = tmp_path / "pred"
    output = run(infer_main, "--checkpoint", setup.checkpoint, "--images", images, "--masks", masks, "--out", pred,
                 "--no-ply", "--no-sheets")
    assert "1 samples predicted, 1 failed (_hidden)" in output
    assert open_predictions(pred).ids == ["füchs.ü1"]
    reason = json.loads((pred / "failures.jsonl").read_text())["reason"]
    assert "not usable as a sample id (letters and digits of any script" in reason


def _predict_val(setup, out: Path) -> Path:
    run(infer_main, "--checkpoint", setup.checkpoint, "--data", setup.out, "--out", out, "--no-ply", "--no-sheets")
    return out


def test_model_predictions_evaluate_against_the_baseline(setup, tmp_path):
    pred = _predict_val(setup, tmp_path / "pred")
    run(eval_main, "--pred", pred, "--data", setup.out, "--baseline", "--surface-points", 2000)
    summary = json.loads((pred / "summary.json").read_text())
    base = summary["baseline"]["unit_chamfer_layers_sym"]
    model = summary["model"]["unit_chamfer_layers_sym"]
    if model is None:  # the untrained model kept no point in some sample: inf, reported as null
        assert summary[RATIO_KEY] is None and any("no kept point" in n for n in summary["notes"])
    else:
        assert summary[RATIO_KEY] == pytest.approx(model / base)
    assert summary["baseline_samples"] == 7 and base > 0
    assert (pred / "metrics.csv").read_text().count("\n") == 4  # header + 3 samples


def test_checkpoints_carry_the_features_and_mismatches_are_refused(setup, tmp_path):
    state = load_checkpoint(setup.checkpoint)
    assert state["features"]["extractor"] == "rgb" and state[FEATURE_BASIS] is None  # rgb has no PCA

    other = dict(state, features=dict(state["features"], grid=8))
    torch.save(other, tmp_path / "grid8.pt")
    output = run(infer_main, "--checkpoint", tmp_path / "grid8.pt", "--data", setup.out, "--out", tmp_path / "p",
                 exit_code=1)
    assert "trained on other features" in output and "grid: 8 (trained) vs 16" in output

    packed = dict(state, features={"extractor": "precomputed", "dim": 4, "grid": 16, "basis": None})
    torch.save(packed, tmp_path / "packed.pt")
    output = run(infer_main, "--checkpoint", tmp_path / "packed.pt", "--images", setup.src / "renders",
                 "--masks", setup.src / "masks", "--out", tmp_path / "q", exit_code=1)
    assert "precomputed packed features" in output


def test_pca_basis_travels_in_the_checkpoint_and_other_weights_are_refused(tmp_path):
    # dino features with a PCA basis, as `dualpm-prep features --extractor dino` records them.
    write_random_dinov2(tmp_path / "dino", "tiny", seed=0)
    write_random_dinov2(tmp_path / "other", "tiny", seed=1)
    spec = FeatureSpec("dino", dino_path=str(tmp_path / "dino"), dino_image_size=56, dim=6)
    extractor = build_extractor(spec)
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    basis = fit_basis(extractor, lambda: [(images, None)], rows_per_image=32)
    dataset = tmp_path / "data"
    basis.save(dataset / "features.basis.safetensors")
    column = spec.to_dict() | {"basis": "features.basis.safetensors", "basis_sha256": basis.content_hash()}
    path = save_checkpoint(tmp_path / "run", {"features": column, "dataset": {"root": str(dataset)}}, 1, 0)
    shutil.rmtree(dataset)  # the checkpoint alone must be enough
    state = load_checkpoint(path)

    built, carried = build_image_features(state, path, torch.device("cpu"), None, None)
    np.testing.assert_array_equal(extract(built, carried, images).numpy(), extract(extractor, basis, images).numpy())
    with pytest.raises(ConfigError, match="other model weights"):
        build_image_features(state, path, torch.device("cpu"), None, str(tmp_path / "other"))
    with pytest.raises(InferError, match="lacks the features' PCA basis"):
        build_image_features({k: v for k, v in state.items() if k != FEATURE_BASIS}, path, torch.device("cpu"),
                             None, None)


def test_mirror_average_makes_the_model_exactly_mirror_equivariant():
    # Averaging with the mirrored image's prediction, mirrored back, gives a predictor P with
    # P(mirror x) = mirror P(x) for any network, here a random one (no layer of it is symmetric).
    torch.manual_seed(0)
    model = DualPMNet(ModelConfig(in_channels=3, num_layers=2, unet=UNetConfig(
        base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(), dropout=0.0, num_groups=4)))
    for unet in (model.stage1, model.stage2):  # the zero-initialised output convs would make every map 0
        torch.nn.init.normal_(unet.conv_out.weight, std=0.3)
    predict = ModelPredictor(model, torch.device("cpu"), bf16=False, mirror_axis=0)
    features = torch.randn(2, 3, 8, 6)
    mask = (torch.rand(2, 8, 6) > 0.3).float()

    def maps(feats, m):
        return predict(Batch(["a", "b"], feats, m, None, [None, None], [{}, {}]))

    direct, mirrored = maps(features, mask), maps(features.flip(-1), mask.flip(-1))
    sign = np.array([-1, 1, 1], np.float16)[:, None, None]
    np.testing.assert_allclose(mirrored.posed, direct.posed[..., ::-1] * sign, atol=2e-3)
    np.testing.assert_allclose(mirrored.canonical, direct.canonical[..., ::-1] * sign, atol=2e-3)
    for name in ("occupancy", "confidence"):
        np.testing.assert_allclose(getattr(mirrored, name), getattr(direct, name)[..., ::-1], rtol=2e-3)
    assert np.abs(direct.posed).max() > 0.1  # not trivially zero
    # Without averaging the random network is not equivariant.
    plain = ModelPredictor(model, torch.device("cpu"), bf16=False)
    one = plain(Batch(["a", "b"], features, mask, None, [None, None], [{}, {}]))
    other = plain(Batch(["a", "b"], features.flip(-1), mask.flip(-1), None, [None, None], [{}, {}]))
    assert np.abs(other.posed - one.posed[..., ::-1] * sign).max() > 0.05


def test_argument_errors_and_dry_run(setup, tmp_path):
    base = ["--data", setup.out, "--out", tmp_path / "p"]
    assert "exactly one of --checkpoint" in run(infer_main, "--oracle", "--checkpoint", setup.checkpoint, *base,
                                                exit_code=1)
    assert "--images and --masks go together" in run(infer_main, "--checkpoint", setup.checkpoint, "--images",
                                                     setup.src / "renders", "--out", tmp_path / "p", exit_code=1)
    assert "without checkpoints/latest.pt" in run(infer_main, "--checkpoint", tmp_path, *base, exit_code=1)
    assert "trained without mirroring" in run(infer_main, "--checkpoint", setup.checkpoint, *base,
                                              "--mirror-average", exit_code=1)
    # The console script, as the demo runs it; --dry-run writes nothing.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(Path(sys.executable).parent / "dualpm-infer"), "--checkpoint", str(setup.run),
                           "--data", str(setup.out), "--out", str(tmp_path / "dry"), "--dry-run"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "3 samples would be predicted" in proc.stdout and not (tmp_path / "dry").exists()


def test_an_unreadable_checkpoint_is_one_clear_line(tmp_path):
    for kind, path in write_bad_checkpoints(tmp_path / "bad").items():
        if kind == "partial":
            continue  # a checkpoint with a model: refused later, by load_model (tested above)
        output = run(infer_main, "--checkpoint", path, "--data", tmp_path, "--out", tmp_path / "p", exit_code=1)
        assert output.startswith(f"Error: {path}: ") and output.count("\n") == 1, (kind, output)
    assert not (tmp_path / "p").exists()


def test_weights_that_do_not_fit_the_checkpoints_config_are_one_short_line(tmp_path):
    # Issue 22, item 6: said in one line, but 419 lines long (every key of load_state_dict's message).
    raw = {"model": {"in_channels": 4, "num_layers": 2, "unet": {
        "base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [],
        "dropout": 0.0, "num_groups": 8}}, "data": {"resolution": [16, 16]}}
    weights = DualPMNet(config_from_dict(raw).model).state_dict()
    bigger = {**raw, "model": {**raw["model"], "unet": {**raw["model"]["unet"], "base_channels": 32}}}
    with pytest.raises(InferError) as err:
        load_model({"config": bigger, "model": weights}, tmp_path / "c.pt")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'c.pt'}: its model weights do not fit the model its config describes (")
    assert "\n" not in message and len(message) < 400, message
    assert re.search(r"\(\d+ of another shape, e\.g\. \S+: \(\d+, \d+(, \d+)*\) in the file, \(\d+, \d+(, \d+)*\) in "
                     r"the model(; \d+ missing, e\.g\. \S+)?\): the file was changed", message), message


def test_images_of_unknown_kind_animated_or_with_a_mask_of_another_size_are_named(setup, tmp_path):
    # Issue 22, item 8: an animated GIF in --images ended in "no sample could be predicted" naming nothing,
    # and a mask of another size than its image was stretched over it in silence.
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    frames = [Image.new("RGB", (24, 24), colour) for colour in ("red", "blue")]
    frames[0].save(images / "walk.gif", save_all=True, append_images=frames[1:])
    frames[0].save(images / "moving.png", save_all=True, append_images=frames[1:])  # an animated PNG
    Image.new("L", (24, 24), 255).save(masks / "moving_mask.png")
    (images / "notes.txt").write_text("hello")
    a = sample_id(0)
    shutil.copy(setup.src / "renders" / f"{a}_rgb.png", images / f"{a}_rgb.png")
    w, h = Image.open(images / f"{a}_rgb.png").size
    Image.new("L", (w + 8, h), 255).save(masks / f"{a}_mask.png")
    pred = tmp_path / "pred"
    output = run(infer_main, "--checkpoint", setup.checkpoint, "--images", images, "--masks", masks, "--out", pred,
                 exit_code=1)
    assert output.splitlines()[-1].startswith("Error: no sample could be predicted: ")
    failures = {f["id"]: f["reason"] for f in map(json.loads, (pred / "failures.jsonl").read_text().splitlines())}
    assert failures == {
        "walk": "walk.gif: not an image of a known kind (.png, .jpg, .jpeg, .bmp, .webp, .tif, .tiff)",
        "notes": "notes.txt: not an image of a known kind (.png, .jpg, .jpeg, .bmp, .webp, .tif, .tiff)",
        "moving": f"{images / 'moving.png'}: an image of 2 frames (animated, or several pages); one still image "
                  "is expected",
        a: f"{masks / f'{a}_mask.png'}: the mask is {w + 8}x{h} pixels, its image {a}_rgb.png is {w}x{h}: a mask "
           "must have its image's size (stretched, it would cover other pixels)",
    }
