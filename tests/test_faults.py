"""Faults of sae/sae-trainer.py and of distributed runs, each one line ``error: ...`` with exit code 2:
bad flags, a diverging or non-finite run (no checkpoint ever holds a bad state; the error names the last
good one and --resume continues from it), a data set whose images are all unreadable, and a frozen rank
under torchrun (the collective timeout of lineofsight/dist.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_script
from safetensors.torch import load_file

from lineofsight import dist
from lineofsight.cli import UserError

TRAINER = str(ROOT / "sae" / "sae-trainer.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
BATCH = 64
"""Tokens per step in the cache runs: 12 steps of the synthetic cache below take about a second."""


def _run(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=ENV)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The run's one-line error: exit code 2, no traceback, the last stderr line ``error: ...``."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


def _write_token_cache(folder: Path, acts: torch.Tensor) -> Path:
    """A token cache (the layout sae/cache_activations.py writes) holding ``acts [N, D]`` as layer 1."""
    from lineofsight.cache import write_cache_metadata
    from lineofsight.io import save_tensors

    n = len(acts)
    folder.mkdir(parents=True)
    save_tensors(folder / "shard-00000.safetensors", {
        "acts": acts[:, None].contiguous(), "token_type": (torch.arange(n) % 3).to(torch.uint8),
        "sample": torch.arange(n) // 16, "token_id": torch.zeros(n, dtype=torch.long),
        "type_index": torch.zeros(n, dtype=torch.long)},
        {"skipped": json.dumps({"total": 0, "counts": {}, "examples": {}})})
    write_cache_metadata(folder, {"layers": [1], "d_model": acts.shape[1], "n_tokens": n,
                                  "shards": ["shard-00000.safetensors"], "key": {"model": "synthetic"}})
    return folder


@pytest.fixture(scope="module")
def synthetic_acts() -> torch.Tensor:
    """1024 tokens of width 32: sparse sums of 128 random directions plus an offset (no model needed)."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(128, 32, generator=g)
    codes = torch.rand(1024, 128, generator=g) * (torch.rand(1024, 128, generator=g) < 0.05)
    return codes @ directions + 3 * torch.randn(32, generator=g)


@pytest.fixture(scope="module")
def cache(synthetic_acts, tmp_path_factory) -> Path:
    return _write_token_cache(tmp_path_factory.mktemp("faults") / "tokens", synthetic_acts)


def _trainer(cache: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, TRAINER, "--activations", str(cache), "--expansion", "2", "--batch-size", str(BATCH),
            "--total-tokens", str(BATCH * 12), "--out", str(out), *extra]


def _all_finite(folder: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for f in folder.rglob("*.safetensors")
               for t in load_file(f).values() if t.is_floating_point())


# ---- flags refused before anything runs (the width-dependent --k once the cache is read) --------------

_NO_WANDB = pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")


@pytest.mark.parametrize("extra, message", [
    (["--lr", "inf"], "--lr inf: not a finite number"),
    (["--lr", "nan"], "--lr nan: not a finite number"),
    (["--lr", "0"], "--lr must be positive"),
    (["--l1-coefficient", "-1"], "--l1-coefficient must be >= 0"),
    (["--l1-coefficient", "inf"], "--l1-coefficient inf: not a finite number"),
    (["--l1-warmup-frac", "1.5"], "--l1-warmup-frac 1.5: must be a fraction in [0, 1]"),
    (["--lr-decay-frac", "-0.5"], "--lr-decay-frac -0.5: must be a fraction in [0, 1]"),
    (["--lr-decay-frac", "nan"], "--lr-decay-frac nan: not a finite number"),
    (["--diverge-factor", "0.5"], "--diverge-factor 0.5: must be 0 (off) or > 1"),
    (["--limit", "0"], "--limit must be positive"),
    (["--step-delay", "-1"], "--step-delay must be >= 0"),
    pytest.param(["--wandb", "proj"], "the wandb package is not installed", marks=_NO_WANDB),
    (["--activation", "topk", "--k", "100000"], "--k 100000 is more than the 64 latents of SAE L1"),
    (["--activation", "batchtopk", "--k", "65"], "--k 65 is more than the 64 latents of SAE L1"),
])
def test_bad_flags_are_one_line_exit_2(cache, tmp_path, extra, message):
    proc = _run(_trainer(cache, tmp_path / "run", *extra))
    assert message in _error_line(proc)
    assert not (tmp_path / "run").exists()  # refused before the run folder was taken


