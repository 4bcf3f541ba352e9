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
    """Row groups to run (default: all). Groups: hooks, probes."""
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


def _load_script(relpath: str) -> Any:
    """Import one of the project's single-file scripts as a module."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / relpath
    name = "bench_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def probe_rows(cfg: Config, model: Any, processor: Any) -> list[Row]:
    """Issue 3: batched early-stopped extraction vs the seed's way and vs the truncated forward."""
    import contextlib

    import numpy as np
    import torch
    from PIL import Image
    from torch import nn

    from lineofsight.hooks import Trace
    from lineofsight.models import layer_names, n_layers, residual_site

    extract = _load_script("probes/compute_image_activations.py")
    rng = np.random.default_rng(1)
    n_images = 2 * cfg.batch_size
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n_images)]
    n = n_layers(model)
    layers = list(extract.PAPER_LAYERS) if n == 32 else list(range(n))
    sites = [residual_site(model, layer) for layer in layers]
    ecfg = extract.Config(model=cfg.model)
    processor.tokenizer.padding_side = "left"

    def ours() -> None:
        for i in range(0, n_images, cfg.batch_size):
            extract.extract_batch(model, processor, images[i : i + cfg.batch_size], ecfg, sites)

    def seed_style() -> None:
        # One image at a time, one nested Trace per layer, the whole forward pass, then the mean.
        for image in images:
            inputs = processor(text=[ecfg.prompt], images=[image], return_tensors="pt")
            with torch.no_grad(), contextlib.ExitStack() as stack:
                traces = [stack.enter_context(Trace(model, site, retain_input=True, retain_output=False))
                          for site in sites]
                model(**inputs)
                [tr.input.mean(1) for tr in traces]

    blocks_name = layer_names(model)[0].rpartition(".")[0]
    parent_name, _, attr = blocks_name.rpartition(".")
    parent, blocks = model.get_submodule(parent_name), model.get_submodule(blocks_name)
    truncated = nn.ModuleList(list(blocks)[: max(layers)])

    def limit() -> None:
        # The same batches through the vision tower and only the blocks below the deepest layer,
        # no hooks, no pooling, no lm_head: what extraction cannot beat.
        setattr(parent, attr, truncated)
        try:
            for i in range(0, n_images, cfg.batch_size):
                inputs = processor(text=[ecfg.prompt] * cfg.batch_size, images=images[i : i + cfg.batch_size],
                                   return_tensors="pt", padding=True)
                with torch.no_grad():
                    model.model(**inputs, use_cache=False)
        finally:
            setattr(parent, attr, blocks)

    repeats = max(3, cfg.repeats // 3)
    t_seed, t_ours = time_pair(seed_style, ours, repeats)
    speedup_row = Row(f"extraction, {n_images} images x {len(layers)} layers", "seed: batch 1",
                      t_seed, t_ours, "<= 0.25 (4x faster)", t_seed / t_ours >= 4)
    t_limit, t_ours2 = time_pair(limit, ours, repeats)
    limit_row = Row(f"extraction vs truncated forward (batch {cfg.batch_size})", "bare, layers<L",
                    t_limit, t_ours2, "<= 1.11 (0.9x)", t_limit / t_ours2 >= 0.9)
    return [speedup_row, limit_row]


GROUPS: dict[str, Callable[[Config, Any, Any], list[Row]]] = {"hooks": hook_rows, "probes": probe_rows}


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
