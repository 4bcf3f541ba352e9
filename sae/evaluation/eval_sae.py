"""Evaluate an SAE on held-out captioned images: sparsity, reconstruction and CE loss recovered,
split by token type.

For every record, the trainer's two passes (``lineofsight/harvest.py``): image + question +
caption, and the caption alone. Over the tokens the SAE was made for (image tokens, caption
tokens in context, caption tokens alone) it measures, overall and per token type:

* ``l0``: mean number of active latents per token;
* ``fvu``: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the evaluated tokens (streamed:
  the mean is taken over all of them);
* ``cosine``: mean cosine between a token's residual and its reconstruction;
* ``dead_frac``: latents never active on these tokens; ``dense_frac``: active on more than
  ``--dense-threshold`` of them.

CE loss recovered, ``1 - (CE_sae - CE_clean) / (CE_zero - CE_clean)``, is the next-token loss on
the caption tokens of pass 1 with the layer's residual replaced by the SAE reconstruction
(``CE_sae``) or by zeros (``CE_zero``) at the image positions, at the caption positions, or at
both (``all``). Tokens are streamed batch by batch: no more than one batch of activations is
held, the later blocks run its 7 variants ``--fork-rows`` rows at a time, the SAE reads
its tokens in chunks, logits exist only for the caption tokens' predecessors (a chunk at a time),
and the metrics' running sums stay on the device until the end. Writes ``eval.json`` and the run record ``run.json`` into ``--out`` (an earlier evaluation
there is replaced only with ``--overwrite``; see ``lineofsight/run.py``) and prints a table.

    python sae/evaluation/eval_sae.py --sae runs/sae/sae --offset 448 --out results/sae/eval   # toy
    python sae/evaluation/eval_sae.py --model llava-hf/llava-v1.6-mistral-7b-hf --dtype bfloat16 \\
        --sae /scratch/sae-l8/sae --data /data/sharegpt4v/sharegpt4v_instruct_gpt4-vision_cap100k.json \\
        --image-root /data/sharegpt4v --limit 2000 --out results/sae-l8-eval
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from lineofsight.data import HeldOutRecords
from lineofsight.metrics import NLL_CHUNK_TOKENS
from lineofsight.run import Run, lifecycle

SPLICES = ("image", "text", "all")
GROUPS = ("all", "image", "text_in_context", "text_only")


@dataclasses.dataclass
class Config(HeldOutRecords):
    """Options for SAE evaluation."""

    sae: Path = Path("runs/sae/sae")
    """SAE folder (sae.safetensors + cfg.json), or a trainer run folder holding sae/."""
    dense_threshold: float = 0.1
    """A latent active on more than this fraction of tokens counts as dense."""
    out: Path = Path("runs/sae-eval")
    """Folder for eval.json (refused when it holds an earlier evaluation, unless --overwrite)."""
    overwrite: bool = False
    """Replace the evaluation already in --out (other files there are kept)."""
    fork_rows: int | None = None
    """Rows the blocks from --layer on run at once on the 7 variants of the residual (clean + 6 splices), which
    hold 7 x the batch's rows. Default: one batch's rows (the peak stays near a plain harvest's: only the residual
    is 7x); a larger value runs bigger matrix products (faster on a GPU with memory to spare). Results do not
    depend on it."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError

        super().__post_init__()
        if self.fork_rows is not None and self.fork_rows < 1:
            raise UserError(f"--fork-rows must be positive, got {self.fork_rows}")


class Stats:
    """Streaming sums for L0, FVU, cosine and firing counts of one token group, kept on ``device``
    (float64, like the metrics' reference formulas) and read once by :meth:`result`."""

    def __init__(self, d_in: int, d_sae: int, device: Any = "cpu") -> None:
        import torch

        self.n = 0
        self.l0 = torch.zeros((), dtype=torch.long, device=device)
        self.cos, self.err, self.sq = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))
        self.sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.fires = torch.zeros(d_sae, dtype=torch.long, device=device)

    def add(self, x: Any, x_hat: Any, latents: Any) -> None:
        import torch

        if len(x) == 0:
            return
        device = self.sum.device
        x, x_hat = x.to(device).double(), x_hat.to(device).double()
        active = latents.to(device) > 0
        self.n += len(x)
        self.l0 += active.sum()
        self.cos += torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum()
        self.err += (x - x_hat).pow(2).sum()
        self.sq += x.pow(2).sum()
        self.sum += x.sum(0)
        self.fires += active.sum(0)

    def result(self, dense_threshold: float) -> dict[str, float | None]:
        if self.n == 0:
            return {"n_tokens": 0, "l0": None, "fvu": None, "cosine": None, "dead_frac": None, "dense_frac": None}
        sq, err = float(self.sq), float(self.err)
        total = sq - float(self.sum.pow(2).sum()) / self.n  # sum ||x - mean||^2
        return {
            "n_tokens": self.n,
            "l0": float(self.l0) / self.n,
            "fvu": err / total if total > 0 else float("nan"),
            "cosine": float(self.cos) / self.n,
            "dead_frac": float((self.fires == 0).float().mean()),
            "dense_frac": float((self.fires > dense_threshold * self.n).float().mean()),
        }


