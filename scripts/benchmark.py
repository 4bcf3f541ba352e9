"""The project's benchmark: speed and memory ratios, each against a baseline measured in the same run.

Every row times a candidate and its baseline on the same model, inputs, dtype and batch size,
interleaving the two so that machine noise hits both alike, and prints

    row | baseline | candidate | ratio (candidate / baseline time) | goal | verdict

A faster dtype or a different batch size would be a row of its own. Memory rows hold peak RSS in GB
instead of seconds (the columns say so), and the ratio is then candidate / baseline memory; a row that
does not apply on this device (MFU off a known GPU) prints n/a. Rows are grouped by the
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
    """Row groups to run (default: all but realwidth). Groups: hooks, probes, steering, sae, sae_eval, mc_benchmark, browser, realwidth (LLaVA-NeXT-Mistral at full width with 2 blocks; minutes on CPU)."""
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
    failed: str = ""
    """Why the baseline could not be measured (a peer library that failed); the row still prints."""
    unit: str = "s"
    """What ``t_base`` and ``t_cand`` hold: seconds, or "GB" for the memory rows (peak RSS)."""
    na: str = ""
    """Why the row does not apply here (e.g. MFU on a device with no known peak); printed instead of a verdict."""

    @property
    def ratio(self) -> float:
        return self.t_cand / self.t_base if not (self.failed or self.na) else float("nan")


def _sync() -> None:
    """Wait for queued CUDA work, so a timed call ends when its kernels do (no-op without CUDA)."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_pair(base: Callable[[], Any], cand: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median seconds of ``base`` and ``cand``, measured alternately (on CUDA, until their kernels finish)."""
    for _ in range(2):
        base(), cand()
    t_b, t_c = [], []
    for _ in range(repeats):
        for fn, sink in ((base, t_b), (cand, t_c)):
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
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


