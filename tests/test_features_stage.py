"""`dualpm-prep features`: stored features against direct extraction, the PCA basis fitted once and
reused, bad images, precomputed import, the join with the render column, resume, errors before work.

The CLI runs on the session's local Ray (tests/conftest.py) through click's CliRunner; sd-dino and
dino use tiny randomly initialised models of the real classes (`write_random_sd`, `write_random_dinov2`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from datagen import make_source_dataset, sample_id
from PIL import Image

from dualpm.data.reader import ShardStream, open_dataset
from dualpm.errors import BackendUnavailable, DatasetError
from dualpm.features import (
    FeatureBasis,
    FeatureSpec,
    build_extractor,
    extract,
    fit_basis,
    read_packed,
)
from dualpm.features.column import BASIS_NAME, spec_from_column
from dualpm.features.dino import write_random_dinov2
from dualpm.features.sd_dino import write_random_sd
from dualpm.images import load_image, stack_images
from dualpm.masks import read_mask
from dualpm.store import (
    FAILURES_NAME,
    Manifest,
    load_manifest,
    plan_shards,
    read_shard,
    shard_files,
    verify_store,
)
from pipeline.cli import main
from pipeline.cluster import ClusterInfo
from pipeline.features_stage import actor_device, pca_sample_ids, worker_resources

# sd-dino on the tiny models: a 8 x 8 grid (SD 128 px, DINOv2 112 px), 3 x 8 block PCAs, 16 channels.
SD_ARGS = ["--grid", "8", "--sd-pca-dims", "8", "8", "8", "--dim", "16", "--pca-samples", "4"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    write_random_sd(root / "sd", "tiny", seed=0)
    write_random_dinov2(root / "dino", "tiny", seed=0)
    return root


@pytest.fixture(autouse=True)
def no_weight_env(monkeypatch):
    monkeypatch.delenv("DUALPM_SD_MODEL", raising=False)
    monkeypatch.delenv("DUALPM_DINO_MODEL", raising=False)


def features_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["features", *map(str, args)], catch_exceptions=False)
    return result.exit_code, result.output


def stored(out: Path, column: str = "features") -> dict[str, dict]:
    """Sample id -> fields of every stored sample of `column`, checking each shard holds plan samples."""
    manifest = load_manifest(out)
    samples = {}
    for plan in manifest.plan:
        shard = dict(read_shard(out, manifest.columns[column], plan.index))
        assert list(shard) == [i for i in plan.ids if i in shard]  # plan samples, in plan order
        samples.update(shard)
    return samples


def direct(extractor, basis, paths: list[Path], masks: list[Path] | None = None) -> np.ndarray:
    """(B, C, h, w) float16: what the stage should store, computed without it."""
    images = stack_images([load_image(p) for p in paths], extractor.input_size)
    if masks is None:
        return extract(extractor, basis, images).numpy().astype(np.float16)
    m = stack_images([torch.from_numpy(read_mask(p))[None] for p in masks], extractor.input_size)
    return extract(extractor, basis, images, m).numpy().astype(np.float16)


def tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` (relative path -> mtime, inode)."""
    files = (p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_ino) for p in files}


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_rgb_end_to_end_equals_direct_extraction(tmp_path, ray_local, fmt):
    ds = make_source_dataset(tmp_path / "src", num_samples=6, models=2, val=2, image_size=24)
    out = tmp_path / "out"
    code, output = features_cli(ds.root, out, "--extractor", "rgb", "--grid", "8", "--mask-channel",
                                "--shard-size", "2", "--format", fmt, "--batch", "2", "--workers", "1")
    assert code == 0, output
    assert "features: 6 samples written, 0 failed" in output
    column = load_manifest(out).columns["features"]
    assert column.format == fmt and column.fields["features"].shape == (4, 8, 8)
    assert column.config["basis"] is None and column.config["pca_samples"] is None
    spec = spec_from_column(column.config)
    assert spec == FeatureSpec("rgb", grid=8, rgb_mask_channel=True)
    extractor = build_extractor(spec)
    basis = fit_basis(extractor, lambda: [])
    samples = stored(out)
    assert sorted(samples) == ds.ids
    for sid, fields in samples.items():
        feats = fields["features"]
        assert feats.dtype == np.float16 and feats.shape == (4, 8, 8)
        want = direct(extractor, basis, [ds.root / "renders" / f"{sid}_rgb.png"],
                      [ds.root / "masks" / f"{sid}_mask.png"])[0]
        np.testing.assert_array_equal(feats, want)
        assert 0 < feats[3].astype(np.float32).mean() < 1  # the mask channel: partly covered
    assert verify_store(out) == []
    assert (out / "features.config.yaml").exists() and not (out / BASIS_NAME).exists()