def ce_recovered(clean: float, spliced: float, zero: float) -> float:
    """``1 - (CE_sae - CE_clean) / (CE_zero - CE_clean)``: 1 for a perfect SAE, 0 for zero ablation."""
    return 1.0 - (spliced - clean) / (zero - clean) if zero != clean else float("nan")


RUNS = ("clean", *(f"{kind}/{s}" for s in SPLICES for kind in ("zero", "sae")))
"""The forward passes per batch: the clean one, then zeros and the SAE's reconstruction spliced in per SPLICES."""
SAE_CHUNK_LATENTS = 2**24
"""Latent values (tokens x d_sae) the SAE computes at once: 512 tokens at d_sae 32,768 (64 MB float32)."""


def evaluate(model: Any, sae: Any, harvester: Any, batches: Any, dense_threshold: float, fork_rows: int | None = None,
             nll_chunk_tokens: int = NLL_CHUNK_TOKENS, sae_chunk_latents: int = SAE_CHUNK_LATENTS) -> dict[str, Any]:
    """Stream ``batches`` of ``(indices, captions, images)`` and return the metrics dict.

    Per batch, the clean run and all six splices fork at the SAE's layer into seven copies of the
    residual (clean; zeros and the SAE's reconstruction at the image, caption and all positions)
    that the later blocks run as one batch (:func:`lineofsight.hooks.fork_batch`), ``fork_rows`` rows at a
    time (default: the batch's rows), so what runs before the layer runs once and the peak stays near a plain
    forward's. The SAE encodes the kept tokens ``sae_chunk_latents // d_sae`` at a time (all
    at once for BatchTopK without a threshold, whose latents depend on the whole batch) and only
    the caption tokens' predecessors get logits (:func:`lineofsight.metrics.caption_token_nll`). Results do not
    depend on the chunk sizes.
    """
    import torch

    from lineofsight.harvest import TOKEN_TYPES
    from lineofsight.hooks import fork_batch
    from lineofsight.metrics import caption_token_nll
    from lineofsight.models import final_hidden, final_norm_name, layer_names

    layer = harvester.layers[0]
    # blocks layer.. and the final norm (whose float32 arithmetic on 7x the rows would otherwise set the peak)
    fork_at = [*layer_names(model)[layer:], final_norm_name(model)]
    stats = {g: Stats(sae.cfg.d_in, sae.cfg.d_sae, harvester.device) for g in GROUPS}
    nll = dict.fromkeys(RUNS, 0.0)
    n_caption = 0
    image_code, text_code = TOKEN_TYPES.index("image"), TOKEN_TYPES.index("text_in_context")
    text_only = "text_only" in harvester.types
    batchwise = sae.cfg.activation == "batchtopk" and (sae.training or sae.cfg.threshold is None)
    sae_chunk = None if batchwise else max(1, sae_chunk_latents // sae.cfg.d_sae)
    for idx, captions, images in batches:
        if not idx:
            continue
        inputs, keep, kind = harvester.prepare_with_image(captions, images)
        ids = inputs["input_ids"]
        caption = kind == text_code
        masks = {"image": kind == image_code, "text": caption, "all": (kind == image_code) | caption}
        recon: list[Any] = []  # the SAE's reconstruction [B, T, D], made by the first pass, reused by the others

        def variants(x: Any, runs: tuple[str, ...], keep: Any = keep, kind: Any = kind,
                     masks: dict[str, Any] = masks, recon: list[Any] = recon) -> list[Any]:
            if not recon:
                recon.append(_reconstruct(sae, x, keep, kind, stats, sae_chunk))
            out = []
            for run in runs:
                if run == "clean":
                    out.append(x)
                else:
                    what, splice = run.split("/")
                    spliced = torch.zeros_like(x) if what == "zero" else recon[0]
                    out.append(torch.where(masks[splice][..., None], spliced, x))
            return out

        rows = fork_rows or ids.shape[0]
        with torch.no_grad(), fork_batch(model, fork_at, lambda x: variants(x, RUNS), rows=rows):
            hidden = final_hidden(model, inputs)  # [len(RUNS) * B, T, D]
        for run, hidden_BTD in zip(RUNS, hidden.unflatten(0, (len(RUNS), ids.shape[0])), strict=True):
            # One float32 sum per run and batch in row-major order, as caption_nll over full logits.
            nll[run] += float(caption_token_nll(model, hidden_BTD, ids, caption, nll_chunk_tokens).sum())
        del hidden
        n_caption += int(caption.sum())  # the same caption tokens in every run
        if text_only:
            got = harvester.caption_only(captions, idx)
            xt = got.acts[:, 0].to(next(sae.parameters()).device)
            with torch.no_grad():
                xt_hat, lat_t = sae(xt)
            stats["text_only"].add(xt, xt_hat, lat_t)
            stats["all"].add(xt, xt_hat, lat_t)
    if n_caption == 0 and stats["all"].n == 0:
        from lineofsight.cli import UserError

        raise UserError("no tokens to evaluate (empty evaluation set, or every image was unreadable)")
    per_group = {g: stats[g].result(dense_threshold) for g in GROUPS}
    ce = {k: v / max(n_caption, 1) for k, v in nll.items()}
    out: dict[str, Any] = {
        metric: {g: per_group[g][metric] for g in GROUPS}
        for metric in ("l0", "fvu", "cosine", "dead_frac", "dense_frac", "n_tokens")
    }
    out["ce_recovered"] = {s: ce_recovered(ce["clean"], ce[f"sae/{s}"], ce[f"zero/{s}"]) for s in SPLICES}
    out["ce"] = ce
    out["n_caption_tokens"] = n_caption
    return out


def _reconstruct(sae: Any, x_BTD: Any, keep_BT: Any, kind_BT: Any, stats: dict[str, Stats], chunk: int | None) -> Any:
    """The SAE's reconstruction ``[B, T, D]`` of the kept positions of ``x_BTD`` (zeros elsewhere), in
    ``x``'s dtype, ``chunk`` tokens at a time (None: all at once); adds each chunk to ``stats``."""
    import torch

    from lineofsight.harvest import TOKEN_TYPES

    image_code, text_code = TOKEN_TYPES.index("image"), TOKEN_TYPES.index("text_in_context")
    x_ND, codes_N = x_BTD[keep_BT], kind_BT[keep_BT]
    x_hat_ND = torch.empty_like(x_ND)
    step = chunk or max(len(x_ND), 1)
    for lo in range(0, len(x_ND), step):
        x, codes = x_ND[lo : lo + step], codes_N[lo : lo + step]
        x_hat, latents = sae(x)
        x_hat_ND[lo : lo + step] = x_hat.to(x_ND.dtype)
        for g, sel in (("image", codes == image_code), ("text_in_context", codes == text_code)):
            stats[g].add(x[sel], x_hat[sel], latents[sel])
            stats["all"].add(x[sel], x_hat[sel], latents[sel])
        del x_hat, latents
    recon = torch.zeros_like(x_BTD)
    recon[keep_BT] = x_hat_ND
    return recon


def print_table(metrics: dict[str, Any]) -> None:
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    print(f"{'tokens':<16}" + "".join(f"{m:>11}" for m in ("n", "L0", "FVU", "cosine", "dead", "dense")))
    for g in GROUPS:
        row = [str(metrics["n_tokens"][g])] + [fmt(metrics[m][g]) for m in ("l0", "fvu", "cosine", "dead_frac",
                                                                             "dense_frac")]
        print(f"{g:<16}" + "".join(f"{v:>11}" for v in row))
    print("CE loss recovered: " + "  ".join(f"{s} {metrics['ce_recovered'][s]:.3f}" for s in SPLICES)
          + f"  (clean CE {metrics['ce']['clean']:.3f} nats/token)")


@lifecycle("sae/evaluation/eval_sae.py", outputs=("eval.json",))
def main(cfg: Config, run: Run) -> dict[str, Any]:
    from lineofsight.data import SkipCounter, check_resize_match
    from lineofsight.harvest import Harvester, record_batches
    from lineofsight.models import check_model
    from lineofsight.sae import check_sae_fits, load_sae
    from lineofsight.toy import ensure_toy_world

    start = time.perf_counter()
    run.setup(seed=0, device=cfg.device)
    ensure_toy_world(cfg.data)
    records = cfg.read_records()
    sae = load_sae(cfg.sae, run.device)
    check_resize_match(cfg.resize, sae.cfg.resize, f"the SAE {cfg.sae}", cfg.allow_resize_mismatch)
    model_source = check_model(cfg.model)
    model, processor = run.load_model(cfg.model, cfg.dtype)
    layer = check_sae_fits(sae, model, model_source, None)
    types = sae.cfg.token_types or ("image", "text_in_context", "text_only")
    harvester = Harvester(model, processor, [layer], max_caption_tokens=cfg.max_caption_tokens,
                          types=tuple(set(types) | {"text_in_context"}))
    harvester.check_boundary(records[0].caption)
    run.open(cfg.out, overwrite=cfg.overwrite)

    skips = SkipCounter()
    batches = record_batches(records, range(len(records)), cfg.root, cfg.batch_size, skips, cfg.load_threads,
                             resize=cfg.resize, prepare=harvester.prepare)
    metrics = evaluate(model, sae, harvester, _checked(run, batches), cfg.dense_threshold, cfg.fork_rows)
    metrics.update({"layer": layer, "sae": str(cfg.sae), "model": model_source, "n_records": len(records),
                    "offset": cfg.offset, "skipped": skips.to_dict(), "wall_s": round(time.perf_counter() - start, 1)})
    print_table(metrics)
    return run.finish(f"wrote {run.out / 'eval.json'} ({len(records)} records, layer {layer}); {skips.summary()}",
                      metrics, "eval.json")


def _checked(run: Run, batches: Any) -> Any:
    """``batches``, with :meth:`Run.check_alive` before each."""
    for batch in batches:
        run.check_alive()
        yield batch


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