def _model_inputs(processor: Any, model: Any, **kwargs: Any) -> Any:
    """``processor(...)`` on the model's device, pixel values in the model's dtype."""
    inputs = processor(return_tensors="pt", **kwargs).to(next(model.parameters()).device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def _toy_images(n: int) -> list[Any]:
    """``n`` held-out toy world samples (classes interleaved); images and captions."""
    from lineofsight.toy import CLASSES, heldout_samples

    return heldout_samples(n_per_class=-(-n // len(CLASSES)))[:n]


def steering_rows(cfg: Config, model: Any, processor: Any) -> list[Row]:
    """Steering issue: batched steered rollouts vs the seed's loop, hook overhead, KV cache."""
    import torch

    from lineofsight.models import check_layer, format_prompt, text_config, vlm_inputs
    from lineofsight.steering import steer

    rollouts = _load_script("steering/steering_rollouts.py")
    layer, n_new, n_long, long_batch = check_layer(model, 2), 16, 64, 4
    n = cfg.batch_size
    images = [s.image for s in _toy_images(n)]
    prompt = format_prompt(processor, "What is shown in this image?")
    tok = processor.tokenizer
    tok.padding_side = "left"
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(text_config(model).hidden_size, generator=gen)
    delta = 4.0 * v / v.norm()  # k * v; the value does not matter, the token count is forced
    delta_BD = delta.expand(n, -1)
    repeats = max(3, cfg.repeats // 3)

    # Two kinds of batch. A k sweep: the rollouts' work units come in the order pair, image, prompt,
    # k, so with the paper's 10 prompts x 20 strengths 16 consecutive units are one image and one
    # prompt at 16 strengths. Distinct images: 16 images at one strength, where nothing is shared
    # and only batching helps.
    strengths = torch.linspace(0.5, 8.0, n)
    sweep = ([images[0]] * n, strengths[:, None] * (v / v.norm()))
    distinct = (images, delta_BD)

    def ours(batch: tuple[list[Any], Any], n_new: int) -> None:
        # The rollouts' own path: inputs with each distinct (image, prompt) encoded once, one
        # batched prefill with the steering hook, then the KV-cached greedy loop (EOS never ends a
        # row here, as in the seed loop: exactly n_new tokens each).
        batch_images, deltas_BD = batch
        inputs = vlm_inputs(model, processor, batch_images, [prompt] * n)
        with torch.no_grad(), steer(model, layer, deltas_BD, inputs["input_ids"], inputs["attention_mask"]):
            new = rollouts.greedy_decode(model, inputs, n_new, eos_id=-1, pad_id=tok.pad_token_id)
        assert new.shape == (n, n_new), new.shape
        tok.batch_decode(new, skip_special_tokens=True)

    def seed_style(batch: tuple[list[Any], Any], n_new: int) -> None:
        # One unit at a time: the hook registered again for each sample, then a hand-written
        # greedy loop over the KV cache (prefill with the image, then one token per forward).
        for image, delta in zip(*batch):
            inputs = _model_inputs(processor, model, text=[prompt], images=[image])
            with torch.no_grad(), steer(model, layer, delta, inputs["input_ids"], inputs["attention_mask"]):
                out = model(**inputs, use_cache=True)
                next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
                attn, new = inputs["attention_mask"], [next_ids]
                for _ in range(n_new - 1):
                    attn = torch.cat([attn, attn.new_ones(1, 1)], 1)
                    out = model(input_ids=next_ids, attention_mask=attn, cache=out.cache, use_cache=True)
                    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
                    new.append(next_ids)
            tok.batch_decode(torch.cat(new, 1), skip_special_tokens=True)

    batch = _model_inputs(processor, model, text=[prompt] * n, images=images, padding=True)
    gen_kw = {"do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}

    def plain() -> None:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=n_new, min_new_tokens=n_new, **gen_kw)

    def steered() -> None:
        with torch.no_grad(), steer(model, layer, delta_BD, batch["input_ids"], batch["attention_mask"]):
            model.generate(**batch, max_new_tokens=n_new, min_new_tokens=n_new, **gen_kw)

    small = _model_inputs(processor, model, text=[prompt] * long_batch, images=images[:long_batch], padding=True)

    def steered_long(use_cache: bool) -> None:
        with torch.no_grad(), steer(model, layer, delta_BD[:long_batch], small["input_ids"],
                                    small["attention_mask"]):
            out = model.generate(**small, max_new_tokens=n_long, min_new_tokens=n_long, use_cache=use_cache,
                                 **gen_kw)
        assert out.shape[1] == small["input_ids"].shape[1] + n_long, out.shape

    # Same images, prompt, vectors and n x n_new new tokens on both sides: the time ratio is the
    # inverse of the tokens/s ratio. 100 new tokens is the paper's rollout length.
    rows = []
    for kind, units in (("k sweep", sweep), (f"{n} images", distinct)):
        for n_tok, reps in ((n_new, repeats), (100, 3)):
            t_seed, t_ours = time_pair(lambda u=units, t=n_tok: seed_style(u, t),
                                       lambda u=units, t=n_tok: ours(u, t), reps)
            rows.append(Row(f"steered rollouts {n}x{n_tok} tok, {kind}", "seed: b1 loop", t_seed, t_ours,
                            "<= 0.125 (8x)", t_seed / t_ours >= 8))
    t_plain, t_steer = time_pair(plain, steered, cfg.repeats)
    rows.append(Row(f"steered generate, {n_new} tokens (batch {n})", "no hook", t_plain, t_steer,
                    "<= 1.05", t_steer / t_plain <= 1.05))
    t_unc, t_kv = time_pair(lambda: steered_long(False), lambda: steered_long(True), repeats)
    rows.append(Row(f"KV cache, steered, {n_long} tokens (batch {long_batch})", "uncached", t_unc, t_kv,
                    "<= 0.33 (3x)", t_unc / t_kv >= 3))
    rows.append(encode_once_row(cfg, model, processor))
    return rows


def encode_once_row(cfg: Config, model: Any, processor: Any) -> Row:
    """Encode-once issue: the paper's ten questions about one image, inputs + one forward, with the
    image preprocessed and sent through the vision tower once (vlm_inputs) vs once per row."""
    import torch

    from lineofsight.models import format_prompt, vlm_inputs
    from lineofsight.prompts import ROLLOUT_QUESTIONS
    from lineofsight.toy import CLASSES

    processor.tokenizer.padding_side = "left"
    image = _toy_images(1)[0].image
    prompts = [format_prompt(processor, q.format(src=CLASSES[0], tgt=CLASSES[1])) for q in ROLLOUT_QUESTIONS]
    n = len(prompts)

    def per_row() -> None:
        # The previous behaviour: the processor and the vision tower see the image once per row.
        with torch.no_grad():
            model(**_model_inputs(processor, model, text=prompts, images=[image] * n, padding=True))

    def once() -> None:
        with torch.no_grad():
            model(**vlm_inputs(model, processor, [image] * n, prompts))

    built = vlm_inputs(model, processor, [image] * n, prompts)

    def floor() -> None:
        # The same forward with the inputs built beforehand: the 10 rows' decoder work, which no
        # encoding scheme removes (on the toy it is ~2/3 of the baseline, so the whole row cannot
        # reach 2x; the goal is on the encoding share, t - t_floor).
        with torch.no_grad():
            model(**built)

    t_b, t_c = time_pair(per_row, once, cfg.repeats)
    t_f, _ = time_pair(floor, once, cfg.repeats)
    # Goal: preprocessing + vision tower at least 2x cheaper, t_c - t_f <= (t_b - t_f) / 2 (ideally n x).
    target = (1 + t_f / t_b) / 2
    return Row(f"inputs + forward, 1 image x {n} questions", "image per row", t_b, t_c,
               f"<= {target:.2f} (encode 2x)", t_c / t_b <= target)


def _autocast(device: str, enabled: bool) -> Any:
    """The trainer's ``--sae-autocast`` context: bfloat16 autocast on CUDA (weights and Adam stay
    float32), else a no-op."""
    import contextlib

    import torch

    if enabled and device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _dense_sae_step(sae: Any, autocast: bool = False) -> Callable[[Any], None]:
    """A train step of a plain dense reference SAE with ``sae``'s config and a copy of its
    weights: the same math as ``SparseAutoencoder.loss`` written out with dense ops (the latents
    scattered into a dense ``[N, d_sae]`` tensor, decoded by one dense product), its own Adam;
    with ``autocast``, the forward under the trainer's CUDA bfloat16 autocast, as ours."""
    import torch

    c = sae.cfg
    device = str(sae.W_enc.device)
    W_enc, b_enc, W_dec, b_dec = (torch.nn.Parameter(p.detach().clone())
                                  for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec])

    def step(x: Any) -> None:
        with _autocast(device, autocast):
            xs = x * c.act_scale
            pre = (xs - b_dec) @ W_enc + b_enc
            if c.activation == "relu":
                f = torch.relu(pre)
            elif c.activation == "topk":
                vals, idx = pre.topk(c.k, dim=-1)
                f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
            else:  # batchtopk: the k * N largest over the whole batch
                flat = torch.relu(pre).flatten()
                vals, idx = flat.topk(c.k * pre.shape[0])
                f = torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)
            x_hat = f @ W_dec + b_dec
            loss = ((xs - x_hat) ** 2).sum(-1).mean()
            if c.activation == "relu":  # April update: lambda * sum_j f_j ||W_dec_j||
                loss = loss + c.l1_coefficient * (f * torch.linalg.vector_norm(W_dec, dim=1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if c.activation != "relu":
            with torch.no_grad():
                unit = W_dec / W_dec.norm(dim=1, keepdim=True)
                W_dec.grad -= (W_dec.grad * unit).sum(1, keepdim=True) * unit
        opt.step()
        if c.activation != "relu":
            with torch.no_grad():
                W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    return step


def _sparsify_step(d_in: int, d_sae: int, k: int, device: Any) -> Callable[[Any], None] | None:
    """EleutherAI sparsify's TopK train step (fvu loss, their decoder-direction projection and
    renormalisation, Adam), or None when sparsify is not installed."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    import torch

    coder = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=device)
    opt = torch.optim.Adam(coder.parameters())
    dead = torch.zeros(d_sae, dtype=torch.bool, device=device)

    def step(x: Any) -> None:
        out = coder(x, dead_mask=dead)
        opt.zero_grad(set_to_none=True)
        (out.fvu + out.auxk_loss).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        coder.set_decoder_norm_to_unit_norm()

    return step


def _saelens_step(activation: str, d_in: int, d_sae: int, k: int, device: Any) -> Callable[[Any], None] | None:
    """SAELens' training forward pass + backward + Adam for ``activation``, or None when SAELens
    is not installed."""
    try:
        from sae_lens.saes import (
            BatchTopKTrainingSAE,
            BatchTopKTrainingSAEConfig,
            StandardTrainingSAE,
            StandardTrainingSAEConfig,
            TopKTrainingSAE,
            TopKTrainingSAEConfig,
        )
        from sae_lens.saes.sae import TrainStepInput
    except ImportError:
        return None
    import dataclasses as dc

    import torch

    cls, cfg_cls, extra = {
        "relu": (StandardTrainingSAE, StandardTrainingSAEConfig, {"l1_coefficient": 5.0}),
        "topk": (TopKTrainingSAE, TopKTrainingSAEConfig, {"k": k}),
        "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, {"k": k}),
    }[activation]
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, device=str(device), **extra))
    opt = torch.optim.Adam(sae.parameters())
    coefficients = {name: getattr(c, "value", c) for name, c in sae.get_coefficients().items()}
    fields = {f.name for f in dc.fields(TrainStepInput)}

    def step(x: Any) -> None:
        # sae-lens 6.54 added the required is_logging_step; older releases lack it (filtered below).
        kw = {"sae_in": x, "coefficients": coefficients, "dead_neuron_mask": None, "n_training_steps": 0,
              "is_logging_step": False}
        out = sae.training_forward_pass(TrainStepInput(**{k: v for k, v in kw.items() if k in fields}))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def _harvest_and_limit(model: Any, harvester: Any, captions: list[str], images: list[Any]
                       ) -> tuple[Callable[[], None], Callable[[], None]]:
    """(harvest, limit): the harvester over the records, and the least any harvest must do for them:
    the two passes' inputs (image + question + caption; caption alone) through the vision tower and
    only the blocks below the layer, with no hooks, no gathering and no lm_head."""
    import torch
    from torch import nn

    from lineofsight.models import layer_names

    ids = list(range(len(captions)))
    layer = harvester.layers[0]
    blocks_name = layer_names(model)[0].rpartition(".")[0]
    parent_name, _, attr = blocks_name.rpartition(".")
    parent, blocks = model.get_submodule(parent_name), model.get_submodule(blocks_name)
    truncated = nn.ModuleList(list(blocks)[:layer])

    def harvest() -> None:
        harvester(captions, images, ids)

    def limit() -> None:
        setattr(parent, attr, truncated)
        try:
            with_image, _, _ = harvester.prepare_with_image(captions, images)
            alone = harvester._right_padded(text=captions)
            alone = {k: v[:, : harvester.n_special + harvester.max_caption_tokens] for k, v in alone.items()}
            with torch.no_grad():
                model.model(**with_image, use_cache=False)
                model.model(**alone, use_cache=False)
        finally:
            setattr(parent, attr, blocks)

    return harvest, limit


def _our_sae_step(cfg: Config, activation: str, x: Any, d_sae: int, k: int, autocast: bool = False
                  ) -> tuple[Any, Callable[[], None]]:
    """(sae, step): a float32 SAE with its Adam on ``cfg.device``, and the trainer's step on ``x``
    (loss, backward, Adam, decoder renorm), the forward under ``--sae-autocast`` when asked (CUDA only)."""
    import torch

    from lineofsight.sae import SAEConfig, SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(d_in=x.shape[1], d_sae=d_sae, activation=activation, k=k)).to(cfg.device)
    opt = torch.optim.Adam(sae.parameters())
    dead = None if activation == "relu" else torch.zeros(d_sae, dtype=torch.bool, device=cfg.device)

    def ours() -> None:
        with _autocast(cfg.device, autocast):
            out = sae.loss(x, dead_mask=dead)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        sae.optimizer_step(opt)

    return sae, ours


def _sae_step_row(cfg: Config, name: str, activation: str, x: Any, d_sae: int, k: int, repeats: int,
                  autocast: bool = False) -> tuple[Row, Callable[[], None]]:
    """Our SAE train step (loss, backward, Adam, decoder renorm) on ``x`` against the dense reference
    at the same sizes (both under bf16 autocast with ``autocast`` on CUDA), and the step itself (for
    the peer rows)."""
    sae, ours = _our_sae_step(cfg, activation, x, d_sae, k, autocast)
    dense = _dense_sae_step(sae, autocast)
    t_ref, t_ours = time_pair(lambda: dense(x), ours, repeats)
    if activation == "relu":
        # Half the latents fire at initialisation, so the dense product is the right kernel and the
        # row checks parity: no overhead beyond noise, like the other parity rows.
        return Row(name, "dense ref", t_ref, t_ours, "<= 1.05 (parity)", t_ours / t_ref <= 1.05), ours
    return Row(name, "dense ref", t_ref, t_ours, "<= 0.83 (1.2x)", t_ref / t_ours >= 1.2), ours


def sae_rows(cfg: Config, model: Any, processor: Any) -> list[Row]:
    """SAE issue: train-step speed against a dense reference (and sparsify / SAELens when
    installed), and online harvesting against the truncated forward and the seed's scheme."""
    import torch

    from lineofsight.harvest import Harvester
    from lineofsight.hooks import Trace
    from lineofsight.models import check_layer, image_token_mask

    rows = []
    d_in, d_sae, k, n_tok = 1024, 8192, 32, 4096
    x = torch.randn(n_tok, d_in, generator=torch.Generator().manual_seed(0)).to(cfg.device)
    repeats = max(3, cfg.repeats // 5)  # one step is seconds on a few CPU cores
    for activation in ("relu", "topk", "batchtopk"):
        name = f"SAE step {activation}, {n_tok} tok, {d_in}->{d_sae}"
        row, ours = _sae_step_row(cfg, name, activation, x, d_sae, k, repeats)
        rows.append(row)
        # The peers' goals (issue 13): TopK 1.2x sparsify and 3x SAELens, BatchTopK 3x SAELens, ReLU
        # at least SAELens' standard SAE.
        peers = [("sparsify", _sparsify_step, 1.2)] if activation == "topk" else []
        peers.append(("sae_lens", lambda *a, activation=activation: _saelens_step(activation, *a),
                      1.0 if activation == "relu" else 3.0))
        for label, make, speedup in peers:
            goal = f">= {speedup:g}x faster" if speedup > 1 else ">= parity"
            try:
                step = make(d_in, d_sae, k, cfg.device)
                if step is None:
                    continue  # not installed: see the README for the comparison venv
                t_other, t_ours2 = time_pair(lambda step=step: step(x), ours, repeats)
            except Exception as err:  # a peer's API moved: print the row with the reason, keep going
                reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                rows.append(Row(name, label, 0.0, 0.0, goal, False, failed=reason[:120]))
                continue
            rows.append(Row(name, label, t_other, t_ours2, goal, t_other / t_ours2 >= speedup))
        del ours

    rows.append(_buffer_row(cfg, repeats))
    rows.append(_five_layers_row(cfg))
    layer = check_layer(model, 2)
    samples = _toy_images(cfg.batch_size)
    captions, images = [s.caption for s in samples], [s.image for s in samples]
    ids = list(range(len(samples)))
    harvester = Harvester(model, processor, [layer])
    site = harvester.sites[0]
    harvest, limit = _harvest_and_limit(model, harvester, captions, images)

    def seed_style() -> None:
        # One record at a time: a full forward of the prompt alone only to count the template
        # tokens, then full forwards of prompt + caption and of the caption alone with a hook.
        for caption, image in zip(captions, images):
            with torch.no_grad():
                prompt_only = _model_inputs(processor, model, text=[harvester.prompt], images=[image])
                n_template = model(**prompt_only).logits.shape[1]
                full = _model_inputs(processor, model, text=[harvester.text(caption)], images=[image])
                with Trace(model, site, retain_input=True, retain_output=False) as tr:
                    model(**full)
                keep = image_token_mask(full["input_ids"], model)[0]
                keep[n_template:] = True
                tr.input[0][keep].cpu()
                alone = processor.tokenizer([caption], return_tensors="pt").to(harvester.device)
                with Trace(model, site, retain_input=True, retain_output=False) as tr:
                    model(**alone)
                tr.input[0, harvester.n_special :].cpu()

    repeats = max(3, cfg.repeats // 3)
    t_limit, t_harvest = time_pair(limit, harvest, repeats)
    rows.append(Row(f"online harvest, {len(ids)} records, layer {layer}", "bare, layers<L", t_limit, t_harvest,
                    "<= 1.11 (0.9x)", t_limit / t_harvest >= 0.9))
    t_seed, t_harvest2 = time_pair(seed_style, harvest, repeats)
    rows.append(Row(f"online harvest, {len(ids)} records, layer {layer}", "seed: 2nd pass", t_seed, t_harvest2,
                    "<= 0.50 (2x)", t_seed / t_harvest2 >= 2))
    rows.append(_image_loading_row(harvester, samples, repeats))
    rows += _preprocess_overlap_rows(cfg, model, processor, n_records=16, repeats=repeats)
    return rows


def _five_layers_row(cfg: Config) -> Row:
    """The trainer on the toy, online: one run training SAEs on layers 1-5 from one harvest (one forward to
    layer 5 per batch of records, one model load) against five runs of one layer each (each its own
    harvest and load), the same tokens, SAE sizes and steps on both sides; wall time of the processes."""
    import os
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    common = [sys.executable, str(root / "sae" / "sae-trainer.py"), "--batch-size", "256", "--total-tokens",
              str(256 * 40), "--checkpoint-every", "0", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def timed(args: list[str]) -> float:
        start = time.perf_counter()
        proc = subprocess.run([*common, *args], capture_output=True, text=True, env=env, cwd=root)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "trainer failed")
        return time.perf_counter() - start

    name = "5 layers, 1 run vs 5 runs (toy, online)"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t_one = timed(["--layer", "1", "2", "3", "4", "5", "--out", f"{tmp}/all"])
            t_five = sum(timed(["--layer", str(layer), "--out", f"{tmp}/L{layer}"]) for layer in range(1, 6))
    except RuntimeError as err:
        return Row(name, "5 runs", 0.0, 0.0, ">= 2.5x", False, failed=str(err)[:120])
    return Row(name, "5 runs", t_five, t_one, ">= 2.5x", t_five / t_one >= 2.5)


def _buffer_row(cfg: Config, repeats: int) -> Row:
    """The trainer's online shuffle buffer at the paper's sizes (d_model 4096, batch 4096, 8 batches,
    bfloat16): one step's take + in-place refill against copying one batch out of it."""
    import torch

    trainer = _load_script("sae/sae-trainer.py")
    d, batch, k = 4096, 4096, 8
    tcfg = trainer.Config(batch_size=batch, buffer_batches=k, dtype="bfloat16", load_threads=0)
    source = trainer.OnlineSource(tcfg, None, [], 0, 1, cfg.device)
    gen = torch.Generator().manual_seed(0)
    source.acts = torch.randn(k * batch, 1, d, generator=gen).to(cfg.device, torch.bfloat16)  # [C, layers, d]
    source.n_filled = source.capacity
    # Staged tokens for every timed step (warm-up included), so no harvest runs inside the timing.
    n_staged = (2 + repeats) * batch
    source.stage_acts = torch.randn(n_staged, 1, d, generator=gen).to(cfg.device, torch.bfloat16)
    source.stage_types = torch.zeros(n_staged, dtype=torch.uint8, device=cfg.device)
    slots = torch.randperm(k * batch, generator=gen)[:batch].to(cfg.device)

    def copy_batch() -> None:
        source.acts[slots]

    def take_and_refill() -> None:
        source.next_batch(0)

    t_copy, t_step = time_pair(copy_batch, take_and_refill, repeats)
    source.close()
    return Row(f"shuffle buffer step, {k}x{batch} x {d} bf16", "copy 1 batch", t_copy, t_step, "<= 2.0",
               t_step / t_copy <= 2.0)


def _image_loading_row(harvester: Any, samples: list[Any], repeats: int) -> Row:
    """Harvesting records whose images are ShareGPT4V-sized JPEG files (1024 px): images decoded
    in background threads while the model runs vs decoded one by one before each forward."""
    import tempfile
    from pathlib import Path

    from PIL import Image

    from lineofsight.data import CaptionRecord, SkipCounter
    from lineofsight.harvest import record_batches

    per_forward = 8  # the trainer's --records-per-forward
    with tempfile.TemporaryDirectory() as tmp:
        records = []
        for i, sample in enumerate(samples):
            Image.fromarray(_textured(i)).save(Path(tmp) / f"{i}.jpg", quality=90)
            records.append(CaptionRecord(id=str(i), image=f"{i}.jpg", question="", caption=sample.caption))

        def harvest_files(threads: int) -> None:
            for idx, captions, images in record_batches(records, range(len(records)), tmp, per_forward,
                                                        SkipCounter(), threads):
                harvester(captions, images, idx)

        t_serial, t_threads = time_pair(lambda: harvest_files(0), lambda: harvest_files(4), repeats)
    # The processor's resizing of the full-size images (about 14 ms each here) stays in the main
    # thread, so on 2 cores only the decoding (about 6 ms each) can move off it.
    return Row(f"harvest {len(records)} x 1024px JPEG, 4 load threads", "serial decode", t_serial, t_threads,
               "< 1.00 (faster)", t_threads < t_serial)


def _preprocess_overlap_rows(cfg: Any, model: Any, processor: Any, n_records: int = 32, per_forward: int = 8,
                            threads: int = 4, repeats: int | None = None, name: str = "toy") -> list[Row]:
    """Harvesting ``n_records`` ShareGPT4V-sized JPEG files (1024 px), ``per_forward`` records a forward,
    ``threads`` load threads: the processor run per record in those threads, ahead of use, and its outputs
    collated (candidate) vs the batched processor call in the main thread (baseline: today's path, which
    decodes in the same threads). The same tokens either way (tests/test_harvest_workers.py; checked here
    too). ``repeats=0``: one timed run a side after a one-record warm-up (the real width on CPU)."""
    import tempfile
    import time
    from pathlib import Path

    import torch
    from PIL import Image

    from lineofsight.data import CaptionRecord, SkipCounter
    from lineofsight.harvest import Harvester, record_batches

    harvester = Harvester(model, processor, [1])
    samples = _toy_images(n_records)
    repeats = cfg.repeats if repeats is None else repeats
    with tempfile.TemporaryDirectory() as tmp:
        records = []
        for i, sample in enumerate(samples):
            Image.fromarray(_textured(i)).save(Path(tmp) / f"{i}.jpg", quality=90)
            records.append(CaptionRecord(id=str(i), image=f"{i}.jpg", question="", caption=sample.caption))

        def harvest(prepare: Any) -> list[Any]:
            return [harvester(captions, images, idx)
                    for idx, captions, images in record_batches(records, range(len(records)), tmp, per_forward,
                                                                SkipCounter(), threads, prepare=prepare)]

        if repeats > 0:
            same = all(torch.equal(a.acts, b.acts) for a, b in zip(harvest(None), harvest(harvester.prepare)))
            t_serial, t_overlap = time_pair(lambda: harvest(None), lambda: harvest(harvester.prepare), repeats)
        else:  # the real width on CPU (~15 s a record): one warm-up forward, then each side once, compared
            harvester([records[0].caption], [Image.open(Path(tmp) / records[0].image).convert("RGB")], [0])
            start = time.perf_counter()
            serial = harvest(None)
            t_serial = time.perf_counter() - start
            start = time.perf_counter()
            overlap = harvest(harvester.prepare)
            t_overlap = time.perf_counter() - start
            same = all(torch.equal(a.acts, b.acts) for a, b in zip(serial, overlap))
    tag = "" if same else " (NOT EQUAL)"
    return [Row(f"{name}: harvest {n_records} x 1024px JPEG, {threads} thr{tag}", "serial processor", t_serial,
                t_overlap, "< 1.00 (faster)", t_overlap < t_serial and same)]


def _textured(seed: int) -> Any:
    """A 1024 x 1024 RGB image with photo-like structure (smooth shapes plus grain), which JPEG
    compresses and decodes like a photograph rather than like noise or a flat colour."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:1024, 0:1024] / 1024.0
    channels = [np.sin(x * rng.uniform(2, 9) + rng.uniform(0, 6)) * np.cos(y * rng.uniform(2, 9)) for _ in range(3)]
    image = (np.stack(channels, -1) + 1) * 110 + rng.normal(0, 12, (1024, 1024, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def sae_eval_rows(cfg: Config, model: Any, processor: Any) -> list[Row]:
    """SAE evaluation issue: evaluation throughput against harvesting, and batched HardConcrete
    fitting against one vector at a time."""
    import torch
    from torch.nn import functional as F

    from lineofsight.harvest import Harvester
    from lineofsight.models import check_layer, text_config
    from lineofsight.sae import SAEConfig, SparseAutoencoder
    from lineofsight.sae_eval import evaluate
    approx = _load_script("sae/approximate_steering_vectors.py")
    layer = check_layer(model, 2)
    samples = _toy_images(cfg.batch_size)
    captions, images = [s.caption for s in samples], [s.image for s in samples]
    ids = list(range(len(samples)))
    harvester = Harvester(model, processor, [layer])
    d_model = text_config(model).hidden_size
    sae = SparseAutoencoder(SAEConfig(d_in=d_model, d_sae=8 * d_model)).to(cfg.device).eval()
    batches = [(ids, captions, images)]
    rows = []

    # The same records, hence the same tokens (image, caption in context, caption alone), on both
    # sides. Harvesting stops at block 2; evaluation runs on to the logits, forked at block 2 into
    # seven copies (clean and six splices) for CE loss recovered, so blocks 2-5 run seven times.
    t_harvest, t_eval = time_pair(lambda: harvester(captions, images, ids),
                                  lambda: evaluate(model, sae, harvester, batches, 0.1),
                                  max(3, cfg.repeats // 3))
    rows.append(Row(f"SAE eval, {len(ids)} records (CE: 7-way fork)", "harvest", t_harvest, t_eval,
                    "<= 1.25 (0.8x)", t_harvest / t_eval >= 0.8))

    n_vec, d_in, d_sae, steps = 50, 1024, 8192, 5
    gen = torch.Generator().manual_seed(0)
    dictionary = F.normalize(torch.randn(d_sae, d_in, generator=gen), dim=-1).to(cfg.device)
    targets = torch.randn(n_vec, d_in, generator=gen).to(cfg.device)
    lambdas = torch.full((n_vec,), 1e-3)

    def together() -> None:
        approx.hard_concrete_fit(targets, dictionary, lambdas, steps, 1e-2, 0)

    def one_at_a_time() -> None:
        for i in range(n_vec):
            approx.hard_concrete_fit(targets[i : i + 1], dictionary, lambdas[i : i + 1], steps, 1e-2, 0)

    # n_vec x steps vector-steps on both sides.
    t_loop, t_batched = time_pair(one_at_a_time, together, max(3, cfg.repeats // 5))
    rows.append(Row(f"HardConcrete {n_vec} vectors x {steps} steps, {d_in}x{d_sae}", "1 at a time", t_loop,
                    t_batched, "<= 0.20 (5x)", t_loop / t_batched >= 5))
    return rows


def mc_benchmark_rows(cfg: Config, model: Any, processor: Any, n_items: int | None = None,
                      d_sae_mult: int = 8) -> list[Row]:
    """Benchmark-splice issue: multiple-choice items scored clean, with an SAE spliced at the image tokens and with
    them zeroed (eval_benchmark's one batched forward, forked at the SAE's layer), against the paper's loop (per
    item and condition: batch 1, one greedy token from ``generate`` without a KV cache, the splice by a hook) and
    against bare batched forwards of the same items, once per condition (no hooks, no fork)."""
    import torch

    from lineofsight.benchmarks import Item
    from lineofsight.hooks import Trace
    from lineofsight.models import (
        check_layer,
        format_prompt,
        image_token_mask,
        layer_names,
        text_config,
        vlm_inputs,
    )
    from lineofsight.prompts import multiple_choice
    from lineofsight.sae import SAEConfig, SparseAutoencoder

    script = _load_script("sae/evaluation/eval_benchmark.py")
    layer = check_layer(model, 2)
    samples = _toy_images(n_items or cfg.batch_size)
    options = ["circle", "square", "star", "ring"]
    items = [Item(str(i), "s", "Which shape is shown in this image?", options, 0, s.image)
             for i, s in enumerate(samples)]
    d_model = text_config(model).hidden_size
    sae = SparseAutoencoder(SAEConfig(d_in=d_model, d_sae=d_sae_mult * d_model, layer=layer)).to(cfg.device).eval()
    splices = script.conditions_of([("sae", sae)], zero_ablate=True)
    processor.tokenizer.padding_side = "left"
    prompts = [format_prompt(processor, multiple_choice(it.question, it.options)) for it in items]
    site = layer_names(model)[layer]
    batch = cfg.batch_size

    def ours() -> None:
        for lo in range(0, len(items), batch):
            script.forward_conditions(model, processor, items[lo : lo + batch], splices)

    def paper_loop() -> None:
        for it, prompt in zip(items, prompts, strict=True):
            inputs = vlm_inputs(model, processor, [it.image], [prompt])
            mask = image_token_mask(inputs["input_ids"], model)
            for sp in [None, *splices]:
                def edit(x: Any, *, sae: Any = None if sp is None else sp.sae, mask: Any = mask) -> Any:
                    x[mask] = 0 if sae is None else sae(x[mask])[0].to(x.dtype)
                    return x

                with torch.no_grad():
                    if sp is None:
                        model.generate(**inputs, max_new_tokens=1, do_sample=False, use_cache=False)
                    else:
                        with Trace(model, site, retain_output=False, edit_input=edit):
                            model.generate(**inputs, max_new_tokens=1, do_sample=False, use_cache=False)

    def bare() -> None:
        for lo in range(0, len(items), batch):
            inputs = vlm_inputs(model, processor, [it.image for it in items[lo : lo + batch]], prompts[lo : lo + batch])
            with torch.no_grad():
                for _ in range(1 + len(splices)):
                    model(**inputs, use_cache=False, logits_to_keep=1)

    repeats = max(3, cfg.repeats // 5)
    n = f"{len(items)} MC items x {1 + len(splices)} conditions"
    t_loop, t_ours = time_pair(paper_loop, ours, repeats)
    t_bare, t_ours2 = time_pair(bare, ours, repeats)
    return [Row(n, "paper loop", t_loop, t_ours, "<= 0.33 (3x)", t_loop / t_ours >= 3),
            Row(n, "bare batched", t_bare, t_ours2, "<= 1.11 (0.9x)", t_bare / t_ours2 >= 0.9)]


def _peak_rss_gb() -> float:
    """Peak resident memory of this process so far (GB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def realwidth_rows(cfg: Config, model: Any, processor: Any) -> list[Row]:
    """LLaVA-NeXT-Mistral at full width (d_model 4096, MLP 14336, vocabulary 32064, CLIP-L/14 at 336
    px) with 2 decoder blocks and random weights in --dtype, built from config: the harvest against
    a bare forward truncated at the layer, the SAE step at d_in 4096 / d_sae 32,768, and the peak
    RSS after each stage (compare with the README's memory table)."""
    import torch

    from lineofsight.harvest import Harvester
    from lineofsight.stand_in import real_width_llava_next

    del model, processor  # the toy is not used here
    on_gpu = cfg.device.startswith("cuda")
    peaks = {"start": _peak_rss_gb()}
    big, big_processor = real_width_llava_next(n_layers=2, dtype=cfg.dtype, device=cfg.device)
    peaks["model built"] = _peak_rss_gb()
    rows = []
    n_records = 8 if on_gpu else 2
    samples = _toy_images(n_records)
    images = [s.image.resize((336, 336)) for s in samples]  # the paper's resize: 1,176 image tokens each
    captions = [s.caption for s in samples]
    harvester = Harvester(big, big_processor, [1])
    harvest, limit = _harvest_and_limit(big, harvester, captions, images)
    repeats = max(1, cfg.repeats // 5) if on_gpu else 1
    t_limit, t_harvest = time_pair(limit, harvest, repeats)
    rows.append(Row(f"real width: harvest, {n_records} rec 336px, L1", "bare, layers<L", t_limit, t_harvest,
                    "<= 1.11 (0.9x)", t_limit / t_harvest >= 0.9))
    peaks["harvest"] = _peak_rss_gb()
    rows += _realwidth_rollout_rows(cfg, big, big_processor, images[0])
    rows += _preprocess_overlap_rows(cfg, big, big_processor, n_records=8 if on_gpu else 3, per_forward=1,
                                     threads=2, repeats=repeats if on_gpu else 0, name="real width")
    peaks["rollouts"] = _peak_rss_gb()
    del big, big_processor, harvester, harvest, limit

    d_in, d_sae, k = 4096, 32768, 32
    n_tok = 4096 if on_gpu else 256
    x = torch.randn(n_tok, d_in, generator=torch.Generator().manual_seed(0)).to(cfg.device)
    # The dense ReLU step's matmul FLOPs: encoder and decoder products, each forward + 2 backward
    # (input and weight gradients; the encoder's input gradient is needed for b_dec), 2 FLOPs per
    # multiply-add: 2 x 3 x 2 = 12 N d_in d_sae. The peaks below count FLOPs the same way.
    flops = 12 * n_tok * d_in * d_sae
    # float32 as the trainer's default; on CUDA also under --sae-autocast (bf16 forward, fp32 weights and Adam).
    autocasts = (False, True) if on_gpu else (False,)
    t_relu = {}
    for autocast in autocasts:
        tag = ", autocast" if autocast else ""
        for activation in ("relu", "topk"):
            name = f"real width: SAE step {activation}, {n_tok} tok{tag}"
            row, ours = _sae_step_row(cfg, name, activation, x, d_sae, k, repeats, autocast)
            rows.append(row)
            kind = "" if activation == "relu" else " dense-equivalent"
            print(f"  {name}: {n_tok / row.t_cand:,.0f} tokens/s, {flops / row.t_cand / 1e12:.2f}{kind} TFLOP/s",
                  flush=True)
            peaks[f"SAE {activation}{tag} + Adam"] = _peak_rss_gb()
            if activation == "relu":
                t_relu[autocast] = row.t_cand
            del ours
    rows.append(_mfu_row(cfg, n_tok, flops, t_relu.get(True)))
    # TopK against ReLU, our steps interleaved (under autocast on CUDA): a fresh pair, so no more than
    # two SAEs with their Adam are alive at once, as in the rows above.
    _, relu_step = _our_sae_step(cfg, "relu", x, d_sae, k, autocast=on_gpu)
    _, topk_step = _our_sae_step(cfg, "topk", x, d_sae, k, autocast=on_gpu)
    t_r, t_k = time_pair(relu_step, topk_step, repeats)
    rows.append(Row(f"real width: SAE step topk vs relu, {n_tok} tok", "relu step", t_r, t_k, "<= 0.33 (3x)",
                    t_r / t_k >= 3))
    peaks["SAE relu + topk"] = _peak_rss_gb()
    del relu_step, topk_step, x
    print("  peak RSS after each stage (GB): " + ", ".join(f"{k} {v:.2f}" for k, v in peaks.items()), flush=True)
    if not on_gpu:  # host-memory rows: the same on any machine, so the GPU check (8 minutes) leaves them out
        rows += _checkpoint_rss_rows(cfg)
        rows.append(_cache_rss_row(cfg))
        rows += _eval_memory_rows(cfg)
    return rows


def _realwidth_rollout_rows(cfg: Config, model: Any, processor: Any, image: Any) -> list[Row]:
    """The paper's rollout workload at the real width: one 336 px image x the ten rollout questions x a k
    sweep (4 strengths on CUDA, 1 on CPU), 100 new tokens on CUDA (8 on CPU), greedy. Ours (the rollouts'
    own path: each image encoded once, one steered prefill, the KV-cached loop) against an unhooked
    ``generate`` of the same rows (the overhead of steering and our loop), and against the seed's loop
    (one row at a time: its own prefill and image encoding, a hand-written cached loop) on a slice of the
    rows. Prints the per-token costs the README's estimate of the paper's 50,000 rollouts per layer uses."""
    import torch

    from lineofsight.models import format_prompt, n_layers, text_config, vlm_inputs
    from lineofsight.prompts import ROLLOUT_QUESTIONS
    from lineofsight.steering import steer

    rollouts = _load_script("steering/steering_rollouts.py")
    on_gpu = cfg.device.startswith("cuda")
    n_k, n_new = (4, 100) if on_gpu else (1, 8)
    layer = 1
    tok = processor.tokenizer
    tok.padding_side = "left"
    questions = [q.format(src="goldfish", tgt="tabby cat") for q in ROLLOUT_QUESTIONS]
    prompts = [format_prompt(processor, q) for q in questions for _ in range(n_k)]
    n = len(prompts)
    images = [image] * n
    v = torch.randn(text_config(model).hidden_size, generator=torch.Generator().manual_seed(0))
    strengths = torch.linspace(2.0, 8.0, n_k).repeat(len(questions))
    deltas = (strengths[:, None] * v / v.norm()).to(cfg.device, model.dtype)
    gen_kw = {"do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}

    def ours(rows: int) -> None:
        inputs = vlm_inputs(model, processor, images[:rows], prompts[:rows])
        with torch.no_grad(), steer(model, layer, deltas[:rows], inputs["input_ids"], inputs["attention_mask"]):
            new = rollouts.greedy_decode(model, inputs, n_new, eos_id=-1, pad_id=tok.pad_token_id)
        tok.batch_decode(new, skip_special_tokens=True)

    def plain() -> None:
        inputs = _model_inputs(processor, model, text=prompts, images=images, padding=True)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, **gen_kw)

    def seed_style(rows: int) -> None:
        for prompt, delta in zip(prompts[:rows], deltas[:rows], strict=True):
            inputs = _model_inputs(processor, model, text=[prompt], images=[image])
            with torch.no_grad(), steer(model, layer, delta, inputs["input_ids"], inputs["attention_mask"]):
                out = model(**inputs, use_cache=True)
                next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
                attn = inputs["attention_mask"]
                for _ in range(n_new - 1):
                    attn = torch.cat([attn, attn.new_ones(1, 1)], 1)
                    out = model(input_ids=next_ids, attention_mask=attn, cache=out.cache, use_cache=True)
                    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)

    repeats = max(1, cfg.repeats // 5) if on_gpu else 1
    t_plain, t_ours = time_pair(plain, lambda: ours(n), repeats)
    rows = [Row(f"real width: steered rollouts {n}x{n_new} tok", "plain generate", t_plain, t_ours,
                "<= 1.05", t_ours / t_plain <= 1.05)]
    part = n if on_gpu else 4  # the seed's loop on CPU: 4 rows (its image is encoded once per row)
    t_seed, t_part = time_pair(lambda: seed_style(part), lambda: ours(part), repeats)
    rows.append(Row(f"real width: steered rollouts {part}x{n_new} tok", "seed: b1 loop", t_seed, t_part,
                    "<= 0.125 (8x)", t_seed / t_part >= 8))
    print(f"  real width rollouts: {n} rows x {n_new} new tokens in {t_ours:.2f} s: {n * n_new / t_ours:,.0f} "
          f"generated tokens/s including the prefill of {n} rows of one image ({model.dtype}, {cfg.device}, "
          f"{n_layers(model)} decoder blocks)", flush=True)
    return rows


_RESET_PEAK = """
# Reset the peak to the current RSS (Linux >= 4.0); VmHWM is then this process's own peak from here (ru_maxrss
# can inherit the peak of the process it was spawned from).
try:
    Path("/proc/self/clear_refs").write_text("5")
    reset = True
except OSError:
    reset = False
"""
"""Lines for a measuring subprocess's script (which imports Path): reset the peak RSS, ``reset`` says whether it worked."""


_EVAL_RSS = """
import importlib.util, json, re, sys, time
from pathlib import Path
import torch

def status_gb(field):
    return int(re.search(field + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1e6

def load_script(rel):
    spec = importlib.util.spec_from_file_location("bench_" + rel.replace("/", "_")[:-3], rel)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

side, n_records, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
from lineofsight.models import assistant_prefix, format_prompt, vlm_inputs
from lineofsight.prompts import CAPTION_QUESTION
from lineofsight.stand_in import real_width_llava_next
from lineofsight.toy import CLASSES, heldout_samples

model, processor = real_width_llava_next(n_layers=2, dtype="bfloat16", device="cpu")
samples = heldout_samples(n_per_class=-(-n_records // len(CLASSES)))[:n_records]
images = [s.image.resize((336, 336)) for s in samples]  # the paper's resize: 1,176 image tokens each
captions = [s.caption for s in samples]
layer = 1
work = None
if side.startswith("steer"):
    processor.tokenizer.padding_side = "left"
    tok = processor.tokenizer
    prompt = format_prompt(processor, CAPTION_QUESTION)
    n_prompt = len(tok(prompt)["input_ids"])
    texts = [prompt + assistant_prefix(processor) + c for c in captions]
    rows = [{"image": im, "text": t, "n_caption_tokens": len(tok(t)["input_ids"]) - n_prompt}
            for im, t in zip(images, texts)]
    # The inputs (image features included) are built before the measured work on both sides: what differs
    # is only what happens after the decoder (the vision tower's peak is the same on both and would hide it).
    inputs = vlm_inputs(model, processor, images, [r["text"] for r in rows])
    ids = inputs["input_ids"]
    from lineofsight.metrics import caption_tail_mask
    caption = caption_tail_mask(ids, [r["n_caption_tokens"] for r in rows])
    if side == "steer_plain":  # full logits, upcast to float32 for the NLL (the computation it replaces)
        from lineofsight.metrics import caption_nll
        def work():
            with torch.no_grad():
                caption_nll(model(**inputs, use_cache=False).logits, ids, caption)
    else:  # steer_nll: what eval_steering does: final hidden states, logits for the caption tail in chunks
        from lineofsight.metrics import caption_token_nll
        from lineofsight.models import final_hidden
        def work():
            with torch.no_grad():
                caption_token_nll(model, final_hidden(model, inputs), ids, caption).sum()
else:
    from lineofsight.harvest import Harvester
    from lineofsight.sae import SAEConfig, SparseAutoencoder
    harvester = Harvester(model, processor, [layer], types=("image", "text_in_context"))
    batch = [(list(range(n_records)), captions, images)]
    if side == "sae_plain":  # a plain harvest of the batch (pass 1: image + question + caption)
        def work():
            harvester(captions, images, list(range(n_records)))
    else:  # sae_eval: eval_sae's evaluate (the 7-way fork, the batch's rows at a time)
        sae = SparseAutoencoder(SAEConfig(d_in=4096, d_sae=32768, activation="topk", k=32), seed=0).eval()
        es = load_script("sae/evaluation/eval_sae.py")
        def work():
            es.evaluate(model, sae, harvester, batch, 0.1)
# The model (and SAE) are not counted, only what the work adds.
""" + _RESET_PEAK + """
before = status_gb("VmRSS")
start = time.perf_counter()
work()
print(json.dumps({"before": before, "peak": status_gb("VmHWM"), "reset": reset, "s": time.perf_counter() - start}))
"""
"""Run as ``python -c`` in the repository root: ``argv[1]`` names the side (steer_plain, steer_nll, sae_plain,
sae_eval), ``argv[2]`` the records per batch, ``argv[3]`` the threads; builds the real-width stand-in (bf16, CPU, 2 blocks, layer 1), then prints the RSS before the work and
its peak during it (GB) as JSON."""


def _eval_rss(cfg: Any, side: str, n_records: int, *extra: str) -> dict[str, Any]:
    """One side of an eval-memory row in a fresh process: ``{before, peak, reset, s}`` or ``{error}``."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(cfg.threads)}
    out = subprocess.run([sys.executable, "-c", _EVAL_RSS, side, str(n_records), str(cfg.threads), *extra],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["exit " + str(out.returncode)])[-1][:120]}
    return json.loads(out.stdout.splitlines()[-1])


def _eval_memory_rows(cfg: Any, n_steer: int = 8, n_sae: int = 4) -> list[Row]:
    """Working memory (peak RSS during the work minus RSS before it, GB) at the real width, bf16, CPU, one
    batch of 336 px images, each side in a fresh process: eval_steering's caption NLL (final hidden states,
    logits for the caption tail only, in chunks) against full-sequence logits upcast to float32 for the same
    ``n_steer`` records (inputs built before the measurement on both sides), and
    eval_sae's evaluate (the 7-way fork) against a plain harvest of the same ``n_sae`` records (goal <= 2x)."""
    sides = {side: _eval_rss(cfg, side, n) for side, n in (("steer_plain", n_steer), ("steer_nll", n_steer),
                                                           ("sae_plain", n_sae), ("sae_eval", n_sae))}
    rows = []
    for name, base, cand, goal, limit in (
            (f"real width: caption NLL, {n_steer} rec (RSS GB)", "steer_plain", "steer_nll", "<= 0.50", 0.5),
            (f"real width: eval_sae 7-way fork, {n_sae} rec (RSS GB)", "sae_plain", "sae_eval", "<= 2.00", 2.0)):
        b, c = sides[base], sides[cand]
        label = "full logits" if base == "steer_plain" else "plain harvest"
        failed = b.get("error") or c.get("error") or ("" if b["reset"] and c["reset"] else "cannot reset VmHWM")
        if failed:
            rows.append(Row(name, label, 0.0, 0.0, goal, False, failed=failed, unit="GB"))
            continue
        wb, wc = b["peak"] - b["before"], c["peak"] - c["before"]
        rows.append(Row(name, label, wb, wc, goal, wc / wb <= limit, unit="GB"))
    print("  eval memory (GB: RSS before the work -> peak; seconds): " + ", ".join(
        f"{k} {v['before']:.2f}->{v['peak']:.2f} {v['s']:.0f}s" if "error" not in v else f"{k} FAILED: {v['error']}"
        for k, v in sides.items()), flush=True)
    return rows


_BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0))
"""Dense bfloat16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of ``torch.cuda.get_device_name()``,
most specific first (an H100 SXM reports itself as e.g. 'NVIDIA H100 80GB HBM3')."""


def _mfu_row(cfg: Config, n_tok: int, flops: float, t_step: float | None) -> Row:
    """The ReLU step under bf16 autocast against the time the GPU's dense bf16 peak would take for its
    matmul FLOPs: ratio = 1 / MFU. Not applicable off CUDA or on a GPU not in the table."""
    import torch

    name = f"real width: SAE relu MFU, {n_tok} tok" + (", autocast" if t_step is not None else "")
    goal = "<= 2.00 (MFU>=50%)"
    if t_step is None:
        return Row(name, "bf16 peak", 0.0, 0.0, goal, False, na=f"no bf16 peak on {cfg.device}")
    gpu = torch.cuda.get_device_name(torch.device(cfg.device))
    peak = next((tflops for key, tflops in _BF16_PEAK_TFLOPS if key in gpu), None)
    if peak is None:
        print(f"  {name}: {flops / t_step / 1e12:.1f} TFLOP/s, MFU n/a (no bf16 peak known for {gpu!r})", flush=True)
        return Row(name, "bf16 peak", 0.0, 0.0, goal, False, na=f"no bf16 peak known for {gpu!r}")
    t_peak = flops / (peak * 1e12)
    mfu = t_peak / t_step
    print(f"  {name}: {n_tok / t_step:,.0f} tokens/s, {flops / t_step / 1e12:.1f} TFLOP/s, MFU {100 * mfu:.1f} % "
          f"of {peak:g} TFLOP/s ({gpu})", flush=True)
    return Row(name, f"{peak:g}T bf16 pk", t_peak, t_step, goal, mfu >= 0.5)


_CHECKPOINT_RSS = """
import json, re, sys
from pathlib import Path
import torch
import safetensors.torch
from lineofsight.io import save_tensors
from lineofsight.sae import SAEConfig, SparseAutoencoder

def status_gb(field):
    return int(re.search(field + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1e6

writer, path, threads = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
sae = SparseAutoencoder(SAEConfig(d_in=4096, d_sae=32768, activation="relu"))
opt = torch.optim.Adam(sae.parameters())
x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
sae.loss(x)["loss"].backward()
sae.optimizer_step(opt)
opt.zero_grad(set_to_none=True)  # the denominator is the state itself, not state + gradients
# What the trainer's trainer.safetensors holds: the SAE, since_fired, every Adam state tensor.
tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()}
tensors["since_fired"] = torch.zeros(32768, dtype=torch.long)
for i, state in opt.state_dict()["state"].items():
    tensors.update({f"opt.{i}.{name}": value for name, value in state.items()})
# The step's own peak (gradients, Adam's temporaries) does not count.
""" + _RESET_PEAK + """
before = status_gb("VmRSS")
if writer == "save_tensors":
    save_tensors(path, tensors)
elif writer == "save_file":
    safetensors.torch.save_file(tensors, path)
else:  # the whole file as bytes in memory, then written
    path.write_bytes(safetensors.torch.save(tensors))
state = sum(v.numel() * v.element_size() for v in tensors.values()) / 1e9
print(json.dumps({"before": before, "peak": status_gb("VmHWM"), "reset": reset, "state_gb": state,
                  "file_gb": path.stat().st_size / 1e9}))
"""
"""Run as ``python -c``: build the real-width ReLU SAE (4096 -> 32,768, float32) and its Adam, take one
step on 64 tokens, then write the tensors a trainer checkpoint holds with ``argv[1]`` to ``argv[2]``;
prints RSS before the write and the peak during it (GB) as JSON."""


def _checkpoint_rss_rows(cfg: Config) -> list[Row]:
    """Host memory of writing a real-width trainer checkpoint (SAE + Adam state, float32, on the CPU
    whatever --device: this is host RSS), each writer in a fresh process: the peak RSS during the write
    against the RSS just before it. Ours streams tensor by tensor; safetensors' ``save_file`` is the
    library's writer; ``save`` + write serialises the whole file in memory first (a second copy)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
    rows, info = [], {}
    with tempfile.TemporaryDirectory() as tmp:  # on disk (the default temp dir), not in memory
        for writer, label in (("save_tensors", "save_tensors"), ("save_file", "st.save_file"),
                              ("save", "st.save+write")):
            name = f"real width: ckpt RSS GB, {label}"
            path = Path(tmp) / f"{writer}.safetensors"
            out = subprocess.run([sys.executable, "-c", _CHECKPOINT_RSS, writer, str(path), str(cfg.threads)],
                                 cwd=root, env=env, capture_output=True, text=True, timeout=600)
            path.unlink(missing_ok=True)
            if out.returncode != 0:
                reason = (out.stderr.strip().splitlines() or ["exit " + str(out.returncode)])[-1]
                rows.append(Row(name, "before write", 0.0, 0.0, "<= 1.10", False, failed=reason[:120], unit="GB"))
                continue
            info = json.loads(out.stdout.splitlines()[-1])
            rows.append(Row(name, "before write", info["before"], info["peak"], "<= 1.10",
                            info["peak"] / info["before"] <= 1.10, unit="GB"))
    if info:
        import safetensors

        reset = "peak reset before the write" if info["reset"] else "peak NOT reset: includes the step"
        print(f"  checkpoint: {info['state_gb']:.2f} GB of state (SAE 4096->32768 + Adam, float32), "
              f"{info['file_gb']:.2f} GB file on disk; {reset}; safetensors {safetensors.__version__}", flush=True)
    return rows


_PEAK_RSS = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if proc.returncode:
    sys.exit(proc.stderr[-2000:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
"""Run as ``python -c``: run ``argv[1:]`` and print its peak RSS (kB). The wrapper is small, so the child's
ru_maxrss cannot inherit a large parent's peak (as it could when spawned from the benchmark itself)."""


def _cache_rss_row(cfg: Config) -> Row:
    """The trainer in cache mode (``--activations``) on two synthetic real-width token caches (d_model
    4096, bfloat16, layer 1), one 4x the other: its peak RSS must not grow with the cache (it reads
    batch rows from the shards; the eager reader would hold the whole layer in float32)."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import torch

    from lineofsight.cache import shard_path, summarise_token_shards, write_cache_metadata, write_token_shard
    from lineofsight.data import SkipCounter
    from lineofsight.harvest import TokenBatch

    root = Path(__file__).resolve().parent.parent
    d, per_shard, layer = 4096, 4096, 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    peaks, sizes = {}, {}
    name = "real width: cache-mode trainer peak (RSS GB)"
    with tempfile.TemporaryDirectory() as tmp:
        for n_shards in (4, 16):  # 16,384 and 65,536 tokens
            cache = Path(tmp) / f"tokens-{n_shards}"
            cache.mkdir()
            gen = torch.Generator().manual_seed(n_shards)
            for s in range(n_shards):
                n = per_shard
                tokens = TokenBatch(torch.randn(n, 1, d, generator=gen).to(torch.bfloat16),
                                    torch.randint(0, 3, (n,), generator=gen).to(torch.uint8),
                                    torch.arange(s * n, (s + 1) * n), torch.zeros(n, dtype=torch.long),
                                    torch.arange(n))
                write_token_shard(cache, s, tokens, SkipCounter().to_dict())
            summary = summarise_token_shards(cache, n_shards)
            write_cache_metadata(cache, {"layers": [layer], **summary, "n_records": n_shards * per_shard,
                                         "key": {"model": "synthetic", "n_shards": n_shards}})
            sizes[n_shards] = sum(shard_path(cache, s).stat().st_size for s in range(n_shards)) / 1e9
            cmd = [sys.executable, "-c", _PEAK_RSS, sys.executable, str(root / "sae" / "sae-trainer.py"),
                   "--activations", str(cache), "--layer", str(layer), "--expansion", "1", "--batch-size", "256",
                   "--total-tokens", "4096", "--checkpoint-every", "0", "--out", str(Path(tmp) / f"run{n_shards}")]
            out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                reason = (out.stderr.strip().splitlines() or ["exit " + str(out.returncode)])[-1]
                return Row(name, "1x cache", 0.0, 0.0, "<= 1.10", False, failed=f"trainer: {reason}"[:120], unit="GB")
            peaks[n_shards] = int(out.stdout.split()[-1]) / 1e6  # kB -> GB
            shutil.rmtree(cache)  # one cache on disk at a time
    print(f"  cache-mode trainer: caches of {4 * per_shard:,} and {16 * per_shard:,} tokens x {d} bf16, "
          f"{sizes[4]:.2f} and {sizes[16]:.2f} GB on disk; peak RSS {peaks[4]:.2f} and {peaks[16]:.2f} GB",
          flush=True)
    return Row(name, "1x cache", peaks[4], peaks[16], "<= 1.10", peaks[16] / peaks[4] <= 1.10, unit="GB")


def _browse(model_name: str, sae_dir: Any, out: Any, limit: int, top_n: int = 12) -> dict[str, Any]:
    """The feature browser (sae/evaluation/browse_features.py) in this process; its browser.json."""
    browse = _load_script("sae/evaluation/browse_features.py")
    return browse.main(browse.Config(model=model_name, sae=sae_dir, limit=limit, top_n=top_n, out=out,
                                     overwrite=True, load_threads=2))


def browser_rows(cfg: Config, model: Any, processor: Any, n_records: int = 64) -> list[Row]:
    """Feature-browser issue: the whole site (one streaming pass with the SAE, logit lens, pages, thumbnails)
    against a plain harvest of the same records, and the index and latent-page sizes of a 32,768-latent SAE."""
    import tempfile
    from pathlib import Path

    from lineofsight.data import SkipCounter, read_sharegpt4v
    from lineofsight.harvest import Harvester, record_batches
    from lineofsight.models import text_config
    from lineofsight.paths import TOY_WORLD_DIR
    from lineofsight.sae import SAEConfig, SparseAutoencoder

    if cfg.model != "toy":
        return [Row("feature browser", "harvest", 0, 0, "<= 1.5", False, na="toy only (its captioned world)")]
    layer, d_model = 2, text_config(model).hidden_size
    captions_path = Path(TOY_WORLD_DIR) / "sharegpt4v.json"
    records = read_sharegpt4v(captions_path)[:n_records]
    harvester = Harvester(model, processor, [layer])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def harvest() -> None:
            skips = SkipCounter()
            for idx, captions, images in record_batches(records, range(len(records)), captions_path.parent, 8, skips,
                                                        2, prepare=harvester.prepare):
                harvester(captions, images, idx)

        for d_sae, repeats in ((8 * d_model, 3), (32768, 1)):
            sae_dir = Path(tmp) / f"sae{d_sae}"
            SparseAutoencoder(SAEConfig(d_in=d_model, d_sae=d_sae, layer=layer, activation="topk", k=32)).save(sae_dir)
            t_base, t_cand, t_pass, result = [], [], [], {}
            for _ in range(repeats):
                t0 = time.perf_counter()
                harvest()
                t_base.append(time.perf_counter() - t0)
                result = _browse("toy", sae_dir, Path(tmp) / "site", n_records)
                t_cand.append(sum(v for k, v in result["seconds"].items() if k != "load"))
                t_pass.append(result["seconds"]["harvest_encode"])
            tb, tc = statistics.median(t_base), statistics.median(t_cand)
            name = f"browser, {n_records} rec, {d_sae} latents ({result['n_live']} live)"
            if d_sae != 32768:
                # The pass (harvest + SAE + statistics) grows with the records; the pages (logit lens, files) with
                # the live latents: about 1 ms each, which the toy's 5 ms-per-record forward cannot hide.
                tp = statistics.median(t_pass)
                rows.append(Row(f"browser pass, {n_records} rec, {d_sae} latents", "plain harvest", tb, tp, "<= 1.5",
                                tp / tb <= 1.5))
                rows.append(Row(name, "plain harvest", tb, tc, "<= 1.5", tc / tb <= 1.5))
                continue
            print(f"  browser at 32768 latents: stages {result['seconds']} s, bytes {result['bytes']}", flush=True)
            rows.append(Row(name, "plain harvest", tb, tc, "n/a (size rows)", True))
            index_mb = result["bytes"]["index_page"] / 1e6
            rows.append(Row("browser index page, 32768 latents", "3 MB budget", 3.0, index_mb, "<= 1.0",
                            index_mb <= 3.0, unit="MB"))
            page_kb = result["bytes"]["latent_page_max"] / 1e3
            rows.append(Row("browser largest latent page (toy images)", "300 KB budget", 300.0, page_kb, "<= 1.0",
                            page_kb <= 300, unit="KB"))
    return rows


GROUPS: dict[str, Callable[[Config, Any, Any], list[Row]]] = {
    "hooks": hook_rows,
    "probes": probe_rows,
    "steering": steering_rows,
    "sae": sae_rows,
    "sae_eval": sae_eval_rows,
    "mc_benchmark": mc_benchmark_rows,
    "browser": browser_rows,
    "realwidth": realwidth_rows,
}


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
        if (cfg.only and group not in cfg.only) or (not cfg.only and group == "realwidth"):
            continue
        for row in fn(cfg, model, processor):
            if row.failed or row.na:
                why = f"FAILED: {row.failed}" if row.failed else f"n/a: {row.na}"
                print(f"{row.name:<46} {row.baseline:<14} {'-':>8} {'-':>8} {'-':>6}  {row.goal:<18} {why}",
                      flush=True)
                continue
            if row.unit == "s":
                values = f"{row.t_base:8.4f} {row.t_cand:8.4f}"
            else:  # e.g. "  3.43GB": the memory rows
                values = f"{row.t_base:6.2f}{row.unit:<2} {row.t_cand:6.2f}{row.unit:<2}"
            print(f"{row.name:<46} {row.baseline:<14} {values} {row.ratio:6.2f}  {row.goal:<18} "
                  f"{'ok' if row.ok else 'BEHIND'}", flush=True)


if __name__ == "__main__":
    from lineofsight.cli import run

    run(main, Config)
