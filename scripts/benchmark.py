"""The project's benchmark: speed and memory ratios, each against a baseline measured in the same run.

Every row times a candidate and its baseline on the same model, inputs, dtype and batch size,
interleaving the two so that machine noise hits both alike, and prints

    row | baseline | candidate | ratio (candidate / baseline time) | goal | verdict

A faster dtype or a different batch size would be a row of its own. Rows are grouped by the
issue that set their goal; ``--only`` picks groups. This is a measurement, not a test: nothing
here fails the test suite.

    python scripts/benchmark.py                   # all rows on the toy model
    python scripts/benchmark.py --only hooks --repeats 30
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Config:
    """Benchmark options."""

    model: str = "toy"
    """Model to benchmark: 'toy', an HF id or a local directory."""
    only: tuple[str, ...] = ()
    """Row groups to run (default: all). Groups: hooks."""
    batch_size: int = 16
    """Images per forward pass."""
    repeats: int = 15
    """Timed repetitions per side (after 2 warm-up runs); the median is reported."""
    threads: int = 2
    """torch CPU threads."""
    device: str = "cpu"
    """Device for the model."""
    dtype: str = "float32"
    """Model dtype (the same on both sides of every row)."""


@dataclasses.dataclass
class Row:
    name: str
    baseline: str
    t_base: float
    t_cand: float
    goal: str
    ok: bool

    @property
    def ratio(self) -> float:
        return self.t_cand / self.t_base


def time_pair(base: Callable[[], Any], cand: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median seconds of ``base`` and ``cand``, measured alternately."""
    for _ in range(2):
        base(), cand()
    t_b, t_c = [], []
    for _ in range(repeats):
        for fn, sink in ((base, t_b), (cand, t_c)):
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    return statistics.median(t_b), statistics.median(t_c)


def hook_rows(cfg: Config, model: Any, processor: Any) -> list[Row]:
    """Issue 2: tracing overhead and early stopping."""
    import numpy as np
    import torch
    from PIL import Image

    from lineofsight.hooks import Trace, TraceDict
    from lineofsight.models import format_prompt, layer_names, residual_site

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(cfg.batch_size)]
    prompt = format_prompt(processor, "What is shown in this image?")
    inputs = processor(text=[prompt] * cfg.batch_size, images=images, return_tensors="pt", padding=True)
    inputs = inputs.to(cfg.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    names = layer_names(model)
    n = len(names)

    def bare() -> None:
        with torch.no_grad():
            model(**inputs)

    def traced_all() -> None:
        with torch.no_grad(), TraceDict(model, names, retain_input=True, retain_output=True):
            model(**inputs)

    rows = []
    t_b, t_c = time_pair(bare, traced_all, cfg.repeats)
    rows.append(Row(f"TraceDict retaining all {n} layers (in+out)", "bare forward", t_b, t_c,
                    "<= 1.05", t_c / t_b <= 1.05))
    for layer in sorted({1, n // 2, n - 1}):
        site = residual_site(model, layer)

        def stopped(site: str = site) -> None:
            with torch.no_grad(), Trace(model, site, retain_input=True, retain_output=False, stop=True):
                model(**inputs)

        t_b, t_c = time_pair(bare, stopped, cfg.repeats)
        # Reading the input of block L runs the vision tower, the projector and L blocks, and
        # skips the rest; the goal is the share of decoder blocks that run, with 10 % slack
        # for the vision tower and embedding that run regardless.
        target = (layer + 1) / n
        rows.append(Row(f"stop=True reading layer {layer} of {n}", "full forward", t_b, t_c,
                        f"~ {target:.2f} (<= {target + 0.1:.2f})", t_c / t_b <= target + 0.1))
    return rows


GROUPS: dict[str, Callable[[Config, Any, Any], list[Row]]] = {"hooks": hook_rows}


def main(cfg: Config) -> None:
    import torch

    from lineofsight.cli import UserError
    from lineofsight.models import load_vlm

    unknown = set(cfg.only) - set(GROUPS)
    if unknown:
        raise UserError(f"unknown --only group(s) {sorted(unknown)}; groups: {sorted(GROUPS)}")
    torch.set_num_threads(cfg.threads)
    model, processor = load_vlm(cfg.model, dtype=cfg.dtype, device=cfg.device)
    print(f"model={cfg.model} dtype={cfg.dtype} device={cfg.device} batch={cfg.batch_size} "
          f"threads={cfg.threads} repeats={cfg.repeats} (median seconds, baseline and candidate interleaved)")
    header = f"{'row':<46} {'baseline':<14} {'base s':>8} {'cand s':>8} {'ratio':>6}  {'goal':<18} verdict"
    print(header)
    print("-" * len(header))
    for group, fn in GROUPS.items():
        if cfg.only and group not in cfg.only:
            continue
        for row in fn(cfg, model, processor):
            print(f"{row.name:<46} {row.baseline:<14} {row.t_base:8.4f} {row.t_cand:8.4f} {row.ratio:6.2f}  "
                  f"{row.goal:<18} {'ok' if row.ok else 'BEHIND'}", flush=True)


if __name__ == "__main__":
    from lineofsight.cli import run

    run(main, Config)
