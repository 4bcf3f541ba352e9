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


def _bytes_of(t):
    """The raw bytes of a tensor (equality that also works for float8 and 0-d tensors)."""
    return t.reshape(-1).view(torch.uint8).tolist()


def _every_dtype():
    from lineofsight.io import _ST_DTYPES

    return [getattr(torch, name) for name, _ in _ST_DTYPES if hasattr(torch, name)]


def _zoo():
    """A tensor of every dtype in three shapes: 2-D, 0-d, empty; names interleaved so sorting matters."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for dtype in _every_dtype():
        name = str(dtype).removeprefix("torch.")
        if dtype.is_complex:
            full = torch.randn(3, 5, dtype=dtype, generator=gen)
        elif dtype.is_floating_point:
            full = (torch.randn(3, 5, generator=gen) * 4).to(dtype)
        elif dtype == torch.bool:
            full = torch.rand(3, 5, generator=gen) > 0.5
        else:
            full = torch.randint(0, 120, (3, 5), generator=gen).to(dtype)
        out[f"m.{name}"] = full
        out[f"a.{name}.scalar"] = full[1, 2].clone()
        out[f"z.{name}.empty"] = torch.zeros(0, 4, dtype=dtype)
    return out


def test_save_tensors_is_byte_identical_to_safetensors(tmp_path):
    """Our streamed writer produces exactly the bytes of ``safetensors.torch.save`` (same header: dtype
    alignment then name order, compact JSON, space padding to 8), for every dtype, 0-d and empty tensors."""
    from safetensors.torch import save

    tensors = _zoo()
    meta = {"layer": "3"}
    path = save_tensors(tmp_path / "t.safetensors", tensors, meta)
    assert path.read_bytes() == save(tensors, metadata=meta)
    assert save_tensors(tmp_path / "n.safetensors", tensors).read_bytes() == save(tensors)
    loaded = load_file(path)
    assert list(loaded) != list(tensors) and set(loaded) == set(tensors)  # the file's order is not ours
    for key, t in tensors.items():
        assert loaded[key].dtype == t.dtype and loaded[key].shape == t.shape, key
        assert _bytes_of(loaded[key]) == _bytes_of(t), key


def test_save_tensors_round_trips_bit_exactly(tmp_path):
    from safetensors import safe_open

    tensors = {
        "f32": torch.randn(7, 3), "bf16": torch.randn(4, 2).to(torch.bfloat16), "f16": torch.randn(5).half(),
        "i64": torch.arange(-3, 9), "i32": torch.tensor([[1, -2], [3, 2**31 - 1]], dtype=torch.int32),
        "u8": torch.tensor([0, 7, 255], dtype=torch.uint8), "bool": torch.tensor([[True, False, True]]),
        "scalar": torch.tensor(2.5), "scalar_i64": torch.tensor(-(2**40)), "empty": torch.zeros(0, 8),
        "nan_inf": torch.tensor([float("nan"), float("inf"), -0.0]),
        # not contiguous, needing grad, a conjugate view: each written as its contiguous values
        "transposed": torch.arange(12.0).reshape(3, 4).t(), "sliced": torch.arange(20).reshape(4, 5)[:, 1:3],
        "param": torch.nn.Parameter(torch.randn(2, 3)), "conj": torch.randn(3, dtype=torch.complex64).conj(),
    }
    meta = {"zeta": "last", "alpha": '{"json": [1, "é\\n"]}', "tab\t": "ctrl \x01 \u2603"}
    path = save_tensors(tmp_path / "t.safetensors", tensors, meta)
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for key, t in tensors.items():
        want = t.detach().resolve_conj()
        assert loaded[key].dtype == t.dtype and _bytes_of(loaded[key]) == _bytes_of(want), key  # bits, NaN too
        assert torch.equal(loaded[key], want) or key == "nan_inf", key
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta
        assert torch.equal(f.get_tensor("bool"), tensors["bool"])
        assert torch.equal(f.get_slice("i64")[2:5], tensors["i64"][2:5])
    header = path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")]
    assert len(header) % 8 == 0 and list(json.loads(header)["__metadata__"]) == sorted(meta)  # deterministic


def test_save_tensors_failure_mid_write_keeps_old_file(tmp_path):
    target = tmp_path / "t.safetensors"
    save_tensors(target, {"w": torch.ones(3)})
    old = target.read_bytes()
    # "a" is written first, then the data-less meta tensor "z" fails while the temp file is half written
    with pytest.raises(NotImplementedError):
        save_tensors(target, {"z": torch.empty(4, device="meta"), "a": torch.zeros(1000)})
    with pytest.raises(TypeError, match="'b' is a list"):  # rejected before any file is opened
        save_tensors(target, {"a": torch.zeros(2), "b": [1, 2]})
    with pytest.raises(TypeError, match="cannot name a tensor"):
        save_tensors(target, {"__metadata__": torch.zeros(2)})
    with pytest.raises(TypeError, match="metadata"):
        save_tensors(target, {"a": torch.zeros(2)}, {"n": 3})
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]  # no temp file left


_PEAK_RSS_SCRIPT = """
import sys, torch
from lineofsight.io import save_tensors

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

# a checkpoint-like state: 4 fp32 matrices of 100 MiB (W_enc, W_dec and their Adam moments) + small ones
state = {k: torch.empty(25 * 1024, 1024).fill_(1.5) for k in ("W_dec", "W_enc", "exp_avg", "exp_avg_sq")}
state["b_enc"], state["step"] = torch.zeros(1024), torch.tensor(4)
size = sum(v.numel() * v.element_size() for v in state.values()) // 1024
before = kib("VmRSS")
save_tensors(sys.argv[1], state, {"cfg": "{}"})
new = kib("VmHWM") - before
from safetensors.torch import save  # the old writer built the whole file as one bytes object, then wrote it
blob = save({k: v.contiguous().cpu() for k, v in state.items()}, metadata={"cfg": "{}"})
old = kib("VmHWM") - before
print(size, new, old)
"""


def test_save_tensors_adds_no_second_copy_of_the_state(tmp_path):
    """Peak RSS while saving ~400 MiB of tensors grows by well under 10 % of the state (it streams one
    tensor at a time); the old build-the-whole-file-in-memory writer adds about twice the state."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, str(tmp_path / "big.safetensors")],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    size, new, old = map(int, out.split())
    assert size > 400 * 1024
    assert new < 0.1 * size, f"save_tensors added {new} KiB of peak RSS for a {size} KiB state"
    assert old > 0.9 * size  # the measurement does see a full extra copy


def test_provenance_names_versions():
    info = provenance()
    assert info["versions"]["torch"].startswith("2.")
    assert info["git_sha"] is None or len(info["git_sha"]) == 40


def test_artifacts_get_the_usual_permissions(tmp_path):
    """Not mkstemp's 0600: what a plain open() would create under the process umask."""
    import os
    import stat

    path = write_json(tmp_path / "m.json", {"a": 1})
    tensors = save_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(2)})
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    assert stat.S_IMODE(os.stat(tensors).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
