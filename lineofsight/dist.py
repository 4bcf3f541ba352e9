"""One set-up for plain ``python`` and ``torchrun``.

A script calls :func:`setup` once and :func:`cleanup` at the end. Under ``torchrun`` (the
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables are set) it joins the process group (nccl
on GPUs, gloo on CPU, so tests can run ``torchrun --nproc_per_node 2`` on a laptop), pins
the device to ``LOCAL_RANK`` and seeds each rank differently; in a single process it does
none of that. The reductions below are no-ops in a single process, so the same code runs
both ways.

**Collective timeout.** Every collective waits at most ``timeout_s`` (argument of :func:`setup`,
else ``$LINEOFSIGHT_DIST_TIMEOUT_S``, else 1800 s) for the other ranks. A rank that is frozen
(``SIGSTOP``, a hung filesystem), lost with its node, or stuck far behind would otherwise hang the
job forever. With gloo (CPU) the waiting ranks then stop with a one-line :class:`UserError` that
names this rank and, when it is known, the one it waited for: the helpers below translate the
error, and :func:`guard` does the same for collectives torch runs by itself (DDP's gradient
all-reduce in ``backward``). With nccl, torch's watchdog ends the process after the same timeout.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist

from lineofsight.cli import UserError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "DistInfo",
    "all_gather_object",
    "all_reduce",
    "barrier",
    "broadcast",
    "broadcast_object",
    "cleanup",
    "collective_timeout_s",
    "guard",
    "is_main",
    "keep_freed_cpu_memory",
    "print0",
    "rank",
    "setup",
    "world_size",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands."""

    rank: int
    """Global rank (0 in a single process)."""
    local_rank: int
    """Rank on this node; picks the GPU."""
    world_size: int
    """Number of processes."""
    device: torch.device
    """This process's device."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


TIMEOUT_ENV = "LINEOFSIGHT_DIST_TIMEOUT_S"
"""Environment variable: seconds a collective waits for the other ranks (when ``setup`` is not given one)."""
DEFAULT_TIMEOUT_S = 1800.0
"""Generous: rank 0 may spend minutes alone (writing a checkpoint, preparing a cache) while the others wait."""
_timeout_s = DEFAULT_TIMEOUT_S


def collective_timeout_s(timeout_s: float | None = None) -> float:
    """``timeout_s``, else ``$LINEOFSIGHT_DIST_TIMEOUT_S``, else :data:`DEFAULT_TIMEOUT_S`; a
    :class:`UserError` unless it is a finite number of seconds > 0."""
    where = "timeout_s"
    if timeout_s is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT_S
        where = f"${TIMEOUT_ENV}"
        try:
            timeout_s = float(raw)
        except ValueError:
            raise UserError(f"{where}={raw!r}: expected a number of seconds > 0") from None
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise UserError(f"{where}={timeout_s}: expected a finite number of seconds > 0")
    return float(timeout_s)


def setup(seed: int | None = None, device: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Initialise the process group when launched by torchrun; pick the device; seed.

    Args:
        seed: base seed; rank ``r`` is seeded with ``seed + r`` (python, numpy, torch).
        device: ``"cpu"``, ``"cuda"`` or ``None`` (cuda when available, else cpu).
        timeout_s: how long a collective waits for the other ranks before this rank stops
            (see the module docstring); default ``$LINEOFSIGHT_DIST_TIMEOUT_S`` or 1800 s.
    """
    global _timeout_s
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if _launched_by_torchrun() and not torch_dist.is_initialized():
        _timeout_s = collective_timeout_s(timeout_s)
        if use_cuda:
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                      timeout=timedelta(seconds=_timeout_s))
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if not use_cuda:
        keep_freed_cpu_memory()
    info = DistInfo(rank=rank(), local_rank=local_rank, world_size=world_size(), device=dev)
    if seed is not None:
        import numpy as np

        random.seed(seed + info.rank)
        np.random.seed((seed + info.rank) % 2**32)
        torch.manual_seed(seed + info.rank)
    return info


# glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_freed_memory_kept: bool | None = None