def test_sd_dino_basis_fitted_once_reused_by_every_actor_and_rerun(tmp_path, ray_local, weights):
    ds = make_source_dataset(tmp_path / "src", num_samples=6, models=2, val=2, image_size=24)
    twin = ds.root / "renders" / f"{sample_id(4)}_rgb.png"  # same image as sample 1, in another shard
    twin.write_bytes((ds.root / "renders" / f"{sample_id(1)}_rgb.png").read_bytes())
    out = tmp_path / "out"
    args = [ds.root, out, "--extractor", "sd-dino", "--sd-model", weights / "sd", "--dino-model", weights / "dino",
            *SD_ARGS, "--shard-size", "2", "--batch", "2", "--workers", "2"]
    code, output = features_cli(*args)
    assert code == 0, output
    assert "feature basis: fitted on 4 train images" in output and "2 cpu actors" in output
    assert "features: 6 samples written, 0 failed" in output
    basis_path = out / BASIS_NAME
    basis = FeatureBasis.load(basis_path)
    assert basis.meta["pca_samples"] == "4" and basis.meta["pca_images"] == "4"
    column = load_manifest(out).columns["features"]
    assert column.config["basis"] == BASIS_NAME and column.config["basis_sha256"] == basis.content_hash()
    spec = spec_from_column(column.config)
    assert (spec.extractor, spec.dim, spec.grid, spec.sd_image_size, spec.dino_image_size) == \
        ("sd-dino", 16, 8, 128, 112)
    extractor = build_extractor(spec)
    assert column.config["model_id"] == extractor.model_id

    samples = stored(out)
    assert sorted(samples) == ds.ids
    # Every shard (both actors) used the stored basis: each equals a direct extraction with it.
    for sid, fields in samples.items():
        feats = fields["features"]
        assert feats.dtype == np.float16 and feats.shape == (16, 8, 8)
        want = direct(extractor, basis, [ds.root / "renders" / f"{sid}_rgb.png"])[0]
        np.testing.assert_allclose(feats.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(samples[sample_id(1)]["features"], samples[sample_id(4)]["features"])
    assert not np.array_equal(samples[sample_id(0)]["features"], samples[sample_id(1)]["features"])

    # Resume: only the deleted shard is redone, with the same basis (not refitted), to the same bytes.
    fitted = (basis_path.stat().st_mtime_ns, basis_path.read_bytes())
    before = tree_state(out)
    old_record = column.shards[1]
    for _, path in shard_files(out / "features", 1, "zarr"):  # shard 1's Zarr shard files, one per array
        path.rename(tmp_path / path.name)
    code, output = features_cli(*args)
    assert code == 0, output
    assert "feature basis: reusing" in output and "feature basis: fitted" not in output
    assert "2 samples written" in output and "1 shards done, 2 already complete" in output
    assert (basis_path.stat().st_mtime_ns, basis_path.read_bytes()) == fitted
    after = tree_state(out)
    changed = sorted(k for k in after if after[k] != before.get(k) and k.startswith("features/"))
    assert changed == ["features/features/c/1/0/0/0", "features/valid/c/1"]
    assert after["records/features/shard-000001.json"] != before["records/features/shard-000001.json"]
    assert after["zarr.json"] == before["zarr.json"]  # the arrays' metadata were kept, not rewritten
    assert load_manifest(out).columns["features"].shards[1] == old_record
    assert verify_store(out) == []

    # Another PCA sample size contradicts the stored basis and column: refused before any work.
    code, output = features_cli(*args[:-6], "--pca-samples", "3", *args[-6:])
    assert code == 1 and "pca_samples: 4 -> 3" in output and "--overwrite" in output


def test_corrupt_and_missing_images_fail_grayscale_and_odd_sizes_are_extracted(tmp_path, ray_local):
    ds = make_source_dataset(tmp_path / "src", num_samples=6, image_size=24)
    renders = ds.root / "renders"
    corrupt, truncated, missing, gray, odd = (sample_id(i) for i in (1, 2, 3, 4, 5))
    (renders / f"{corrupt}_rgb.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    data = (renders / f"{truncated}_rgb.png").read_bytes()
    (renders / f"{truncated}_rgb.png").write_bytes(data[: len(data) // 2])
    (renders / f"{missing}_rgb.png").unlink()
    Image.fromarray(np.arange(24 * 24, dtype=np.uint8).reshape(24, 24)).save(renders / f"{gray}_rgb.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(renders / f"{odd}_rgb.png")
    out = tmp_path / "out"
    code, output = features_cli(ds.root, out, "--extractor", "rgb", "--grid", "8", "--shard-size", "3",
                                "--batch", "4", "--workers", "1")
    assert code == 0, output
    assert "features: 3 samples written, 3 failed (3 in the column)" in output
    reasons = {line["id"]: line["reason"]
               for line in map(json.loads, (out / FAILURES_NAME).read_text().splitlines())}
    assert sorted(reasons) == sorted([corrupt, truncated, missing])
    for sid in reasons:
        assert f"{sid}_rgb.png: cannot read image" in reasons[sid]
    samples = stored(out)
    assert sorted(samples) == [sample_id(0), gray, odd]
    extractor = build_extractor(FeatureSpec("rgb", grid=8))
    basis = fit_basis(extractor, lambda: [])
    for sid in (gray, odd):
        want = direct(extractor, basis, [renders / f"{sid}_rgb.png"])[0]
        np.testing.assert_array_equal(samples[sid]["features"], want)
    gray_feats = samples[gray]["features"].astype(np.float32)
    # Grayscale became equal RGB channels, so the ImageNet-normalised channels are affine in each other.
    np.testing.assert_allclose((gray_feats[0] * 0.229 + 0.485), (gray_feats[2] * 0.225 + 0.406), atol=2e-3)
    assert verify_store(out) == []


def test_precomputed_imports_packed_pngs_exactly(tmp_path, ray_local):
    ds = make_source_dataset(tmp_path / "src", num_samples=5, rgb=False, masks=False,
                             feature_channels=64, feature_grid=4)
    lost = sample_id(2)
    (ds.root / "features" / f"{lost}_feat.png").unlink()
    out = tmp_path / "out"
    code, output = features_cli(ds.root, out, "--extractor", "precomputed", "--shard-size", "2", "--workers", "1")
    assert code == 0, output
    assert "4 samples written, 1 failed" in output and "no PCA" in output
    column = load_manifest(out).columns["features"]
    assert spec_from_column(column.config) == FeatureSpec("precomputed", dim=64, grid=4)
    samples = stored(out)
    assert sorted(samples) == [i for i in ds.ids if i != lost]
    for sid, fields in samples.items():
        packed = np.asarray(Image.open(ds.root / "features" / f"{sid}_feat.png"))  # (4, 22 * 4, 3)
        # Independent unpacking: channel c is colour c % 3 of tile c // 3, value v / 127 - 1.
        expected = np.stack([packed[:, (c // 3) * 4 : (c // 3 + 1) * 4, c % 3] for c in range(64)])
        expected = (expected.astype(np.float64) / 127 - 1).astype(np.float16)
        np.testing.assert_array_equal(fields["features"], expected)
        np.testing.assert_array_equal(fields["features"],
                                      read_packed(ds.root / "features" / f"{sid}_feat.png").numpy().astype(np.float16))
    assert "cannot read packed features" in (out / FAILURES_NAME).read_text()


def test_features_then_render_join_by_sample_id_in_the_reader(tmp_path, ray_local):
    ds = make_source_dataset(tmp_path / "src", num_samples=6, models=2, val=2, image_size=32)
    broken = sample_id(2)
    (ds.root / "renders" / f"{broken}_rgb.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    # Features first: the plan is made here, as the render stage would make it.
    code, output = features_cli(ds.root, out, "--extractor", "rgb", "--grid", "16", "--shard-size", "4",
                                "--workers", "1")
    assert code == 0, output
    result = CliRunner().invoke(main, ["render", str(ds.root), str(out), "--resolution", "16", "--layers", "2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    feats, render = stored(out, "features"), stored(out, "render")
    # Both stages refuse the corrupt image for that one sample and keep the others.
    assert broken not in render and broken not in feats
    assert f"{broken}_rgb.png: cannot read image" in (out / FAILURES_NAME).read_text()
    info = open_dataset(out)
    seen = []
    for split in ("train", "val"):
        stream = ShardStream(info, split, layers=2, resolution=(16, 16), seed=0, shuffle=False, infinite=False)
        for sample in stream:
            sid = sample["id"]
            seen.append(sid)
            np.testing.assert_array_equal(sample["features"].numpy(), feats[sid]["features"].astype(np.float32))
            np.testing.assert_array_equal(sample["target"].numpy(), render[sid]["dpm"])
    assert sorted(seen) == [i for i in ds.ids if i != broken]
    assert verify_store(out) == []


def test_errors_before_any_work(tmp_path, ray_local, weights, monkeypatch):
    ds = make_source_dataset(tmp_path / "src", num_samples=2, image_size=16)
    out = tmp_path / "out"
    sd, dino = weights / "sd", weights / "dino"

    def fails(*args: object) -> str:
        code, output = features_cli(ds.root, out, *args)
        assert code == 1, output
        assert not out.exists()  # nothing written: no manifest, no basis, no shard
        return output

    assert "--extractor sd-dino needs --sd-model PATH (or DUALPM_SD_MODEL)" in fails("--dino-model", dino)
    assert "needs --dino-model PATH" in fails("--extractor", "dino")
    out_missing = fails("--sd-model", tmp_path / "nowhere", "--dino-model", dino)
    assert f"{tmp_path / 'nowhere'}: --sd-model: Stable Diffusion" in out_missing and "does not exist" in out_missing
    assert f"{sd}: not a transformers DINOv2 model folder" in fails("--sd-model", sd, "--dino-model", sd)
    assert "--sd-model does not apply to --extractor dino" in fails("--extractor", "dino", "--sd-model", sd)
    assert "no packed feature file" in fails("--extractor", "precomputed")
    out = ds.root / "prepared"
    assert f"{out}: OUT is inside the source dataset SRC ({ds.root})" in fails("--extractor", "rgb")
    out = tmp_path / "out"
    # The environment supplies the paths; one the extractor does not use is ignored.
    monkeypatch.setenv("DUALPM_SD_MODEL", str(tmp_path / "nowhere"))
    monkeypatch.setenv("DUALPM_DINO_MODEL", str(sd))
    assert f"{sd}: not a transformers DINOv2 model folder" in fails("--extractor", "dino")
    monkeypatch.delenv("DUALPM_DINO_MODEL")
    # Checked by the library in the basis task, before its models load and before any shard.
    output = fails("--sd-model", dino, "--dino-model", dino, *SD_ARGS)
    assert f"{dino / 'unet'}: not a diffusers UNet2DConditionModel folder" in output
    output = fails("--sd-model", sd, "--dino-model", dino, *SD_ARGS[:-4], "--dim", "100", *SD_ARGS[-2:])
    assert "feature dim 100 exceeds the 56 channels sd-dino produces" in output
    if not ray_local.cluster_resources().get("GPU", 0):
        assert "--device cuda: there is no GPU in the local Ray cluster" in fails("--extractor", "rgb",
                                                                               "--device", "cuda")


class _Unsafe:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_refused_weights_are_one_line_naming_the_file(tmp_path, ray_local, weights):
    ds = make_source_dataset(tmp_path / "src", num_samples=2, image_size=16)
    dino = tmp_path / "dino"
    shutil.copytree(weights / "dino", dino)
    (dino / "model.safetensors").unlink()  # transformers falls back to the pickle format, torch.load
    torch.save({"embeddings.cls_token": _Unsafe()}, dino / "pytorch_model.bin")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["features", str(ds.root), str(out), "--extractor", "dino", "--dino-model",
                                       str(dino), "--grid", "4", "--dim", "8", "--pca-samples", "2"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and not out.exists()
    assert result.output.strip().splitlines()[-1].startswith(
        f"Error: {dino / 'pytorch_model.bin'}: Dinov2Model weights: refused to load it: it holds objects other "
        "than tensors and plain values (Trying to load unsupported GLOBAL"), result.output


def test_dry_run_prints_config_and_plan_and_writes_nothing(tmp_path):
    ds = make_source_dataset(tmp_path / "src", num_samples=5, val=2, image_size=16)
    code, output = features_cli(ds.root, tmp_path / "out", "--extractor", "rgb", "--dry-run", "--shard-size", "2")
    assert code == 0, output
    assert "extractor: rgb" in output and "grid: 64" in output
    assert "train 3 samples in 2 shards, val 2 samples in 1 shards" in output
    assert not (tmp_path / "out").exists()


def test_pca_sample_is_a_seeded_draw_from_the_train_split():
    plan = plan_shards({"train": [f"t{i}" for i in range(10)], "val": ["v0", "v1"]}, 4)
    manifest = Manifest.create("/src", 4, plan)
    picked = pca_sample_ids(manifest, 4)
    assert len(picked) == len(set(picked)) == 4 and all(i.startswith("t") for i in picked)
    assert picked == sorted(picked, key=lambda i: int(i[1:])) and picked == pca_sample_ids(manifest, 4)
    assert pca_sample_ids(manifest, 50) == [f"t{i}" for i in range(10)]
    with pytest.raises(DatasetError, match="no train samples"):
        pca_sample_ids(Manifest.create("/src", 4, plan_shards({"train": [], "val": ["v0"]}, 4)), 4)


def test_device_choice_and_actor_resources():
    cpus = ClusterInfo(None, cpus=8, gpus=0, nodes=1)
    gpus = ClusterInfo("head:6379", cpus=32, gpus=4, nodes=2)
    sd = FeatureSpec("sd-dino", sd_path="/w/sd", dino_path="/w/dino")
    rgb, pre = FeatureSpec("rgb"), FeatureSpec("precomputed", grid=60)
    assert [actor_device("auto", s, gpus) for s in (sd, rgb, pre)] == ["cuda", "cpu", "cpu"]
    assert actor_device("auto", sd, cpus) == "cpu" and actor_device("cuda", rgb, gpus) == "cuda"
    with pytest.raises(BackendUnavailable, match="no GPU in the Ray cluster at head:6379"):
        actor_device("cuda", sd, ClusterInfo("head:6379", cpus=8, gpus=0, nodes=2))
    assert worker_resources("cuda", gpus, None) == ({"num_gpus": 1, "num_cpus": 8}, 8, 4)
    assert worker_resources("cuda", gpus, 2) == ({"num_gpus": 1, "num_cpus": 8}, 8, 2)
    assert worker_resources("cpu", cpus, None) == ({"num_cpus": 1}, 1, 8)
    assert worker_resources("cpu", cpus, 3) == ({"num_cpus": 1}, 1, 3)
