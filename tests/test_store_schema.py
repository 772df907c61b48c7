"""The store opened as others open it: docs/format.md's recipes run where `dualpm` cannot be imported, plain
`zarr` opens the root without warnings, the schema block says what the numbers mean, odd ids survive.

Stores come from the real stages (render with Embree, rgb features) on a source whose ids have dots,
accents and dashes, in both containers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from datagen import make_source_dataset
from dualpm.data.reader import ShardStream, open_dataset
from dualpm.store import SCHEMA_VERSION, load_manifest, read_shard
from pipeline.cli import main

REPO = Path(__file__).parents[1]
ODD_IDS = ["a.b", "ünïcode", "x-y_z.1", "3.14", "plain"]  # the last one in splits/val.txt


def rename_ids(root: Path, ids: list[str], new: list[str]) -> None:
    """Give the samples of a generated source dataset other ids (file stems), as a user's data might have."""
    for old, name in zip(ids, new, strict=True):
        for folder, suffix in (("poses", "_pose.npz"), ("cameras", "_camera.txt"), ("metadata", "_metadata.txt"),
                               ("renders", "_rgb.png"), ("masks", "_mask.png")):
            (root / folder / f"{old}{suffix}").rename(root / folder / f"{name}{suffix}")
    (root / "splits" / "val.txt").write_text(new[-1] + "\n")


@pytest.fixture(scope="module", params=["zarr", "webdataset"])
def store(request, tmp_path_factory, ray_local) -> Path:
    """A store of 5 samples with odd ids, render and features columns in one container."""
    fmt = request.param
    root = tmp_path_factory.mktemp(f"schema-{fmt}")
    ds = make_source_dataset(root / "src", num_samples=len(ODD_IDS), val=1, image_size=24)
    rename_ids(ds.root, ds.ids, ODD_IDS)
    out = root / "out"
    for stage in (["render", "--resolution", "16", "--layers", "3"], ["features", "--extractor", "rgb", "--grid", "8"]):
        result = CliRunner().invoke(main, [stage[0], str(ds.root), str(out), *stage[1:], "--shard-size", "2",
                                           "--format", fmt])
        assert result.exit_code == 0 and f"{stage[0]}: 5 samples written, 0 failed" in result.output, result.output
    return out


def dualpm_reads(out: Path) -> dict[str, dict]:
    """Every stored sample, as dualpm reads it: id -> {features, mask, dpm, meta}."""
    manifest = load_manifest(out)
    samples: dict[str, dict] = {}
    for name in ("render", "features"):
        for plan in manifest.plan:
            for sample_id, fields in read_shard(out, manifest.columns[name], plan.index):
                samples.setdefault(sample_id, {}).update({k: fields[k] for k in fields})
    return samples


def recipe_script(fmt: str) -> str:
    """The docs/format.md recipe for `fmt`, verbatim, plus a main that saves what it loads."""
    text = (REPO / "docs" / "format.md").read_text(encoding="utf-8")
    recipes = dict(re.findall(r"```python recipe-([a-z]+)\n(.*?)```", text, flags=re.S))
    assert set(recipes) == {"zarr", "webdataset"}
    function = "load_zarr_sample" if fmt == "zarr" else "load_webdataset_sample"
    return recipes[fmt] + textwrap.dedent(f"""

        if __name__ == "__main__":
            store, result, *ids = sys.argv[1:]
            arrays, metas = {{}}, {{}}
            for i, sample_id in enumerate(ids):
                features, mask, dpm, meta = {function}(store, sample_id)
                arrays.update({{f"features{{i}}": features, f"mask{{i}}": mask, f"dpm{{i}}": dpm}})
                metas[sample_id] = meta
            np.savez(result, **arrays)
            with open(result + ".json", "w", encoding="utf-8") as fh:
                json.dump(metas, fh)
        """)


