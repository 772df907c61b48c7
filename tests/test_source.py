"""Source datasets: the published split (train_benchmark.txt) and splits/, the 5000 rule, and the scan that
reports every file of the layout folders no sample takes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import reference_reader
from datagen import make_source_dataset
from dualpm.data.source import SPLIT_FILE, SourceDataset, describe_split_rule, id_problem, is_skipped_id
from dualpm.errors import DatasetError


@pytest.fixture
def source(tmp_path):
    return make_source_dataset(tmp_path / "src", num_samples=8, image_size=16)


def add_sample(root, old_id, new_id):
    """Copy sample `old_id`'s files to id `new_id` (any string)."""
    for folder, suffix in (("poses", "_pose.npz"), ("cameras", "_camera.txt"), ("metadata", "_metadata.txt"),
                           ("renders", "_rgb.png"), ("masks", "_mask.png")):
        shutil.copy(root / folder / f"{old_id}{suffix}", root / folder / f"{new_id}{suffix}")


def test_train_benchmark_txt_trains_on_its_ids_and_validates_on_all_others(source):
    # The published set's split: the reference trains on the listed ids and validates on the rest; we
    # used to read only splits/, so everything was train and validation was empty.
    ids = source.ids
    listed = [f"  {ids[0]}", ids[1], "", f"{ids[2]}\t", ids[3], ids[4] + "\r", "099999", ids[1]]
    (source.root / SPLIT_FILE).write_text("\n".join(listed) + "\n")
    ds = SourceDataset(source.root)
    assert ds.splits() == {"train": ids[:5], "val": ids[5:]}
    assert (ds.splits()["train"], ds.splits()["val"]) == reference_reader.train_val(source.root)
    rule = ds.split_info().rule
    assert rule == {"rule": SPLIT_FILE, "file": SPLIT_FILE, "listed": 6, "listed_without_sample": 1,
                    "examples": ["099999"]}
    line = describe_split_rule(rule)
    assert "train = its 6 listed ids, val = all others" in line and "1 listed ids have no sample" in line


def test_splits_folder_takes_precedence_over_train_benchmark_txt(source):
    (source.root / SPLIT_FILE).write_text(f"{source.ids[0]}\n")
    (source.root / "splits").mkdir()
    (source.root / "splits" / "val.txt").write_text(f"{source.ids[7]}\n")
    info = SourceDataset(source.root).split_info()
    assert info.as_dict() == {"train": source.ids[:7], "val": source.ids[7:]}
    assert info.rule == {"rule": "splits/", "files": ["splits/val.txt"], "ignored": SPLIT_FILE}
    assert f"({SPLIT_FILE} ignored" in describe_split_rule(info.rule)
    (source.root / SPLIT_FILE).unlink()
    (source.root / "splits" / "val.txt").unlink()
    info = SourceDataset(source.root).split_info()
    assert (info.train, info.val, info.rule) == (source.ids, [], {"rule": "all-train"})


@pytest.mark.parametrize("text", ["", "\n  \n", "1\n2\n", "000001_rgb.png\n"])
def test_a_train_benchmark_txt_that_names_no_sample_is_an_error(source, text):
    (source.root / SPLIT_FILE).write_text(text)
    with pytest.raises(DatasetError, match=f"{SPLIT_FILE}: lists .* none of which is a sample"):
        SourceDataset(source.root).split_info()


def test_multiples_of_5000_are_skipped_and_each_of_their_files_reported(source):
    add_sample(source.root, source.ids[0], "005000")
    ds = SourceDataset(source.root)
    assert "005000" not in ds.ids and len(ds) == 8
    skipped = [s for s in ds.skipped if s.sample_id == "005000"]
    assert [s.path for s in skipped] == [f"{f}/005000{x}" for f, x in (
        ("poses", "_pose.npz"), ("cameras", "_camera.txt"), ("metadata", "_metadata.txt"),
        ("renders", "_rgb.png"), ("masks", "_mask.png"))]
    assert {s.kind for s in skipped} == {"multiple-of-5000"} and "multiple of 5000" in skipped[0].reason


def test_every_file_no_sample_takes_is_reported_with_its_reason(source):
    # Files with odd names used to vanish from the scan without a word.
    root = source.root
    shutil.copy(root / "poses" / "000001_pose.npz", root / "poses" / "bad id$_pose.npz")
    (root / "poses" / "notes.txt").write_text("mine")
    (root / "cameras" / ".DS_Store").write_bytes(b"\0")
    shutil.copy(root / "masks" / "000001_mask.png", root / "masks" / "000099_mask.png")
    (root / "features").mkdir()
    np.save(root / "features" / "000001_feat.npy", np.zeros(3))
    (root / "renders" / "extra").mkdir()
    ds = SourceDataset(root)
    assert ds.ids == source.ids
    got = {s.path: (s.sample_id, s.kind) for s in ds.skipped}
    assert got == {
        "poses/bad id$_pose.npz": ("bad id$", "invalid-id"),
        "poses/notes.txt": (None, "unexpected-name"),
        "cameras/.DS_Store": (None, "hidden"),
        "renders/extra": (None, "unexpected-name"),
        "masks/000099_mask.png": ("000099", "no-pose"),
        "features/000001_feat.npy": (None, "unexpected-name"),
    }
    reasons = {s.path: s.reason for s in ds.skipped}
    assert "characters ' ', '$' are not allowed" in reasons["poses/bad id$_pose.npz"]
    assert reasons["masks/000099_mask.png"] == "no pose file poses/000099_pose.npz"
    assert reasons["features/000001_feat.npy"] == "the name does not match <id>_feat.png"
    assert reasons["renders/extra"] == "a folder; expected files named <id>_rgb.png"


@pytest.mark.parametrize("odd", ["a.b", "ünïcode", "-lead", "bad id$", "²"])
def test_an_odd_id_is_either_a_sample_or_reported(source, odd):
    # Whatever the id rule (dualpm.store.manifest.check_sample_id) accepts is a sample; the rest is listed.
    add_sample(source.root, source.ids[0], odd)
    ds = SourceDataset(source.root)
    reported = [s for s in ds.skipped if s.sample_id == odd]
    if id_problem(odd) is None:
        assert odd in ds.ids and reported == []
    else:
        assert odd not in ds.ids and len(reported) == 5 and {s.kind for s in reported} == {"invalid-id"}


def test_id_problems_name_the_characters():
    assert id_problem("000123") is None
    assert "characters ' ', '$'" in id_problem("bad id$")
    assert id_problem("") is not None
    assert not is_skipped_id("²") and is_skipped_id("010000") and not is_skipped_id("010001")