def keep_freed_cpu_memory() -> bool:
    """Keep memory that torch frees on the CPU inside the process, for the next forward pass.

    By default glibc serves every allocation above 128 KiB (raised adaptively, at most 32 MiB)
    with a fresh ``mmap`` and gives it back on ``free``, and trims the heap top likewise, so each
    forward pass at batch size > 1 faults its activation buffers in again page by page. On the
    2-core CPU this project is tested on, ten batch-16 forwards of the toy model took 111,712
    minor page faults without this setting and 57 with it, and extracting 32 images at batch 16
    took about 145 ms instead of 100 ms. Raising both thresholds makes freed buffers reusable;
    the price is that the process keeps its peak heap until it exits. CUDA memory has torch's
    own caching allocator and needs nothing.

    Idempotent; returns whether the setting took (False off glibc, e.g. on macOS), and can be
    turned off with ``LINEOFSIGHT_KEEP_CPU_MEMORY=0``.
    """
    global _freed_memory_kept
    if _freed_memory_kept is None:
        _freed_memory_kept = False
        if os.environ.get("LINEOFSIGHT_KEEP_CPU_MEMORY", "1") != "0":
            import ctypes

            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):  # not glibc: its allocator is left alone
                return False
            # 1 GiB of free heap top before trimming; blocks up to 32 MiB (glibc's cap) from the heap.
            _freed_memory_kept = bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30)) and bool(
                mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            )
    return _freed_memory_kept


def cleanup() -> None:
    """Leave the process group if we joined one: first free what may still hold its pending work (DDP
    reducers, finished collectives' buffers; a gloo worker thread releasing them during interpreter shutdown
    aborts the process: "terminate called without an active exception"), then destroy it."""
    if torch_dist.is_initialized():
        import gc

        gc.collect()
        torch_dist.destroy_process_group()


def _active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if _active() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


# What gloo says when a collective gave up: a peer that did not answer within the timeout, or one
# whose connection broke (its process died, its node went away).
_TIMED_OUT = ("timed out", "timeout")
_LOST = ("connection closed", "connection reset", "broken pipe", "connection refused", "no route to host")


def _failure(err: BaseException, what: str) -> str | None:
    """The one-line report of a collective that timed out or lost a peer, or None for other errors."""
    text = str(err).strip()
    low = text.lower()
    if not isinstance(err, RuntimeError) or not _active():
        return None
    timed_out = any(p in low for p in _TIMED_OUT)
    if not timed_out and not any(p in low for p in _LOST):
        return None
    me, n = rank(), world_size()
    # Two ranks: the one this rank waited for is the other. More: gloo does not say which.
    peer = f"rank {1 - me}" if n == 2 else "another rank"
    where = f"rank {me} of {n}: {what}"
    if timed_out:
        return (f"{where} timed out after {_timeout_s:g} s waiting for {peer} (frozen, lost or stuck; "
                f"${TIMEOUT_ENV} sets the limit); stopping")
    # gloo: "[.../pair.cc:553] Connection closed by peer [127.0.0.1]:30134. This is typically ..."
    detail = text.splitlines()[0].split("] ", 1)[-1].split(". ", 1)[0][:160] if text else type(err).__name__
    return f"{where} lost its connection to {peer} (its process died or its node was lost: {detail}); stopping"


@contextlib.contextmanager
def guard(what: str = "a collective operation") -> Iterator[None]:
    """Turn a collective inside the block that timed out or lost a peer into a one-line
    :class:`UserError` naming this rank (for collectives torch runs itself, e.g. DDP's backward);
    any other error passes unchanged."""
    try:
        yield
    except RuntimeError as err:
        message = _failure(err, what)
        if message is None:
            raise
        raise UserError(message) from None


def barrier() -> None:
    if _active():
        with guard("a barrier"):
            torch_dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce ``tensor`` in place across ranks (``sum``, ``mean``, ``max``, ``min``); returns it."""
    if not _active():
        return tensor
    ops = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX, "min": torch_dist.ReduceOp.MIN}
    with guard("an all-reduce"):
        if op == "mean":
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
            tensor /= world_size()
        else:
            torch_dist.all_reduce(tensor, op=ops[op])
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Copy rank ``src``'s ``tensor`` to every rank, in place; returns it."""
    if _active():
        with guard(f"a broadcast from rank {src}"):
            torch_dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    if not _active():
        return obj
    box = [obj]
    with guard(f"a broadcast from rank {src}"):
        torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * world_size()
    with guard("an all-gather"):
        torch_dist.all_gather_object(out, obj)
    return out


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on each) concatenated along dim 0 in rank order
    (``tensor`` itself in a single process)."""
    if not _active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    with guard("an all-gather"):
        torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather(tensor: torch.Tensor, dst: int) -> torch.Tensor | None:
    """On rank ``dst``: every rank's ``tensor`` (same shape on each) concatenated along dim 0 in rank
    order; None on the other ranks (``tensor`` itself in a single process)."""
    if not _active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())] if rank() == dst else None
    with guard(f"a gather to rank {dst}"):
        torch_dist.gather(tensor.contiguous(), parts, dst=dst)
    return torch.cat(parts) if parts is not None else None