# ---- runs that go wrong: nothing bad is ever written ---------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    # the first update makes weights of ~1e30: the check before checkpoint step-1 finds an infinite loss
    (["--lr", "1e30", "--checkpoint-every", "1"], "non-finite loss after the update of step 0"),
    (["--lr", "1e30"], "non-finite loss at step 1"),
    # finite divergence (this used to end "done" with a loss of 1e26 and more)
    (["--lr", "1"], "the loss diverged"),
    # with the divergence check off, Adam's second moment overflows before the loss does
    (["--lr", "1e4", "--diverge-factor", "0", "--checkpoint-every", "5"], "non-finite Adam state after the update"),
])
def test_a_diverging_run_stops_without_writing_a_bad_state(cache, tmp_path, extra, message):
    run = tmp_path / "run"
    line = _error_line(_run(_trainer(cache, run, *extra)))
    assert message in line and "Last good checkpoint: none" in line, line
    assert not list(run.glob("checkpoints/step-*"))
    assert _all_finite(run)
    assert not (run / "saes").exists() and not (run / "metrics.json").exists()
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and message in record["summary"]


def test_divergence_names_the_last_good_checkpoint_and_resume_continues_from_it(synthetic_acts, tmp_path):
    """Step 7's batch is 1000x too large (a broken shard, say): the loss jumps far above 1000x its early
    value, the run stops before keeping the update and names checkpoint step-6, which is finite and
    complete. --resume starts there and stops at the same step again; with the check off it finishes."""
    trainer = load_script("sae/sae-trainer.py")
    cfg = trainer.Config(batch_size=BATCH)
    source = trainer.CacheSource(cfg, synthetic_acts, torch.zeros(len(synthetic_acts)), [1], 0, 1, "cpu")
    acts = synthetic_acts.clone()
    acts[source._global_indices(7)] *= 1000  # the tokens of step 7's batch (and only those, in the first epoch)
    cache = _write_token_cache(tmp_path / "tokens", acts)
    run = tmp_path / "run"
    args = _trainer(cache, run, "--checkpoint-every", "2")

    line = _error_line(_run(args))
    good = run / "checkpoints" / "step-00000006"
    assert "the loss diverged" in line and "at step 7" in line, line
    assert f"Last good checkpoint: {good} (--resume continues from it)" in line, line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", good.name]
    assert (run / "checkpoints" / "latest").read_text().strip() == good.name
    state = json.loads((good / "state.json").read_text())
    (entry,) = state["saes"].values()
    assert state["step"] == 6 and entry["early_loss_n"] == 6 and entry["early_loss_sum"] > 0
    assert _all_finite(good) and set(load_file(good / "sae-L1.safetensors")) >= {"sae.W_dec", "opt.0.exp_avg"}
    files = {p.name: p.read_bytes() for p in good.iterdir()}

    again = _run([*args, "--resume"])  # the same data diverges at the same step; nothing is written
    assert f"resumed from {good} at step 6/12" in again.stdout, again.stdout[-2000:]
    assert "at step 7" in _error_line(again)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == files

    done = _run([*args, "--resume", "--diverge-factor", "0"])  # --diverge-factor is no resume key
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {good} at step 6/12" in done.stdout and "done: 12 steps" in done.stdout
    assert _all_finite(run / "saes" / "L1") and json.loads((run / "run.json").read_text())["status"] == "done"


# ---- online mode: every image unreadable ---------------------------------------------------------------

def test_all_images_unreadable_is_one_error_counting_each_image_once(small_world, tmp_path):
    records = json.loads((small_world / "sharegpt4v.json").read_text())[:4]
    records = [{**records[i % 4], "id": f"r{i}", "image": f"gone/{i}.png"} for i in range(20)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    start = time.perf_counter()
    proc = _run([sys.executable, TRAINER, "--data", str(tmp_path / "data.json"), "--layer", "1", "--expansion", "2",
                 "--batch-size", "64", "--total-tokens", "640", "--records-per-forward", "3",
                 "--out", str(tmp_path / "run")])
    line = _error_line(proc)
    assert "every one of the 20 records' images was unreadable (20 missing, e.g. " in line, line
    assert f"--image-root {tmp_path}" in line
    assert time.perf_counter() - start < 60


# ---- distributed: a frozen rank ------------------------------------------------------------------------

def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[1]), fields[0]


def _alive(pid: int) -> bool:
    got = _ppid_and_state(pid)
    return got is not None and got[1] not in ("Z", "X")  # a zombie has exited


