"""Harvesting (token types, template tokens dropped) and sae/sae-trainer.py end to end: DDP equals one
process, kill -9 + --resume equals an uninterrupted run (one process, and a 2-rank torchrun with its
workers), a busy run folder is refused naming its holder, orphaned torchrun workers stop without
writing, bad records are skipped and counted, bad input is one line with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, build_tiny, images, load_script, mistral_tokenizer
from safetensors.torch import load_file

from lineofsight.data import SkipCounter, read_sharegpt4v
from lineofsight.harvest import TOKEN_TYPES, Harvester, record_batches


def _run(args: list[str], timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env, **kw)


TRAINER = str(ROOT / "sae" / "sae-trainer.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """``args`` in the background, stdout and stderr (its torchrun workers' too) into ``log``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log.open("w") as f:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (R, S, Z, ...), or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")  # a zombie has exited: only its parent has not reaped it


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (torchrun's workers: they run in their own sessions)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def test_harvest_keeps_image_and_caption_tokens_with_real_mistral_tokenizer():
    model, processor = build_tiny("next-mistral", n_layers=3, seed=2)
    tok = mistral_tokenizer()
    captions = ["A brown dog runs along the beach.", "Two cups of coffee on a wooden table, seen from above."]
    ims = images([(32, 32), (64, 32)], seed=3)
    h = Harvester(model, processor, [1, 2], max_caption_tokens=64)
    assert h.prompt == "[INST] <image>\nWhat is shown in this image? [/INST]"
    batch = h(captions, ims, [7, 9])

    for sample, caption, image in zip((7, 9), captions, ims, strict=True):
        mine = batch.sample == sample
        ctx = batch.token_id[mine & (batch.token_type == TOKEN_TYPES.index("text_in_context"))].tolist()
        alone = batch.token_id[mine & (batch.token_type == TOKEN_TYPES.index("text_only"))].tolist()
        assert alone == tok(caption)["input_ids"][1:]  # BOS dropped
        assert ctx == alone  # the caption after [/INST] tokenizes like the caption alone
        assert tok.decode(ctx) == caption
        # exact residuals: the image tokens and the caption tokens of one unpadded forward
        inputs = processor(text=[h.prompt + " " + caption], images=[image], return_tensors="pt")
        with torch.no_grad():
            hs = model(**inputs, output_hidden_states=True).hidden_states
        ids = inputs["input_ids"][0]
        is_img = ids == 32000
        n_prompt = len(tok(h.prompt)["input_ids"]) + int(is_img.sum()) - 1
        assert ids[n_prompt:].tolist() == ctx
        keep = is_img.clone()
        keep[n_prompt:] = True
        got = batch.acts[mine & (batch.token_type != TOKEN_TYPES.index("text_only"))]
        assert int((batch.token_type[mine] == 0).sum()) == int(is_img.sum())
        for j, layer in enumerate((1, 2)):
            torch.testing.assert_close(got[:, j], hs[layer][0][keep], rtol=1e-5, atol=1e-5)
        # template tokens (BOS, [INST], question, [/INST]) are never kept
        assert not set(ids[~keep].tolist()) & set(batch.token_id[mine & (batch.token_type == 1)].tolist()) - set(ctx)


def test_harvest_cuts_long_captions_and_filters_types():
    model, processor = build_tiny("next-mistral", n_layers=3, seed=2)
    h = Harvester(model, processor, [2], max_caption_tokens=4, types=("text_only",))
    batch = h(["one two three four five six seven"], images([(32, 32)]), [0])
    assert batch.token_type.tolist() == [2, 2, 2, 2]


def _cache_command(small_world: Path, out: Path) -> list[str]:
    return [sys.executable, "sae/cache_activations.py", "--data", str(small_world / "sharegpt4v.json"),
            "--layers", "1", "2", "--out", str(out), "--records-per-shard", "8"]


@pytest.fixture(scope="module")
def token_cache(small_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    proc = _run(_cache_command(small_world, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (cache,) = out.glob("tokens-*")
    meta = json.loads((cache / "metadata.json").read_text())
    assert meta["n_records"] == 16 and set(meta["n_tokens_by_type"]) == set(TOKEN_TYPES)
    assert all(n > 0 for n in meta["n_tokens_by_type"].values())
    return cache


def test_token_cache_is_reused_and_read_by_layer_and_type(small_world, token_cache):
    from lineofsight.cache import read_token_cache

    record = (token_cache / "run.json").read_text()
    again = _run(_cache_command(small_world, token_cache.parent))
    assert again.returncode == 0 and f"reusing the complete cache {token_cache}" in again.stdout, again.stderr[-2000:]
    assert (token_cache / "run.json").read_text() == record  # a complete cache is not written to
    meta = json.loads((token_cache / "metadata.json").read_text())
    acts, types, layer, _ = read_token_cache(token_cache.parent, None, TOKEN_TYPES)  # the --out given to the cache
    assert layer == 1 and acts.shape == (meta["n_tokens"], meta["d_model"]) and acts.dtype == torch.float32
    assert torch.bincount(types.long(), minlength=3).tolist() == [meta["n_tokens_by_type"][t] for t in TOKEN_TYPES]
    image, image_types, _, _ = read_token_cache(token_cache, 2, ("image",))
    assert len(image) == meta["n_tokens_by_type"]["image"] and set(image_types.tolist()) == {0}
    assert not torch.equal(image, acts[types == 0])  # layer 2, not layer 1


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """Every SAE of a run: ``{"<name>/<tensor>": value}``."""
    files = sorted((run / "saes").glob("*/sae.safetensors"))
    assert files, f"no SAE in {run}"
    return {f"{f.parent.name}/{k}": v for f in files for k, v in load_file(f).items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_torchrun_two_ranks_equals_one_process(token_cache, tmp_path, activation):
    common = ["--activations", str(token_cache), "--layer", "2", "--activation", activation, "--k", "8",
              "--expansion", "4", "--lr", "1e-3", "--total-tokens", str(64 * 2 * 12), "--checkpoint-every", "5"]
    one = _run([sys.executable, TRAINER, *common, "--batch-size", "128", "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAINER,
                *common, "--batch-size", "64", "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    ma = json.loads((tmp_path / "one" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert ma["tokens_seen"] == mb["tokens_seen"] == 64 * 2 * 12 and mb["world_size"] == 2
    assert ma["saes"]["L2"]["final_loss"] == pytest.approx(mb["saes"]["L2"]["final_loss"], rel=1e-4)


def test_kill_9_then_resume_equals_uninterrupted_run(small_world, tmp_path):
    """Several SAEs (two layers x two widths) from one harvest: one checkpoint holds them all, and the resumed
    run ends with every SAE bit-identical to the uninterrupted run's."""
    common = [TRAINER, "--data", str(small_world / "sharegpt4v.json"), "--layer", "1", "2", "--expansion", "2", "3",
              "--lr", "1e-3", "--batch-size", "96", "--buffer-batches", "3", "--records-per-forward", "2",
              "--total-tokens", str(96 * 24), "--checkpoint-every", "4"]
    full = _run([sys.executable, *common, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *common, "--out", str(run), "--step-delay", "0.3"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoints" / "latest").is_file():
        time.sleep(0.05)
    time.sleep(0.5)  # a little past the checkpoint, mid-run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists(), "the run finished before it could be killed"
    step = int((run / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 0 < step < 24

    # Resumed without background image decoding: how images are loaded changes nothing.
    resumed = _run([sys.executable, *common, "--out", str(run), "--resume", "--load-threads", "0"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert sorted(p.name for p in (run / "saes").iterdir()) == ["L1-x2", "L1-x3", "L2-x2", "L2-x3"]
    _same(_weights(tmp_path / "full"), _weights(run))
    again = _run([sys.executable, *common, "--out", str(run), "--resume"])
    assert again.returncode == 0 and "already finished" in again.stdout


# Under --distribute-saes (two ranks, each writing the checkpoint file of the SAE it trains): the DDP path's
# checkpoint is rank 0's, the format the single-process kill test above resumes; its DDP math is
# test_torchrun_two_ranks_equals_one_process. (Both modes killed here cost 20 s of a suite that must stay < 10 min.)
@pytest.mark.parametrize("mode", [["--layer", "1", "2", "--distribute-saes"]], ids=["distribute-saes"])
def test_kill_9_of_torchrun_and_its_workers_then_resume_equals_uninterrupted_run(token_cache, tmp_path, mode):
    common = [*TORCHRUN, TRAINER, "--activations", str(token_cache), "--layer", "2", "--expansion", "2", "--lr", "1e-3",
              "--batch-size", "32", "--total-tokens", str(32 * 2 * 16), "--checkpoint-every", "3", *mode]
    full = _run([*common, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]

    run = tmp_path / "killed"
    launcher = _start([*common, "--out", str(run), "--step-delay", "0.25"], tmp_path / "killed.log")
    try:
        _wait_for(lambda: (run / "checkpoints" / "latest").is_file(), 120, "the first checkpoint")
        time.sleep(0.3)  # past the checkpoint, mid-run
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
    finally:
        for pid in (launcher.pid, *_children(launcher.pid)):
            os.kill(pid, signal.SIGKILL)
        launcher.wait()
    _wait_for(lambda: not any(_alive(pid) for pid in workers), 10, "the killed workers to go")
    assert not (run / "metrics.json").exists(), "the run finished before it could be killed"
    step = int(_latest(run).name.split("-")[1])
    assert 0 < step < 16

    # A resume that does not match is refused before it touches the folder (one process, or another lr).
    record = (run / "run.json").read_text()
    single = [sys.executable, *common[len(TORCHRUN):], "--out", str(run), "--resume"]
    for args, message in ((single, "written by 2 ranks, not 1"), ([*single, "--lr", "2e-3"], "different lr")):
        proc = _run(args)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert (run / "run.json").read_text() == record

    resumed = _run([*common, "--out", str(run), "--resume"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and f"at step {step}/16" in resumed.stdout
    _same(_weights(tmp_path / "full"), _weights(run))
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "done" and record["world_size"] == 2
    assert record["sessions"][-1]["status"] == "running"  # the killed session never got to say otherwise
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    keys = [(d["step"], d["sae"]) for d in lines]  # one line per SAE and logged step
    assert len(keys) == len(set(keys)) and keys == sorted(keys), "log lines after the checkpoint were written twice"


def test_a_second_run_into_a_busy_folder_exits_2_naming_the_holder(token_cache, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, TRAINER, "--activations", str(token_cache), "--batch-size", "32",
            "--total-tokens", str(32 * 10_000), "--checkpoint-every", "0", "--out", str(run)]
    first = _start([*args, "--step-delay", "0.2"], tmp_path / "first.log")
    try:
        _wait_for(lambda: (run / "log.jsonl").is_file() or first.poll() is not None, 120, "the first run's steps")
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        for flag in ("--overwrite", "--resume"):
            proc = _run([*args, flag])
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
            assert lines[0].startswith("error: ") and f"is in use by pid {first.pid}" in lines[0], lines
        assert first.poll() is None
        record = json.loads((run / "run.json").read_text())
        assert record["pid"] == first.pid and record["status"] == "running"
        assert (run / "log.jsonl").is_file()  # --overwrite removed nothing
    finally:
        first.kill()
        first.wait()


def test_workers_stop_at_their_next_step_when_the_launcher_dies(token_cache, tmp_path):
    run = tmp_path / "orphans"
    log = tmp_path / "orphans.log"
    launcher = _start([*TORCHRUN, TRAINER, "--activations", str(token_cache), "--batch-size", "32",
                       "--total-tokens", str(32 * 2 * 10_000), "--checkpoint-every", "1", "--step-delay", "1",
                       "--out", str(run)], log)
    try:
        _wait_for(lambda: (run / "checkpoints" / "latest").is_file() or launcher.poll() is not None, 120,
                  "the first checkpoint")
        workers = _children(launcher.pid)
        assert len(workers) == 2, log.read_text()[-3000:]
    finally:
        launcher.kill()  # SIGKILL: the launcher only; its workers run in their own sessions
        launcher.wait()
    # The workers are in their 1 s sleep after the checkpoint: nothing is written until they wake.
    pointer = (run / "checkpoints" / "latest").read_text()
    folder = _latest(run)
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    _wait_for(lambda: not any(_alive(pid) for pid in workers), 10, "the orphaned workers to stop")
    assert (run / "checkpoints" / "latest").read_text() == pointer
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(["latest", folder.name])
    assert {p.name: p.read_bytes() for p in sorted(folder.iterdir())} == files
    for name in files:
        if name.endswith(".safetensors"):
            assert load_file(folder / name)  # loadable
    assert json.loads((folder / "state.json").read_text())["step"] == int(folder.name.split("-")[1])
    assert not (run / "saes").exists() and not (run / "metrics.json").exists()
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and "launcher" in record["summary"]
    assert "is gone; stopping without writing more" in log.read_text()


def test_missing_and_corrupt_images_are_skipped_and_counted(small_world, tmp_path):
    records = json.loads((small_world / "sharegpt4v.json").read_text())[:6]
    shutil.copytree(small_world / "sharegpt4v", tmp_path / "sharegpt4v")
    (tmp_path / "sharegpt4v" / "broken.png").write_bytes(b"not a png")
    records.append({**records[0], "id": "gone", "image": "sharegpt4v/missing.png"})
    records.append({**records[0], "id": "bad", "image": "sharegpt4v/broken.png"})
    (tmp_path / "data.json").write_text(json.dumps(records))
    proc = _run([sys.executable, TRAINER, "--data", str(tmp_path / "data.json"), "--layer", "1", "--expansion", "2",
                 "--batch-size", "64", "--buffer-batches", "2", "--total-tokens", "640", "--out", str(tmp_path / "run")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    skipped = json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped"]
    assert skipped["counts"]["missing"] >= 1 and skipped["counts"]["corrupt"] >= 1
    assert "skipped" in proc.stdout and "missing" in proc.stdout


def test_background_image_decoding_yields_the_same_batches_and_skips(small_world, tmp_path):
    """Threads decode ahead; batches, their order and the skip counts are those of plain loading."""
    records = json.loads((small_world / "sharegpt4v.json").read_text())[:9]
    shutil.copytree(small_world / "sharegpt4v", tmp_path / "sharegpt4v")
    (tmp_path / "sharegpt4v" / "broken.png").write_bytes(b"not a png")
    records[2] = {**records[2], "image": "sharegpt4v/missing.png"}
    records[6] = {**records[6], "image": "sharegpt4v/broken.png"}
    (tmp_path / "data.json").write_text(json.dumps(records))
    recs = read_sharegpt4v(tmp_path / "data.json")
    order = [8, 2, 5, 0, 6, 7, 1, 3, 4]
    runs = {}
    for threads in (0, 3):
        skips = SkipCounter()
        got = [(idx, captions, [im.tobytes() for im in ims])
               for idx, captions, ims in record_batches(recs, order, tmp_path, 2, skips, threads=threads)]
        runs[threads] = (got, skips.to_dict())
    assert runs[3] == runs[0]
    got, skipped = runs[0]
    assert [i for idx, _, _ in got for i in idx] == [8, 5, 0, 7, 1, 3, 4]
    assert skipped["counts"] == {"missing": 1, "corrupt": 1}


@pytest.mark.parametrize("extra, message", [
    (["--layer", "99"], "out of range"),
    (["--data", "/no/such/file.json"], "does not exist"),
    (["--activations", "CACHE", "--layer", "3"], "not --layer 3"),
    (["--layer", "1", "99"], "--layer 99 is out of range"),
    (["--activations", "CACHE", "--layer", "1", "3"], "holds layers [1, 2], not --layer 3"),
    (["--layer", "1", "1"], "--layer lists 1 more than once"),
    (["--k", "8", "16"], "--activation relu has no k"),
    (["--activation", "topk", "--l1-coefficient", "1", "2"], "--activation topk has no lambda"),
    (["--activations", "CACHE", "--expansion", "4", "100000000"], "GiB free"),
    (["--activations", "CACHE", "--lr", "1e30", "--total-tokens", "20000"], "non-finite loss"),
])
def test_bad_input_is_one_line_exit_2(token_cache, tmp_path, extra, message):
    extra = [str(token_cache) if a == "CACHE" else a for a in extra]
    proc = _run([sys.executable, TRAINER, "--batch-size", "64", "--total-tokens", "640", "--checkpoint-every", "1",
                 "--out", str(tmp_path / "run"), *extra])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_refuses_to_overwrite_a_run(token_cache, tmp_path):
    args = [sys.executable, TRAINER, "--activations", str(token_cache), "--batch-size", "64", "--total-tokens", "640",
            "--out", str(tmp_path / "run")]
    assert _run(args).returncode == 0
    proc = _run(args)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert _run(args + ["--overwrite"]).returncode == 0


def test_schedules():
    trainer = load_script("sae/sae-trainer.py")
    assert trainer.lr_factor(0, 100, 0.2) == 1.0 and trainer.lr_factor(79, 100, 0.2) == 1.0
    assert trainer.lr_factor(90, 100, 0.2) == pytest.approx(0.5) and trainer.lr_factor(100, 100, 0.2) == 0.0
    assert trainer.l1_factor(0, 100, 0.05) == pytest.approx(0.2) and trainer.l1_factor(4, 100, 0.05) == 1.0


# ---- several SAEs from one harvest ---------------------------------------------------------------------------


def test_one_run_of_several_saes_equals_one_run_per_sae(token_cache, tmp_path):
    """Two layers x two widths in one run from a cache: each SAE is bit-identical to the one its own run trains
    (same batches, same init, its own Adam), and each has its folder, log lines and metrics."""
    common = [sys.executable, TRAINER, "--activations", str(token_cache), "--lr", "1e-3", "--batch-size", "64",
              "--total-tokens", str(64 * 10), "--checkpoint-every", "4", "--log-every", "5"]
    multi = tmp_path / "multi"
    proc = _run([*common, "--layer", "2", "1", "--expansion", "2", "4", "--out", str(multi)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ["L1-x2", "L1-x4", "L2-x2", "L2-x4"]
    assert sorted(p.name for p in (multi / "saes").iterdir()) == names
    for layer, expansion in ((1, 2), (2, 4)):
        single = tmp_path / f"L{layer}x{expansion}"
        proc = _run([*common, "--layer", str(layer), "--expansion", str(expansion), "--out", str(single)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        mine = {k.split("/", 1)[1]: v for k, v in _weights(single).items()}
        theirs = {k.split("/", 1)[1]: v for k, v in _weights(multi).items() if k.startswith(f"L{layer}-x{expansion}/")}
        _same(mine, theirs)
    metrics = json.loads((multi / "metrics.json").read_text())
    assert sorted(metrics["saes"]) == names and metrics["layers"] == [1, 2] and metrics["steps"] == 10
    assert {n: (m["layer"], m["d_sae"]) for n, m in metrics["saes"].items()} == {
        "L1-x2": (1, 256), "L1-x4": (1, 512), "L2-x2": (2, 256), "L2-x4": (2, 512)}
    lines = [json.loads(line) for line in (multi / "log.jsonl").read_text().splitlines()]
    assert [(d["step"], d["sae"]) for d in lines] == [(step, n) for step in (5, 10) for n in names]
    ckpt = _latest(multi)
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([*(f"sae-{n}.safetensors" for n in names),
                                                            "rank000.safetensors", "state.json"])

    from lineofsight.cli import UserError
    from lineofsight.sae import load_sae, load_saes

    with pytest.raises(UserError, match=r"holds 4 SAEs \(L1-x2, L1-x4, L2-x2, L2-x4\); pass one of them"):
        load_sae(multi, "cpu")
    assert [s.cfg.d_sae for s in load_saes([multi, multi / "saes" / "L1-x2"], "cpu")] == [256, 512, 256, 512, 256]


def test_one_online_harvest_feeds_every_layer_like_its_own_run(small_world, tmp_path):
    """Online, one forward to the deepest layer fills one buffer for every layer; the SAE of layer 2 in a run of
    layers 1 and 2 is bit-identical to the one a run of layer 2 alone trains (the same tokens in the same slots)."""
    common = [sys.executable, TRAINER, "--data", str(small_world / "sharegpt4v.json"), "--expansion", "2",
              "--lr", "1e-3", "--batch-size", "64", "--buffer-batches", "2", "--records-per-forward", "2",
              "--total-tokens", str(64 * 6), "--load-threads", "0"]
    both, alone = tmp_path / "both", tmp_path / "alone"
    for layers, out in ((["1", "2"], both), (["2"], alone)):
        proc = _run([*common, "--layer", *layers, "--out", str(out)])
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (both / "saes").iterdir()) == ["L1", "L2"]
    _same({k: v for k, v in _weights(both).items() if k.startswith("L2/")}, _weights(alone))
    cfg = json.loads((both / "saes" / "L1" / "cfg.json").read_text())
    assert cfg["layer"] == 1 and cfg["hook_name"].endswith("layers.1")


@pytest.mark.parametrize("source", ["cache", "online"])
def test_distribute_saes_trains_each_sae_on_the_global_batch(token_cache, small_world, tmp_path, source):
    """--distribute-saes on 2 ranks: each rank trains its share, on the global batch (a cache: each owner reads
    it; online: the ranks' tokens of a layer are gathered on its owner). Cache: the same SAEs as one process with
    the global batch; online: the same SAEs as DDP on the same 2 ranks (up to float rounding of the mean)."""
    data = (["--activations", str(token_cache)] if source == "cache" else
            ["--data", str(small_world / "sharegpt4v.json"), "--buffer-batches", "2", "--records-per-forward", "2",
             "--load-threads", "0"])
    common = [TRAINER, *data, "--layer", "1", "2", "--expansion", "2", "3", "--lr", "1e-3",
              "--total-tokens", str(64 * 8), "--checkpoint-every", "3"]
    spread = _run([*TORCHRUN, *common, "--batch-size", "32", "--distribute-saes", "--out", str(tmp_path / "spread")])
    assert spread.returncode == 0, spread.stdout[-3000:] + spread.stderr[-3000:]
    if source == "cache":
        ref = _run([sys.executable, *common, "--batch-size", "64", "--out", str(tmp_path / "ref")])
    else:
        ref = _run([*TORCHRUN, *common, "--batch-size", "32", "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "spread")
    assert set(a) == set(b) and len({k.split("/")[0] for k in a}) == 4
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    metrics = json.loads((tmp_path / "spread" / "metrics.json").read_text())
    assert metrics["distribute_saes"] and metrics["world_size"] == 2 and metrics["tokens_seen"] == 64 * 8


def test_distribute_saes_needs_an_sae_per_rank(token_cache, tmp_path):
    proc = _run([*TORCHRUN, TRAINER, "--activations", str(token_cache), "--layer", "1", "--distribute-saes",
                 "--batch-size", "32", "--total-tokens", "640", "--out", str(tmp_path / "run")])
    assert proc.returncode != 0  # each worker says it in one line (torchrun's launcher adds its own report)
    assert "error: --distribute-saes: 2 ranks for 1 SAE; each rank trains at least one" in proc.stderr
    assert "sae-trainer.py\", line" not in proc.stderr  # no traceback from the trainer


def test_distribute_saes_stops_every_rank_when_one_sae_diverges(token_cache, tmp_path):
    """Only the rank training an SAE keeps its early losses; they travel in the health all-reduce, so every rank
    judges the divergence alike and all stop together (no rank left waiting in a collective)."""
    start = time.time()
    proc = _run([*TORCHRUN, TRAINER, "--activations", str(token_cache), "--layer", "1", "2", "--distribute-saes",
                 "--lr", "1", "--batch-size", "32", "--total-tokens", str(32 * 2 * 40), "--out", str(tmp_path / "run")],
                timeout=120)
    assert proc.returncode != 0
    errors = [line[line.index("error: "):] for line in proc.stderr.splitlines() if "error: " in line]  # after a bar
    assert len(errors) == 2 and all("the loss diverged" in line for line in errors), proc.stderr[-3000:]
    assert errors[0] == errors[1], errors  # the same SAE at the same step, on the rank that trains it and the other
    assert time.time() - start < 100