def test_the_format_recipe_reads_every_sample_without_dualpm(store, tmp_path):
    fmt = load_manifest(store).columns["render"].format
    script = tmp_path / "recipe.py"
    # -I -S: no user site, no PYTHONPATH, no current folder and no .pth files, so the editable install's
    # finder is not there; the libraries a user would install come from site-packages, added by hand.
    prelude = textwrap.dedent(f"""
        import sys
        sys.path.append({sysconfig.get_paths()["purelib"]!r})
        try:
            import dualpm
        except ImportError:
            pass
        else:
            raise SystemExit("dualpm must not be importable here, found " + dualpm.__file__)
        """)
    script.write_text(prelude + recipe_script(fmt), encoding="utf-8")
    samples = dualpm_reads(store)
    ids = sorted(samples)
    assert ids == sorted(ODD_IDS)
    result = str(tmp_path / "loaded.npz")
    run = subprocess.run([sys.executable, "-I", "-S", str(script), str(store), result, *ids],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with np.load(result) as loaded:
        metas = json.loads(Path(result + ".json").read_text(encoding="utf-8"))
        for i, sample_id in enumerate(ids):
            expected = samples[sample_id]
            np.testing.assert_array_equal(loaded[f"features{i}"], expected["features"])
            assert loaded[f"features{i}"].dtype == np.float16
            np.testing.assert_array_equal(loaded[f"mask{i}"], expected["mask"])
            assert set(np.unique(loaded[f"mask{i}"])) <= {0, 1} and loaded[f"mask{i}"].shape == (24, 24)
            np.testing.assert_array_equal(loaded[f"dpm{i}"], expected["dpm"])
            assert loaded[f"dpm{i}"].shape == (16, 16, 3, 7) and loaded[f"dpm{i}"][..., 6].any()
            assert metas[sample_id] == expected["meta"] and metas[sample_id]["source_id"] == sample_id


def test_plain_zarr_opens_the_root_and_lists_every_array_without_warnings(store):
    manifest = load_manifest(store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        root = zarr.open(store, mode="r")
        assert isinstance(root, zarr.Group)
        members = dict(root.members(max_depth=None))
        attrs = root.attrs["dualpm"]
        columns = {name: zarr.open(store / name, mode="r") for name in ("render", "features")
                   if manifest.columns[name].format == "zarr"}
        listed = {name: sorted(dict(group.members(max_depth=None))) for name, group in columns.items()}
    assert [str(w.message) for w in caught] == []
    assert attrs == json.loads((store / "manifest.json").read_text())["schema"]
    ids = members["ids"][:]
    assert ids.shape == (3 * 2,) and sorted(i for i in ids if i) == sorted(ODD_IDS)
    if manifest.columns["render"].format == "webdataset":
        assert sorted(members) == ["ids"]  # WebDataset columns are tar files beside the hierarchy
        return
    assert listed["render"] == ["dpm", "dpm/counts", "dpm/values", "mask", "meta", "rgb", "valid"]
    assert listed["features"] == ["features", "valid"]
    features = members["features/features"]
    assert features.shape == (6, 3, 8, 8) and features.dtype == np.float16
    assert members["render/dpm/counts"].shape == (6, 16, 16) and members["render/mask"].dtype == np.uint8
    assert members["render/rgb"].shape == (6, 24, 24, 3)
    # Row r = shard * shard_size + position; the padding row after the split's last shard is empty.
    valid = members["render/valid"][:]
    assert [bool(v) for v in valid] == [bool(i) for i in ids]
    assert features.shards == (2, 3, 8, 8)  # one Zarr shard file per plan shard


def test_the_schema_block_says_what_the_numbers_mean(store):
    schema = json.loads((store / "manifest.json").read_text())["schema"]
    assert schema["format_version"] == SCHEMA_VERSION == 2 and schema["spec"] == "docs/format.md"
    assert schema["splits"] == {"train": [0, 2], "val": [2, 3]} and schema["rows"] == 6
    assert "view[2, 3]" in schema["conventions"]["posed"] and "Y-up" in schema["conventions"]["world"]
    assert "OpenGL" in schema["conventions"]["camera"] and "%2E" in schema["conventions"]["webdataset_keys"]
    dpm = schema["columns"]["render"]["fields"]["dpm"]
    assert dpm["dtype"] == "float16" and dpm["shape"] == [16, 16, 3, 7] and dpm["resolution"] == [16, 16]
    assert dpm["channels"] == ["canonical_x", "canonical_y", "canonical_z", "posed_x", "posed_y", "posed_z", "alpha"]
    assert "4.9e-4" in dpm["precision"] and "counts" in dpm["encoding"]
    mask = schema["columns"]["render"]["fields"]["mask"]
    zarr_render = schema["columns"]["render"]["format"] == "zarr"
    assert mask["resolution"] == ([24, 24] if zarr_render else "the source image's (not the dual point map's)")
    features = schema["columns"]["features"]["fields"]["features"]
    assert features["dtype"] == "float16" and features["shape"] == [3, 8, 8] and "bilinear" in features["resolution"]


def test_odd_ids_round_trip_through_the_reader(store):
    info = open_dataset(store)
    seen = []
    for split in ("train", "val"):
        for sample in ShardStream(info, split, 2, (16, 16), seed=0, shuffle=False, infinite=False):
            seen.append(sample["id"])
            assert sample["target"].shape == (16, 16, 2, 7) and sample["features"].shape == (3, 16, 16)
    assert seen == [i for plan in info.manifest.plan for i in plan.ids]
    assert sorted(seen) == sorted(ODD_IDS)
