"""One resize convention per pipeline: every image-reading script takes --resize, every artifact made from images
records it, and a consumer whose images (or other input) were resized otherwise is refused in one line (exit 2)
unless --allow-resize-mismatch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lineofsight.cli import UserError
from lineofsight.data import UNRECORDED, check_resize_match, recorded_resize

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.strip()][-1]


def test_check_resize_match():
    check_resize_match(336, 336, "x", False)
    check_resize_match(None, None, "x", False)
    check_resize_match(336, UNRECORDED, "x", False)  # made before the record: nothing to compare
    check_resize_match(None, 336, "x", True)  # --allow-resize-mismatch
    with pytest.raises(UserError, match=r"^--resize none reads full-size images, but the vectors was made from "
                                        r"336 x 336 px images .*pass --resize 336, or --allow-resize-mismatch$"):
        check_resize_match(None, 336, "the vectors", False)
    with pytest.raises(UserError, match=r"pass --resize none \(or leave it out\)"):
        check_resize_match(336, None, "the SAE", False)
    with pytest.raises(UserError, match=r"^the SAE s was made from 336 x 336 px images, but the vectors v from "
                                        r"full-size images"):
        check_resize_match(336, None, "the vectors v", False, reader="the SAE s")
    assert recorded_resize({"resize": None}) is None and recorded_resize({}) == UNRECORDED


def test_vectors_record_the_resize_and_rollouts_refuse_another(small_world, tmp_path, run_in):
    imagenet = str(small_world / "imagenet")
    acts = run_in("probes/compute_image_activations.py", "--imagenet-dir", imagenet, "--images-per-class", "2",
                "--resize", "48", "--out", str(tmp_path / "acts"))
    assert acts.returncode == 0, acts.stderr[-3000:]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("circle@square\n")
    vec = run_in("steering/compute_steering_vectors.py", "--activations", str(tmp_path / "acts"), "--pairs", str(pairs),
               "--out", str(tmp_path / "vec"))
    assert vec.returncode == 0, vec.stderr[-3000:]
    assert json.loads((tmp_path / "vec" / "vectors.json").read_text())["resize"] == 48
    common = ["steering/steering_rollouts.py", "--vectors", str(tmp_path / "vec"), "--imagenet-dir", imagenet,
              "--layer", "1", "--images-per-pair", "1", "--k", "0", "--max-new-tokens", "2"]
    line = _error_line(run_in(*common, "--out", str(tmp_path / "r1")))
    assert line == (f"error: --resize none reads full-size images, but the steering vectors in {tmp_path / 'vec'} "
                    "was made from 48 x 48 px images (a different image-token count and grid); pass --resize 48, "
                    "or --allow-resize-mismatch"), line
    assert not (tmp_path / "r1").exists()
    for extra in (["--resize", "48"], ["--allow-resize-mismatch"]):
        proc = run_in(*common, *extra, "--out", str(tmp_path / f"r{len(extra)}"))
        assert proc.returncode == 0, proc.stderr[-3000:]


def test_saes_record_the_resize_of_their_images_and_consumers_check_it(small_world, tmp_path, run_in):
    data = str(small_world / "sharegpt4v.json")
    cache = run_in("sae/cache_activations.py", "--data", data, "--layers", "1", "--limit", "2", "--resize", "48",
                 "--out", str(tmp_path / "cache"))
    assert cache.returncode == 0, cache.stderr[-3000:]
    (folder,) = (tmp_path / "cache").glob("tokens-*")
    assert json.loads((folder / "metadata.json").read_text())["key"]["resize"] == 48
    train = ["sae/sae-trainer.py", "--activations", str(folder), "--expansion", "2", "--batch-size", "32",
             "--total-tokens", "64"]
    line = _error_line(run_in(*train, "--resize", "64", "--out", str(tmp_path / "bad")))
    assert "--resize 64 reads 64 x 64 px images, but the token cache" in line and "48 x 48 px" in line, line
    proc = run_in(*train, "--out", str(tmp_path / "sae"))  # the cache's resize by default
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "sae" / "saes" / "L1" / "cfg.json").read_text())["resize"] == 48
    online = run_in("sae/sae-trainer.py", "--data", data, "--layer", "1", "--resize", "40", "--expansion", "2",
                  "--batch-size", "32", "--buffer-batches", "2", "--total-tokens", "64", "--out", str(tmp_path / "on"))
    assert online.returncode == 0, online.stderr[-3000:]
    assert json.loads((tmp_path / "on" / "saes" / "L1" / "cfg.json").read_text())["resize"] == 40

    evaluate = ["--data", data, "--offset", "2", "--limit", "2", "--batch-size", "2"]
    for script, flag in (("sae/evaluation/modality.py", "--saes"), ("sae/evaluation/eval_sae.py", "--sae")):
        out = str(tmp_path / Path(script).stem)
        line = _error_line(run_in(script, flag, str(tmp_path / "sae"), *evaluate, "--out", out))
        assert "--resize none reads full-size images, but the SAE" in line and "pass --resize 48" in line, line
        proc = run_in(script, flag, str(tmp_path / "sae"), *evaluate, "--resize", "48", "--out", out)
        assert proc.returncode == 0, proc.stderr[-3000:]


def test_bad_resize_values_are_one_line_errors(tmp_path):
    for script, *extra in (("sae/sae-trainer.py",), ("sae/cache_activations.py",), ("sae/evaluation/eval_sae.py",),
                           ("sae/evaluation/modality.py",), ("steering/eval_steering.py", "--layer", "1", "--vectors", "v"),
                           ("steering/steering_rollouts.py", "--layer", "1", "--vectors", "v"),
                           ("probes/compute_image_activations.py",)):
        for value in ("0", "-3") if script == "sae/sae-trainer.py" else ("0",):
            line = _error_line(_run(script, *extra, "--resize", value, "--out", str(tmp_path / "x")))
            assert f"--resize {value}: expected a side length in pixels" in line, (script, line)
