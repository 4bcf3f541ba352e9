"""Bad flags, script by script: one line ``error: ...``, exit code 2, before any model is loaded.

Table-driven: a new script gets the same cases by adding rows. Each row runs the script's real
command-line entry point in this process (``lineofsight.cli.run``) with model loading replaced by
a tripwire, so a check that comes too late fails the row instead of loading a model.
"""

from __future__ import annotations

import pytest
from conftest import load_script

import lineofsight.models
from lineofsight.cli import run as run_cli


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Small valid inputs (vectors at layer 1, a pairs file, prompt files), so that only the flag
    under test is wrong."""
    import torch

    from lineofsight.steering import save_vectors

    tmp = tmp_path_factory.mktemp("flags")
    save_vectors(tmp / "vec", {("circle", "square", 1): torch.ones(8)}, {"method": "diff"})
    (tmp / "bad_prompt.txt").write_text("What is {src.upper} here?\n")
    return tmp


VEC = ["--vectors", "{tmp}/vec"]
CASES = [
    # non-finite numbers: refused for every float option of every script
    ("steering/steering_rollouts.py", [*VEC, "--layer", "1", "--k", "0", "nan"], "--k nan: not a finite number"),
    ("steering/steering_rollouts.py", [*VEC, "--layer", "1", "--k", "inf"], "--k inf: not a finite number"),
    ("steering/eval_steering.py", [*VEC, "--layer", "1", "--k", "nan"], "--k nan: not a finite number"),
    ("sae/approximate_steering_vectors.py", ["--lambdas", "nan"], "--lambdas nan: not a finite number"),
    ("sae/sae-trainer.py", ["--lr", "inf"], "--lr inf: not a finite number"),
    ("sae/sae-trainer.py", ["--lr", "nan"], "--lr nan: not a finite number"),
    ("probes/train_probe.py", ["--activations", "{tmp}", "--lr", "inf"], "--lr inf: not a finite number"),
    # counts and ranges
    ("steering/steering_rollouts.py", [*VEC, "--layer", "1", "--n-pairs", "-1"], "--n-pairs must be positive"),
    ("steering/eval_steering.py", [*VEC, "--layer", "1", "--n-pairs", "0"], "--n-pairs must be positive"),
    ("steering/compute_steering_vectors.py", ["--activations", "{tmp}", "--pairs", "{tmp}", "--n-pairs", "-1"],
     "--n-pairs must be positive"),
    ("sae/approximate_steering_vectors.py", ["--n-random", "0"], "--n-random must be positive"),
    ("sae/approximate_steering_vectors.py", ["--n-random", "-3"], "--n-random must be positive"),
    ("sae/approximate_steering_vectors.py", ["--lr", "0"], "--lr must be positive"),
    ("probes/train_probe.py", ["--activations", "{tmp}", "--patience", "0"], "must be positive"),
    ("probes/train_probe.py", ["--activations", "{tmp}", "--lr", "-1"], "--lr must be positive"),
    ("probes/compute_image_activations.py", ["--num-workers", "-1"], "--num-workers must be >= 0"),
    ("sae/cache_activations.py", ["--limit", "0"], "--limit must be positive"),
    ("sae/evaluation/eval_sae.py", ["--limit", "0"], "--limit must be positive"),
    ("sae/evaluation/modality.py", ["--saes", "{tmp}", "--image-only", "2"], "--image-only"),
    ("sae/evaluation/browse_features.py", ["--sae", "{tmp}", "--top-n", "0"], "--top-n"),
    ("sae/evaluation/browse_features.py", ["--sae", "{tmp}", "--dense", "0"], "--dense"),
    ("sae/evaluation/browse_features.py", ["--sae", "{tmp}", "--thumb-size", "4"], "--thumb-size"),
    ("scripts/eval_toy.py", ["--n-per-class", "0"], "must be positive"),
    ("scripts/train_toy_vlm.py", ["--threads", "0"], "--threads must be positive"),
    # a prompt with a placeholder other than {src} / {tgt}
    ("steering/steering_rollouts.py", [*VEC, "--layer", "1", "--prompts", "{tmp}/bad_prompt.txt"],
     "the only placeholders allowed are {src} and {tgt}"),
    # devices
    ("steering/steering_rollouts.py", [*VEC, "--layer", "1", "--device", "foo"], "--device 'foo': expected cpu"),
    ("steering/eval_steering.py", [*VEC, "--layer", "1", "--device", "cuda"], "no CUDA device"),
    ("sae/evaluation/eval_sae.py", ["--device", "tpu"], "--device 'tpu': expected cpu"),
]


@pytest.mark.parametrize("script, args, message", CASES, ids=[f"{c[0]}:{' '.join(c[1][-2:])}" for c in CASES])
def test_bad_flag_is_one_line_exit_2_before_the_model_loads(script, args, message, inputs, capsys, monkeypatch):
    def tripwire(*_args, **_kwargs):
        raise AssertionError(f"{script} loaded a model before refusing {args}")

    monkeypatch.setattr(lineofsight.models, "load_vlm", tripwire)
    module = load_script(script)
    with pytest.raises(SystemExit) as exc:
        run_cli(module.main, module.Config, [a.replace("{tmp}", str(inputs)) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (script, args, err)
