"""lineofsight.dist: the same code in one process and under torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from lineofsight import dist


def test_single_process_is_a_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = dist.setup(seed=3, device="cpu")
    assert (info.rank, info.world_size, info.is_main, info.device.type) == (0, 1, True, "cpu")
    first = torch.rand(3)
    dist.setup(seed=3, device="cpu")
    assert torch.equal(torch.rand(3), first)  # seeded from the config
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(dist.all_reduce(t.clone()), t)
    assert torch.equal(dist.all_reduce(t.clone(), op="mean"), t)
    assert torch.equal(dist.broadcast(t.clone()), t)
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    dist.barrier()
    dist.cleanup()


def test_torchrun_two_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(
        """
        import json, sys, torch
        from lineofsight import dist
        info = dist.setup(seed=0, device="cpu")
        total = dist.all_reduce(torch.tensor([float(info.rank + 1)]))
        mean = dist.all_reduce(torch.tensor([float(info.rank)]), op="mean")
        shared = dist.broadcast(torch.tensor([float(info.rank + 10)]))
        gathered = dist.all_gather_object(info.rank * 2)
        draw = torch.rand(1).item()
        dist.print0("only rank 0 prints this")
        with open(sys.argv[1] + f"/rank{info.rank}.json", "w") as f:
            json.dump(dict(rank=info.rank, world=info.world_size, total=total.item(), mean=mean.item(),
                           shared=shared.item(), gathered=gathered, draw=draw), f)
        dist.cleanup()
        """
    ))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("only rank 0 prints this") == 1
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert (res["rank"], res["world"], res["total"], res["mean"]) == (r, 2, 3.0, 0.5)
        assert res["shared"] == 10.0 and res["gathered"] == [0, 2]
    assert results[0]["draw"] != results[1]["draw"]  # ranks are seeded differently


def test_freed_cpu_memory_is_reused_not_faulted_in_again():
    """A forward pass allocates and frees activation buffers of a few MiB. With the allocator
    setting the next pass reuses that memory; without it glibc gives it back to the OS and the
    next pass faults it in again, page by page. glibc's default thresholds adapt to what the
    process freed before (and the environment may tune them), so the probe first pins the
    give-back behaviour (128 KiB thresholds); the setting under test must override it."""
    probe = textwrap.dedent(
        """
        import ctypes, resource, torch
        from lineofsight import dist
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        assert mallopt(dist._M_TRIM_THRESHOLD, 128 << 10) and mallopt(dist._M_MMAP_THRESHOLD, 128 << 10)
        kept = dist.keep_freed_cpu_memory()
        w_in, w_out = torch.randn(128, 256), torch.randn(256, 128)
        def one_pass():  # six MLP blocks on 1424 tokens of width 128, as in a batch-16 forward
            h = torch.randn(1424, 128)
            for _ in range(6):
                h = h + torch.nn.functional.silu(h @ w_in) @ w_out
            return h
        for _ in range(3):
            one_pass()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            one_pass()
        print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        """
    )
    results = {}
    for setting in ("1", "0"):
        env = {**os.environ, "LINEOFSIGHT_KEEP_CPU_MEMORY": setting}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        kept, faults = out.stdout.split()
        results[setting] = (kept == "True", int(faults))
    assert results["1"][0] and not results["0"][0], results
    assert results["0"][1] > 10_000, results  # given back: thousands of pages per pass
    assert results["1"][1] * 20 < results["0"][1], results  # kept: reused
