"""sae/import_sae.py: the paper's released SAE files (a torch.save'd DataParallel state dict of fc1/fc2) become
SAE folders of this project whose reconstruction equals the released formula."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lineofsight.sae import load_sae

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
D_IN, D_SAE = 16, 128


def _released(path: Path, **changes) -> Path:
    """A file in exactly the released format: an OrderedDict of 'module.'-prefixed fc1/fc2 tensors, torch.save'd."""
    g = torch.Generator().manual_seed(0)
    state = collections.OrderedDict([
        ("module.fc1.weight", torch.randn(D_SAE, D_IN, generator=g) / 4),
        ("module.fc1.bias", torch.randn(D_SAE, generator=g) / 4),
        ("module.fc2.weight", torch.randn(D_IN, D_SAE, generator=g) / 4),
        ("module.fc2.bias", torch.randn(D_IN, generator=g)),
    ])
    state.update(changes)
    torch.save({k: v for k, v in state.items() if v is not None} if changes else state, path)
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "sae/import_sae.py", *args], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=120)


def test_imported_sae_reconstructs_like_the_released_formula(tmp_path):
    path = _released(tmp_path / "sae_final_layer24_8x_norm.pkl")
    proc = _run("--checkpoint", str(path), "--out", str(tmp_path / "sae"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert (cfg["layer"], cfg["d_in"], cfg["d_sae"], cfg["act_scale"], cfg["resize"]) == (24, D_IN, D_SAE, 8.0, 336)
    sae = load_sae(tmp_path / "sae", "cpu")
    raw = torch.load(path, weights_only=True)
    fc1 = torch.nn.Linear(D_IN, D_SAE)
    fc2 = torch.nn.Linear(D_SAE, D_IN)
    fc1.load_state_dict({"weight": raw["module.fc1.weight"], "bias": raw["module.fc1.bias"]})
    fc2.load_state_dict({"weight": raw["module.fc2.weight"], "bias": raw["module.fc2.bias"]})
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        f_ref = torch.relu(fc1(8 * x))
        x_hat_ref = fc2(f_ref) / 8
        x_hat, latents = sae(x)
    torch.testing.assert_close(latents, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_hat_ref, rtol=1e-5, atol=1e-5)
    sae.export_saelens(tmp_path / "saelens")  # the imported SAE exports like a trained one
    assert (tmp_path / "saelens" / "sae_weights.safetensors").is_file()


@pytest.mark.parametrize("kind, message", [
    ("object", "not a tensor state dict readable with weights_only=True"),
    ("keys", "has keys ['fc1.bias', 'fc1.weight', 'fc2.bias', 'fc2.weight', 'fc3.weight']"),
    ("shape", "shapes do not form an autoencoder: fc2.bias is [7]"),
    ("name", "no layer in the file name sae.pkl; pass --layer"),
    ("missing", "does not exist"),
])
def test_bad_files_are_one_line_errors(tmp_path, kind, message):
    path = tmp_path / ("sae.pkl" if kind == "name" else "sae_final_layer8_8x_norm.pkl")
    if kind == "object":
        torch.save({"weights": collections.Counter(a=1), "fn": Path("x")}, path)
    elif kind == "keys":
        _released(path, **{"module.fc3.weight": torch.zeros(2, 2)})
    elif kind == "shape":
        _released(path, **{"module.fc2.bias": torch.zeros(7)})
    elif kind in ("name",):
        _released(path)
    proc = _run("--checkpoint", str(path), "--out", str(tmp_path / "sae"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "sae").exists()


def test_needs_one_source_and_an_offline_hub_is_one_line(tmp_path):
    for args, message in (([], "give --checkpoint FILE, or --hub REPO with --file NAME"),
                          (["--hub", "flybamboo/vlm-saes"], "give --checkpoint FILE, or --hub REPO with --file NAME"),
                          (["--hub", "flybamboo/vlm-saes", "--file", "sae_final_layer8_8x_norm.pkl"],
                           "--hub flybamboo/vlm-saes --file sae_final_layer8_8x_norm.pkl: cannot download")):
        proc = _run(*args, "--out", str(tmp_path / "sae"))
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