def _workers(launcher: int) -> dict[int, int]:
    """torchrun's workers: {rank: pid}."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        got = _ppid_and_state(int(stat.parent.name))
        if got and got[0] == launcher:
            try:
                env = Path(f"/proc/{stat.parent.name}/environ").read_bytes().split(b"\0")
            except (FileNotFoundError, ProcessLookupError):
                continue
            rank = next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)
            if rank is not None:
                found[rank] = int(stat.parent.name)
    return found


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_frozen_rank_ends_the_job_with_one_line_naming_the_rank(cache, tmp_path):
    """SIGSTOP rank 1 mid-run: rank 0 waits in a collective for at most the timeout, then exits 2 with
    one line naming itself and rank 1 (not hanging forever as before)."""
    timeout = 6
    run, logs = tmp_path / "run", tmp_path / "logs"
    cmd = [*TORCHRUN, "--log-dir", str(logs), "--redirects", "3", TRAINER, "--activations", str(cache),
           "--batch-size", "32", "--total-tokens", str(32 * 2 * 10_000), "--checkpoint-every", "1",
           "--step-delay", "0.1", "--out", str(run)]
    with (tmp_path / "launcher.log").open("w") as log:
        launcher = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, dist.TIMEOUT_ENV: str(timeout)}, stdout=log,
                                    stderr=subprocess.STDOUT)
    workers: dict[int, int] = {}
    try:
        _wait_for(lambda: (run / "checkpoints" / "latest").is_file() or launcher.poll() is not None, 90,
                  "the first checkpoint")
        workers = _workers(launcher.pid)
        assert sorted(workers) == [0, 1], (tmp_path / "launcher.log").read_text()[-3000:]
        os.kill(workers[1], signal.SIGSTOP)
        stopped = time.perf_counter()
        _wait_for(lambda: not _alive(workers[0]), timeout + 10, "rank 0 to give up on rank 1")
        waited = time.perf_counter() - stopped
        assert waited < timeout + 6, waited
        os.kill(workers[1], signal.SIGKILL)  # torchrun's SIGTERM waits for a stopped process; then it reports
        launcher.wait(timeout=30)
    finally:
        for pid in (*workers.values(), launcher.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()
    (stderr,) = logs.glob("*/attempt_0/0/stderr.log")
    text = stderr.read_text()
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[-1].startswith("error: rank 0 of 2: ") and "error:" not in "\n".join(lines[:-1]), text[-3000:]
    assert f"timed out after {timeout} s waiting for rank 1" in lines[-1], lines[-1]
    launcher_log = (tmp_path / "launcher.log").read_text()
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*\n\s*exitcode\s*: 2 ", launcher_log), launcher_log[-3000:]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and "timed out" in record["summary"]
    assert _all_finite(run / "checkpoints")


# ---- lineofsight.dist: the timeout setting and the error translation -----------------------------------

def test_collective_timeout_setting(monkeypatch):
    monkeypatch.delenv(dist.TIMEOUT_ENV, raising=False)
    assert dist.collective_timeout_s() == dist.DEFAULT_TIMEOUT_S == 1800
    assert dist.collective_timeout_s(12) == 12.0
    monkeypatch.setenv(dist.TIMEOUT_ENV, "7.5")
    assert dist.collective_timeout_s() == 7.5 and dist.collective_timeout_s(3) == 3.0  # the argument wins
    for bad in ("soon", "0", "-5", "inf", "nan"):
        monkeypatch.setenv(dist.TIMEOUT_ENV, bad)
        with pytest.raises(UserError, match=re.escape(f"${dist.TIMEOUT_ENV}=")):
            dist.collective_timeout_s()
    with pytest.raises(UserError, match="timeout_s=0"):
        dist.collective_timeout_s(0)


@pytest.mark.parametrize("raised, expected", [
    ("[/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv operation to complete",
     "rank 0 of 2: an all-reduce timed out after 6 s waiting for rank 1 (frozen, lost or stuck; "
     "$LINEOFSIGHT_DIST_TIMEOUT_S sets the limit); stopping"),
    ("[/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:30134. This is typically caused "
     "by a remote worker crashing. GLHF!",
     "rank 0 of 2: an all-reduce lost its connection to rank 1 (its process died or its node was lost: "
     "Connection closed by peer [127.0.0.1]:30134); stopping"),
    ("mat1 and mat2 shapes cannot be multiplied (4x3 and 2x2)", None),  # a bug keeps its traceback
])
def test_guard_turns_collective_failures_into_one_line(monkeypatch, raised, expected):
    monkeypatch.setattr(dist, "_active", lambda: True)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "_timeout_s", 6.0)
    if expected is None:
        with pytest.raises(RuntimeError, match="mat1"), dist.guard("an all-reduce"):
            raise RuntimeError(raised)
        return
    with pytest.raises(UserError) as err, dist.guard("an all-reduce"):
        raise RuntimeError(raised)
    assert str(err.value) == expected
