"""dualpm.fileio: atomic publication, stale temporaries, untrusted paths, outputs kept out of inputs."""

from __future__ import annotations

import json
import os

import pytest

from dualpm.errors import ConfigError
from dualpm.fileio import (
    TMP_PREFIX,
    UnsafePathError,
    atomic_directory,
    atomic_output,
    atomic_write_json,
    atomic_write_text,
    refuse_nested,
    remove_stale_temporaries,
    safe_join,
)


def test_atomic_output_publishes_only_on_success(tmp_path):
    target = tmp_path / "sub" / "a.bin"  # the parent is created
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(TMP_PREFIX)
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing under the final name while writing
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["a.bin"]  # the temporary is gone

    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"new"  # the old file is intact
    assert os.listdir(target.parent) == ["a.bin"]


def test_atomic_text_and_json(tmp_path):
    atomic_write_text(tmp_path / "t.txt", "ünï\n")
    assert (tmp_path / "t.txt").read_bytes() == "ünï\n".encode()
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "j.json").read_text()
    assert json.loads(text) == {"b": 1, "a": [1, 2]} and text.index('"a"') < text.index('"b"') and text.endswith("\n")


def test_atomic_directory_replaces_only_when_asked(tmp_path):
    final = tmp_path / "d"
    with atomic_directory(final) as tmp:
        (tmp / "x").write_text("1")
        assert not final.exists()
    assert (final / "x").read_text() == "1"
    with pytest.raises(FileExistsError):
        with atomic_directory(final) as tmp:
            (tmp / "y").write_text("2")
    assert sorted(os.listdir(final)) == ["x"]  # untouched
    with atomic_directory(final, overwrite=True) as tmp:
        (tmp / "y").write_text("2")
    assert sorted(os.listdir(final)) == ["y"]
    with pytest.raises(ValueError):
        with atomic_directory(final, overwrite=True) as tmp:
            (tmp / "z").write_text("3")
            raise ValueError("failed")
    assert sorted(os.listdir(final)) == ["y"]
    assert sorted(os.listdir(tmp_path)) == ["d"]  # no temporary folders left behind


def test_remove_stale_temporaries_removes_only_prefixed_entries(tmp_path):
    (tmp_path / f"{TMP_PREFIX}a.npz.123").write_bytes(b"")
    (tmp_path / f"{TMP_PREFIX}dir.1").mkdir()
    (tmp_path / f"{TMP_PREFIX}dir.1" / "f").write_text("x")
    (tmp_path / "keep.npz").write_bytes(b"")
    (tmp_path / "tmp-not-ours").write_bytes(b"")
    assert remove_stale_temporaries(tmp_path) == 2
    assert sorted(os.listdir(tmp_path)) == ["keep.npz", "tmp-not-ours"]
    assert remove_stale_temporaries(tmp_path / "missing") == 0


def test_safe_join_keeps_paths_inside_their_folder(tmp_path):
    (tmp_path / "textures").mkdir()
    assert safe_join(tmp_path, "textures/skin.png") == (tmp_path / "textures" / "skin.png").resolve()
    assert safe_join(tmp_path, "textures/../a.bin") == (tmp_path / "a.bin").resolve()
    for bad in ["../outside.bin", "textures/../../x", "/etc/passwd", "\\server\\share", "C:evil.bin", ""]:
        with pytest.raises(UnsafePathError):
            safe_join(tmp_path, bad)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside)  # a symlink pointing out of the folder is an escape too
    with pytest.raises(UnsafePathError, match="escapes"):
        safe_join(tmp_path, "link/secret")


def test_refuse_nested_in_all_three_directions(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    refuse_nested(src, tmp_path / "out", "the source dataset")  # siblings are fine
    refuse_nested(src, tmp_path / "src-out", "the source dataset")  # a shared name prefix is not nesting
    for out, words in [(src, "itself"), (src / "out", "inside the source"), (tmp_path, "is inside OUT")]:
        with pytest.raises(ConfigError, match=words):
            refuse_nested(src, out, "the source dataset")
    (tmp_path / "alias").symlink_to(src)  # compared resolved
    with pytest.raises(ConfigError, match="itself"):
        refuse_nested(src, tmp_path / "alias", "the source dataset")
