"""lineofsight.io: atomic writes leave either the old file or the new one, never a partial one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lineofsight.io import atomic_write_bytes, atomic_write_text, provenance, save_tensors, write_json


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "m.json"
    write_json(target, {"a": 1})
    write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]  # no temp files left


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_text(target, "old")

    with pytest.raises(TypeError):
        atomic_write_bytes(target, "str, not bytes: fails inside the temp-file write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_save_tensors_roundtrip(tmp_path):
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    path = save_tensors(tmp_path / "t.safetensors", tensors, {"layer": "3"})
    loaded = load_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_provenance_names_versions():
    info = provenance()
    assert info["versions"]["torch"].startswith("2.")
    assert info["git_sha"] is None or len(info["git_sha"]) == 40


def test_artifacts_get_the_usual_permissions(tmp_path):
    """Not mkstemp's 0600: what a plain open() would create under the process umask."""
    import os
    import stat

    path = write_json(tmp_path / "m.json", {"a": 1})
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
