"""`dualpm-prep verify` and `show` on a store rendered by the real pipeline, then damaged on purpose."""

from __future__ import annotations

import dataclasses
import io
import shutil
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFont

from datagen import make_source_dataset, sample_id
from dualpm.store import data_path, load_manifest, read_record, read_shard, shard_digest, write_record
from pipeline.cli import main

RES = 32


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, ray_local):
    """A webdataset store of 6 samples in 3 shards (sample 000004 failed: camera looking away)."""
    root = tmp_path_factory.mktemp("store_commands")
    ds = make_source_dataset(root / "src", num_samples=6, bad={sample_id(3): "camera_away"})
    out = root / "out"
    args = [str(ds.root), str(out), "--resolution", str(RES), "--layers", "4", "--shard-size", "2",
            "--format", "webdataset"]
    result = CliRunner().invoke(main, ["render", *args])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def store(rendered, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(rendered, copy)
    return copy


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_verify_passes_a_sound_store(store):
    result = invoke("verify", str(store))
    assert result.exit_code == 0, result.output
    assert "render: 3 shards, 5 samples, 1 failed" in result.output and result.output.endswith("OK\n")


def test_verify_catches_a_truncated_tar(store):
    tar = data_path(store / "render", 1)
    tar.write_bytes(tar.read_bytes()[:-1024])
    result = invoke("verify", str(store))
    assert result.exit_code != 0
    assert "shard 1: " in result.output and "truncated or changed" in result.output
    assert "1 problems found" in result.output


def test_verify_catches_a_flipped_byte(store):
    tar = data_path(store / "render", 2)
    raw = bytearray(tar.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    tar.write_bytes(bytes(raw))
    result = invoke("verify", str(store))
    assert result.exit_code != 0 and "shard 2: " in result.output and "sha256 does not match" in result.output
    # --quick checks sizes only: the same-size change goes unseen there, by design.
    assert invoke("verify", str(store), "--quick").exit_code == 0


def _retar(path, rename):
    """Rewrite a tar shard with member names changed by `rename`; returns the new bytes."""
    buffer = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=buffer, mode="w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            member.name = rename(member.name)
            dst.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def test_a_tar_member_escaping_the_folder_is_refused_on_read(store):
    folder = store / "render"
    tar = data_path(folder, 0)
    tar.write_bytes(_retar(tar, lambda name: f"../{name}" if name.startswith("000001.") else name))
    # Re-seal the record so only the member names are wrong, not the checksum.
    sha256, nbytes = shard_digest(folder, 0, "webdataset")
    write_record(folder, dataclasses.replace(read_record(folder, 0), sha256=sha256, bytes=nbytes))
    result = invoke("verify", str(store))
    assert result.exit_code != 0 and "refusing tar member '../000001." in result.output
    shown = invoke("show", str(store), "--sample", "000002", "-o", str(store / "x.png"))
    assert shown.exit_code != 0 and "refusing tar member" in shown.output
    assert not (store / "000001.dpm").exists() and not (store.parent / "000001.dpm").exists()


def test_show_draws_rgb_mask_and_each_layer(store, tmp_path):
    target = tmp_path / "sheet.png"
    result = invoke("show", str(store), "--sample", "000002", "-o", str(target))
    assert result.exit_code == 0, result.output
    column = load_manifest(store).columns["render"]
    fields = next(f for i, f in read_shard(store, column, 0) if i == "000002")
    dpm = fields["dpm"]
    used = int(np.flatnonzero(dpm[..., 6].any(axis=(0, 1))).max()) + 1
    columns, cell, pad = max(used, 2), 128, 4
    text_h = ImageFont.load_default().getbbox("Ag")[3] + 4
    sheet = np.asarray(Image.open(target))
    assert sheet.shape == (3 * (cell + text_h + pad) + pad, columns * (cell + pad) + pad, 3)
    # Depth row: every covered pixel of a layer is coloured (turbo is never black), 4x4 per pixel.
    y0 = pad + 2 * (cell + text_h + pad) + text_h
    for layer in range(used):
        x0 = pad + layer * (cell + pad)
        tile = sheet[y0 : y0 + cell, x0 : x0 + cell]
        assert (tile.any(axis=2)).sum() == 16 * (dpm[:, :, layer, 6] > 0).sum()


def damage_member(tar, name: str) -> None:
    """Flip a byte in the middle of tar member `name` (its data, not its header)."""
    data = bytearray(tar.read_bytes())
    with tarfile.open(tar) as archive:
        member = archive.getmember(name)
    data[member.offset_data + member.size // 2] ^= 0x20
    tar.write_bytes(bytes(data))


def test_corrupt_dual_point_map_bytes_are_named_by_shard_and_sample(store, tmp_path):
    # Issue 18, item 6: "dual point map checksum mismatch (corrupt bytes)" named neither shard nor sample.
    damage_member(data_path(store / "render", 0), "000002.dpm.npz")
    where = f"{store / 'render'} shard 0 sample '000002': field 'dpm' does not decode"
    shown = invoke("show", str(store), "--sample", "000002", "-o", str(tmp_path / "a.png"))
    assert shown.exit_code != 0 and where in shown.output and "CRC" in shown.output
    assert invoke("show", str(store), "--sample", "000001", "-o", str(tmp_path / "b.png")).exit_code == 0
    checked = invoke("verify", str(store))
    assert checked.exit_code != 0 and "2 problems found" in checked.output
    assert "column render, shard 0: " in checked.output and "sha256 does not match" in checked.output
    assert "column render, shard 0, sample 000002: field 'dpm' does not decode" in checked.output


def test_show_refuses_failed_and_unknown_samples(store, tmp_path):
    failed = invoke("show", str(store), "--sample", "000004", "-o", str(tmp_path / "a.png"))
    assert failed.exit_code != 0 and "sample '000004' failed" in failed.output
    assert "outside the view" in failed.output
    unknown = invoke("show", str(store), "--sample", "999999", "-o", str(tmp_path / "b.png"))
    assert unknown.exit_code != 0 and "not in the shard plan" in unknown.output
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()


def test_verify_reports_a_missing_manifest(tmp_path):
    result = invoke("verify", str(tmp_path))
    assert result.exit_code != 0 and "manifest.json: not found" in result.output
