"""The SAE trainer's token sources at scale: the online shuffle buffer is fixed, lives in --buffer-dtype and is
refilled in place (a step writes only its batch's rows); its mixing guarantee (served at most once, a geometric
wait of mean --buffer-batches steps); its state round-trips exactly; the token cache is written shard by shard
as tokens arrive and read row by row, giving the rows of the eager reader in the same order, with a peak RSS
that does not grow with the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, load_script
from safetensors import safe_open
from safetensors.torch import load_file

from lineofsight.cache import (
    TokenShardWriter,
    open_token_cache,
    read_token_cache,
    shard_path,
    write_cache_metadata,
    write_token_shard,
)
from lineofsight.cli import UserError
from lineofsight.harvest import TOKEN_TYPES, TokenBatch

D = 8


class FakeHarvester:
    """Record i yields 3 + i % 5 tokens; token k (counting from 0 over the whole run) has ``acts[k, 0, 0] == k``."""

    layers = [1]

    def __init__(self) -> None:
        self.n_emitted = 0
        self.max_harvest = 0

    def __call__(self, captions, images, idx):
        n = sum(3 + i % 5 for i in idx)
        ids = torch.arange(self.n_emitted, self.n_emitted + n, dtype=torch.float32)
        self.n_emitted += n
        self.max_harvest = max(self.max_harvest, n)
        acts = torch.randn(n, 1, D)
        acts[:, 0, 0] = ids
        return SimpleNamespace(acts=acts, token_type=(ids.long() % 3).to(torch.uint8))


class FakeLoader:
    def want(self, chunk):
        pass

    def get(self, i, skipped):
        return "image"

    def close(self):
        pass


@pytest.fixture(scope="module")
def trainer():
    return load_script("sae/sae-trainer.py")


def _online(trainer, batch: int = 16, buffer_batches: int = 8, **kw):
    cfg = trainer.Config(batch_size=batch, buffer_batches=buffer_batches, records_per_forward=3, load_threads=0,
                         buffer_dtype="float32", **kw)
    records = [SimpleNamespace(caption=f"caption {i}") for i in range(50)]
    source = trainer.OnlineSource(cfg, FakeHarvester(), records, 0, 1, "cpu")
    source.loader = FakeLoader()
    return source


def test_buffer_is_fixed_and_a_step_writes_only_its_batch_rows(trainer):
    source = _online(trainer, batch=16, buffer_batches=8)
    source.fill()
    assert source.acts.shape == (128, 1, D) and source.n_filled == 128
    ptr, types_ptr = source.acts.data_ptr(), source.types.data_ptr()
    for step in range(60):
        before = source.acts.clone()
        x, _ = source.next_batch(step)
        assert source.acts.data_ptr() == ptr and source.types.data_ptr() == types_ptr  # refilled in place
        changed = (source.acts != before).flatten(1).any(1)
        assert int(changed.sum()) == 16  # exactly the batch's slots were written, nothing else
        assert sorted(before[changed, 0, 0].tolist()) == sorted(x[:, 0, 0].tolist())  # ... the slots just served
        assert len(source.stage_types) < source.harvester.max_harvest  # staging: less than one harvest


def test_mixing_guarantee_served_once_with_geometric_wait(trainer):
    """Every token enters once in harvest order and is served at most once; a token entering after step t is
    served at step t + w, w >= 1 geometric with mean K = --buffer-batches: P(w > k) = (1 - 1/K)^k."""
    k_batches, batch, n_steps = 8, 16, 1500
    source = _online(trainer, batch=batch, buffer_batches=k_batches)
    source.fill()
    entered = dict.fromkeys(source.acts[:, 0, 0].long().tolist(), -1)  # initial fill: eligible from step 0
    served: dict[int, int] = {}
    waits = []
    for step in range(n_steps):
        x, _ = source.next_batch(step)
        for token in x[:, 0, 0].long().tolist():
            assert token not in served, "a token was served twice"
            served[token] = step
            if entered[token] >= 0:
                waits.append(step - entered[token])
        for token in source.acts[:, 0, 0].long().tolist():
            entered.setdefault(token, step)
    resident = set(source.acts[:, 0, 0].long().tolist())
    staged = set(source.stage_acts[:, 0, 0].long().tolist())
    # nothing dropped, nothing duplicated: served + resident + staged is every harvested token, once
    assert len(served) + len(resident) + len(staged) == source.harvester.n_emitted
    assert set(served) | resident | staged == set(range(source.harvester.n_emitted))
    assert max(entered) < min(staged)  # tokens enter in harvest order
    waits_t = torch.tensor(waits, dtype=torch.float64)
    assert int(waits_t.min()) >= 1
    assert float(waits_t.mean()) == pytest.approx(k_batches, rel=0.06)  # ~20000 waits: s.e. ~0.05
    for k in (4, 8, 16):
        assert float((waits_t > k).double().mean()) == pytest.approx((1 - 1 / k_batches) ** k, abs=0.03)


def test_buffer_state_round_trips_exactly(trainer):
    a = _online(trainer)
    for step in range(5):
        a.next_batch(step)
    tensors, meta = a.state()
    b = _online(trainer)
    b.harvester.n_emitted = a.harvester.n_emitted  # the fake harvester's own position (the data's, really)
    b.load_state({k: v.clone() for k, v in tensors.items()}, meta)
    for step in range(5, 15):
        xa, ta = a.next_batch(step)
        xb, tb = b.next_batch(step)
        assert torch.equal(xa[:, 0, 0], xb[:, 0, 0]) and torch.equal(ta, tb)
    assert set(tensors) == {"buffer_acts", "buffer_types", "stage_acts", "stage_types", "gen_state"}


def test_buffer_dtype_defaults_to_the_model_dtype(trainer):
    cfg = trainer.Config(batch_size=4, buffer_batches=2, dtype="bfloat16", load_threads=0)
    assert cfg.buffer_dtype is None
    source = trainer.OnlineSource(cfg, FakeHarvester(), [SimpleNamespace(caption="c")] * 4, 0, 1, "cpu")
    source.loader = FakeLoader()
    assert source.peek(8, 0).dtype == torch.float32 and source.acts.dtype == torch.bfloat16
    assert source.next_batch(0)[0].dtype == torch.bfloat16  # a batch leaves in the buffer's dtype (route: float32)
    cache_script = load_script("sae/cache_activations.py")
    assert cache_script.Config().save_dtype is None  # resolved to --dtype in main (and in the cache's key)


# ---- token cache ------------------------------------------------------------------------------------------


def _tokens(n: int, n_layers: int, d: int, seed: int, dtype=torch.float32) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    return TokenBatch(torch.randn(n, n_layers, d, generator=g).to(dtype),
                      torch.randint(0, 3, (n,), generator=g).to(torch.uint8), torch.arange(n), torch.arange(n) + 7,
                      torch.zeros(n, dtype=torch.long))


def _synthetic_cache(folder: Path, sizes: list[int], d: int = D, dtype=torch.float32, layers=(1, 3)) -> Path:
    folder.mkdir(parents=True)
    for s, n in enumerate(sizes):
        write_token_shard(folder, s, _tokens(n, len(layers), d, s, dtype), {"total": 0, "counts": {}, "examples": {}})
    write_cache_metadata(folder, {"layers": list(layers), "d_model": d, "n_tokens": sum(sizes),
                                  "shards": [shard_path(folder, s).name for s in range(len(sizes))],
                                  "key": {"model": "synthetic"}})
    return folder


def test_streamed_shard_equals_the_batch_written_at_once(tmp_path):
    parts = [_tokens(n, 2, D, seed, torch.bfloat16) for seed, n in enumerate((5, 0, 11))]
    with TokenShardWriter(tmp_path, 0, 2, D, torch.bfloat16) as writer:
        for part in parts:
            writer.add(part)
        writer.close({"counts": {"missing": 1}})
    got = load_file(shard_path(tmp_path, 0))
    for name, value in TokenBatch.cat(parts).to_dict().items():
        assert torch.equal(got[name], value), name
    with safe_open(str(shard_path(tmp_path, 0)), "pt") as f:
        assert f.metadata() == {"skipped": '{"counts": {"missing": 1}}'}
    with pytest.raises(RuntimeError), TokenShardWriter(tmp_path, 1, 2, D, torch.float32) as writer:
        writer.add(parts[0])
        raise RuntimeError("killed mid-shard")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors"]  # no partial shard, no temp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("types", [TOKEN_TYPES, ("image", "text_only")])
def test_lazy_token_rows_equal_the_eager_reader(tmp_path, dtype, types):
    cache = _synthetic_cache(tmp_path / "c", [37, 0, 64, 5], dtype=dtype)
    acts, kinds, layer, _ = read_token_cache(cache, 3, types)
    rows = open_token_cache(cache, 3, types)
    assert layer == rows.layer == 3 and len(rows) == len(acts) and rows.dtype == dtype
    assert torch.equal(rows.types, kinds)
    assert torch.equal(rows[torch.arange(len(rows))].float(), acts)  # same rows, same order
    idx = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:40]
    assert torch.equal(rows[idx].float(), acts[idx])


def test_cache_batches_equal_the_eager_ones_for_any_world_size(tmp_path, trainer):
    cache = _synthetic_cache(tmp_path / "c", [50, 31, 70])
    acts, kinds, _, _ = read_token_cache(cache, 1, TOKEN_TYPES)
    rows = open_token_cache(cache, [1], TOKEN_TYPES)
    eager = trainer.CacheSource(trainer.Config(batch_size=32), acts[:, None], kinds, [1], 0, 1, "cpu")
    ranks = [trainer.CacheSource(trainer.Config(batch_size=16), rows, rows.types, [1], r, 2, "cpu") for r in range(2)]
    for step in range(12):  # several epochs of 151 tokens
        x, t = eager.next_batch(step)
        parts = [source.next_batch(step) for source in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), t)
    assert torch.equal(ranks[0].peek(20, 0), eager.peek(20, 0))


def test_a_missing_layer_is_a_one_line_error(tmp_path):
    cache = _synthetic_cache(tmp_path / "c", [4])
    with pytest.raises(UserError, match=r"holds layers \[1, 3\], not --layer 2"):
        open_token_cache(cache, 2, TOKEN_TYPES)


def test_the_lazy_reader_refuses_damaged_shards_like_the_eager_one(tmp_path):
    from lineofsight.io import save_tensors

    cache = _synthetic_cache(tmp_path / "c", [6, 4])
    shard = shard_path(cache, 1)
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    for read in (read_token_cache, open_token_cache):
        with pytest.raises(UserError, match=r"token-cache shard .*shard-00001.safetensors is truncated or not"):
            read(cache, 1, TOKEN_TYPES)
    save_tensors(shard, {"acts": torch.zeros(6, D), "token_type": torch.zeros(6, dtype=torch.uint8)},
                 {"skipped": "{}"})
    for read in (read_token_cache, open_token_cache):
        with pytest.raises(UserError, match=r"'acts' has shape \[6, 8\]"):
            read(cache, 1, TOKEN_TYPES)


_PEAK_RSS = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
assert proc.returncode == 0, proc.stderr[-2000:]
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_cache_training_peak_rss_is_flat_in_cache_size(tmp_path):
    """A cache 4x larger (48 MB -> 192 MB of float32 rows) leaves the trainer's peak RSS within 10 %: it never
    holds the cache (the eager reader would add the whole layer, +144 MB, to a ~400 MB process)."""
    d, per_shard = 512, 6144
    peaks = {}
    for n_shards in (4, 16):
        cache = _synthetic_cache(tmp_path / f"c{n_shards}", [per_shard] * n_shards, d=d, layers=(1,))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-c", _PEAK_RSS, sys.executable, str(ROOT / "sae" / "sae-trainer.py"),
                              "--activations", str(cache), "--expansion", "1", "--batch-size", "256",
                              "--total-tokens", str(256 * 8), "--checkpoint-every", "0", "--out",
                              str(tmp_path / f"run{n_shards}")], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[n_shards] = int(out.stdout.split()[-1]) / 1024  # MiB
    assert peaks[16] < 1.1 * peaks[4], peaks


def test_bfloat16_model_caches_and_buffers_in_bfloat16_by_default(small_world, tmp_path):
    """--save-dtype and --buffer-dtype default to the model's --dtype: a bfloat16 toy model's cache is bfloat16 (and
    says so in its key), and online training with a bfloat16 buffer runs end to end."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    data = str(small_world / "sharegpt4v.json")
    proc = subprocess.run([sys.executable, "sae/cache_activations.py", "--data", data, "--layers", "1", "--limit", "2",
                           "--dtype", "bfloat16", "--out", str(tmp_path / "cache")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (cache,) = (tmp_path / "cache").glob("tokens-*")
    assert open_token_cache(cache, 1, TOKEN_TYPES).dtype == torch.bfloat16
    assert json.loads((cache / "config.json").read_text())["key"]["save_dtype"] == "bfloat16"
    proc = subprocess.run([sys.executable, "sae/sae-trainer.py", "--data", data, "--layer", "1", "--dtype", "bfloat16",
                           "--expansion", "2", "--batch-size", "32", "--buffer-batches", "2", "--total-tokens", "128",
                           "--checkpoint-every", "2", "--out", str(tmp_path / "run")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    state = load_file(ckpt / "rank000.safetensors")
    assert state["data.buffer_acts"].dtype == torch.bfloat16 and state["data.buffer_acts"].shape[0] == 64
