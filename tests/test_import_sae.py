"""sae/import_sae.py: the paper's released SAE files (a torch.save'd DataParallel state dict of fc1/fc2) become
SAE folders of this project whose reconstruction equals the released formula."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script

from lineofsight.sae import load_sae

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
D_IN, D_SAE = 16, 128
import_sae = load_script("sae/import_sae.py")


def _released(path: Path, d_in: int = D_IN, d_sae: int = D_SAE, **changes) -> Path:
    """A file in exactly the released format: an OrderedDict of 'module.'-prefixed fc1/fc2 tensors, torch.save'd."""
    g = torch.Generator().manual_seed(0)
    state = collections.OrderedDict([
        ("module.fc1.weight", torch.randn(d_sae, d_in, generator=g) / 4),
        ("module.fc1.bias", torch.randn(d_sae, generator=g) / 4),
        ("module.fc2.weight", torch.randn(d_in, d_sae, generator=g) / 4),
        ("module.fc2.bias", torch.randn(d_in, generator=g)),
    ])
    state.update(changes)
    torch.save({k: v for k, v in state.items() if v is not None} if changes else state, path)
    return path


def _fc(raw: dict) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """fc1 and fc2 of a released file's state dict, as the paper's model holds them."""
    fc1 = torch.nn.Linear(*raw["module.fc1.weight"].shape[::-1])
    fc2 = torch.nn.Linear(*raw["module.fc2.weight"].shape[::-1])
    fc1.load_state_dict({"weight": raw["module.fc1.weight"], "bias": raw["module.fc1.bias"]})
    fc2.load_state_dict({"weight": raw["module.fc2.weight"], "bias": raw["module.fc2.bias"]})
    return fc1, fc2


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
    fc1, fc2 = _fc(torch.load(path, weights_only=True))
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


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_scale_auto_measures_the_layer_and_evaluates_both_scales(tmp_path):
    """--scale auto on the toy (d_model 128): the scale is sqrt(128) / mean ||x|| over the layer's tokens of all three
    types, computed here with a Harvester of our own (the records in one batch, PIL images, the formula by hand); the
    SAE written uses it and reconstructs as fc2(relu(fc1(s x))) / s; scale.json's FVU at 8 and at s equal that formula's
    FVU on those tokens, and its CE loss recovered is finite at both."""
    from lineofsight.data import load_image, read_sharegpt4v
    from lineofsight.harvest import TOKEN_TYPES, Harvester
    from lineofsight.models import load_vlm
    from lineofsight.paths import TOY_WORLD_DIR

    path = _released(tmp_path / "sae_final_layer2_8x_norm.pkl", d_in=128, d_sae=256)
    out = tmp_path / "sae"
    import_sae.main(import_sae.Config(checkpoint=path, scale="auto", model="toy", limit=3, batch_size=2,
                                      load_threads=0, device="cpu", out=out))

    model, processor = load_vlm("toy")
    records = read_sharegpt4v(TOY_WORLD_DIR / "sharegpt4v.json", limit=3)
    imgs = [load_image(TOY_WORLD_DIR / r.image, resize=336) for r in records]
    x = Harvester(model, processor, [2], types=TOKEN_TYPES)([r.caption for r in records], imgs, range(3)).acts[:, 0]
    expected = math.sqrt(128) / float(x.double().norm(dim=-1).mean())

    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["act_scale"] == pytest.approx(expected, rel=1e-5) and cfg["layer"] == 2 and cfg["resize"] == 336
    report = json.loads((out / "scale.json").read_text())
    assert report["chosen"] == "auto" and set(report["scales"]) == {"8", "auto"} and report["n_records"] == 3
    assert report["scales"]["8"]["scale"] == 8.0 and report["scales"]["auto"]["scale"] == cfg["act_scale"]
    assert json.loads((out / "run.json").read_text())["status"] == "done"

    s = cfg["act_scale"]
    sae = load_sae(out, "cpu")
    fc1, fc2 = _fc(torch.load(path, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(sae(x)[0], fc2(torch.relu(fc1(s * x))) / s, rtol=1e-4, atol=1e-4)
        for key, scale in (("8", 8.0), ("auto", s)):
            row = report["scales"][key]
            assert row["n_tokens"]["all"] == len(x)
            assert row["fvu"]["all"] == pytest.approx(_fvu(x, fc2(torch.relu(fc1(scale * x))) / scale), rel=1e-4)
            assert all(math.isfinite(v) for v in [*row["fvu"].values(), *row["ce_recovered"].values()]), row
    assert report["scales"]["8"]["fvu"]["all"] != pytest.approx(report["scales"]["auto"]["fvu"]["all"], rel=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--scale", "abc"], "--scale abc: must be a positive number or 'auto'"),
    (["--scale", "0"], "--scale 0: must be a positive number or 'auto'"),
    (["--scale", "nan"], "--scale nan: must be a positive number or 'auto'"),
    (["--scale", "auto", "--model", "MISSING"], "no such directory, and not a Hugging Face id"),
])
def test_bad_scale_or_model_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    from lineofsight.cli import run as run_cli

    path = _released(tmp_path / "sae_final_layer2_8x_norm.pkl", d_in=128)
    args = [str(tmp_path / "no-such-model") if a == "MISSING" else a for a in args]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(import_sae.main, import_sae.Config, ["--checkpoint", str(path), *args, "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "o").exists()
