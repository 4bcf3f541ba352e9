"""Command-line behaviour shared by every script: instant --help, one-line errors, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(
    p for d in ("scripts", "probes", "steering", "sae") for p in (ROOT / d).rglob("*.py") if not p.name.startswith("_")
)


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=env)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_help_does_not_import_torch(script):
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(script)!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('TORCH_LOADED' if 'torch' in sys.modules else 'TORCH_NOT_LOADED')\n"
    )
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout.lower()
    assert proc.stdout.strip().endswith("TORCH_NOT_LOADED")


@pytest.mark.parametrize(
    "args, message",
    [
        (["scripts/eval_toy.py", "--model", "/no/such/model"], "no such directory"),
        (["scripts/eval_toy.py", "--model", "no-such-org/no-such-model-xyz"], "could not be loaded"),
        (["scripts/eval_toy.py", "--n-per-class", "0"], "must be positive"),
        (["scripts/benchmark.py", "--only", "nonsense"], "unknown --only group"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path):
    proc = _run(args + (["--out", str(tmp_path / "x.json")] if "eval_toy" in args[0] else []))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
