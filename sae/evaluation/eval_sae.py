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
held. Writes ``eval.json`` and the run record ``run.json`` into ``--out`` (an earlier evaluation
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


class Stats:
    """Streaming sums for L0, FVU, cosine and firing counts of one token group."""

    def __init__(self, d_in: int, d_sae: int) -> None:
        import torch

        self.n = 0
        self.l0 = 0.0
        self.cos = 0.0
        self.err = 0.0
        self.sq = 0.0
        self.sum = torch.zeros(d_in, dtype=torch.float64)
        self.fires = torch.zeros(d_sae, dtype=torch.long)

    def add(self, x: Any, x_hat: Any, latents: Any) -> None:
        import torch

        if len(x) == 0:
            return
        x, x_hat = x.double().cpu(), x_hat.double().cpu()
        active = (latents > 0).cpu()
        self.n += len(x)
        self.l0 += float(active.sum())
        self.cos += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        self.err += float((x - x_hat).pow(2).sum())
        self.sq += float(x.pow(2).sum())
        self.sum += x.sum(0)
        self.fires += active.sum(0)

    def result(self, dense_threshold: float) -> dict[str, float | None]:
        if self.n == 0:
            return {"n_tokens": 0, "l0": None, "fvu": None, "cosine": None, "dead_frac": None, "dense_frac": None}
        total = self.sq - float(self.sum.pow(2).sum()) / self.n  # sum ||x - mean||^2
        return {
            "n_tokens": self.n,
            "l0": self.l0 / self.n,
            "fvu": self.err / total if total > 0 else float("nan"),
            "cosine": self.cos / self.n,
            "dead_frac": float((self.fires == 0).float().mean()),
            "dense_frac": float((self.fires > dense_threshold * self.n).float().mean()),
        }


def ce_recovered(clean: float, spliced: float, zero: float) -> float:
    """``1 - (CE_sae - CE_clean) / (CE_zero - CE_clean)``: 1 for a perfect SAE, 0 for zero ablation."""
    return 1.0 - (spliced - clean) / (zero - clean) if zero != clean else float("nan")


def evaluate(model: Any, sae: Any, harvester: Any, batches: Any, dense_threshold: float) -> dict[str, Any]:
    """Stream ``batches`` of ``(indices, captions, images)`` and return the metrics dict.

    Per batch, one forward pass serves the clean run and all six splices: it forks at the SAE's
    layer into seven copies of the residual (clean; zeros and the SAE's reconstruction at the
    image, caption and all positions) that the later blocks run as one batch
    (:func:`lineofsight.hooks.fork_batch`), and only the caption tail gets logits.
    """
    import torch

    from lineofsight.harvest import TOKEN_TYPES
    from lineofsight.hooks import fork_batch
    from lineofsight.metrics import caption_nll
    from lineofsight.models import layer_names

    layer = harvester.layers[0]
    fork_at = layer_names(model)[layer:] or [harvester.sites[0]]  # blocks layer.., or the final norm
    stats = {g: Stats(sae.cfg.d_in, sae.cfg.d_sae) for g in GROUPS}
    runs = ["clean", *(f"{kind}/{s}" for s in SPLICES for kind in ("zero", "sae"))]  # the order of variants()
    nll = {"clean": 0.0, **{f"{kind}/{s}": 0.0 for kind in ("zero", "sae") for s in SPLICES}}
    n_caption = 0
    image_code, text_code = TOKEN_TYPES.index("image"), TOKEN_TYPES.index("text_in_context")
    text_only = "text_only" in harvester.types
    for idx, captions, images in batches:
        if not idx:
            continue
        inputs, keep, kind = harvester.prepare_with_image(captions, images)
        ids = inputs["input_ids"]
        caption = kind == text_code
        masks = {"image": kind == image_code, "text": caption, "all": (kind == image_code) | caption}
        encoded: dict[str, Any] = {}

        def variants(x: Any, keep: Any = keep, masks: dict[str, Any] = masks, encoded: dict = encoded) -> list[Any]:
            x_kept = x[keep]
            x_hat, latents = sae(x_kept)
            encoded.update(x_kept=x_kept, x_hat=x_hat, latents=latents)
            recon = torch.zeros_like(x)
            recon[keep] = x_hat.to(x.dtype)
            out = [x]
            for splice in SPLICES:
                where = masks[splice][..., None]
                out += [torch.where(where, torch.zeros_like(x), x), torch.where(where, recon, x)]
            return out

        # Logits from the position before the first caption token on: what the NLL needs.
        first_caption = int(caption.int().argmax(1)[caption.any(1)].min()) if caption.any() else ids.shape[1] - 1
        n_logits = ids.shape[1] - max(first_caption - 1, 0)
        with torch.no_grad(), fork_batch(model, fork_at, variants):
            logits = model(**inputs, use_cache=False, logits_to_keep=n_logits).logits
        for run, logits_BTV in zip(runs, logits.unflatten(0, (len(runs), ids.shape[0]))):
            value, count = caption_nll(logits_BTV, ids, caption)
            nll[run] += value
        n_caption += count  # the same caption tokens in every run
        codes = kind[keep]
        for g, sel in (("image", codes == image_code), ("text_in_context", codes == text_code)):
            x_kept, x_hat, latents = (encoded[key][sel] for key in ("x_kept", "x_hat", "latents"))
            stats[g].add(x_kept, x_hat, latents)
            stats["all"].add(x_kept, x_hat, latents)
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
    from lineofsight.data import SkipCounter
    from lineofsight.harvest import Harvester, record_batches
    from lineofsight.models import check_model
    from lineofsight.sae import check_sae_fits, load_sae
    from lineofsight.toy import ensure_toy_world

    start = time.perf_counter()
    run.setup(seed=0, device=cfg.device)
    ensure_toy_world(cfg.data)
    records = cfg.read_records()
    sae = load_sae(cfg.sae, run.device)
    model_source = check_model(cfg.model)
    model, processor = run.load_model(cfg.model, cfg.dtype)
    layer = check_sae_fits(sae, model, model_source, None)
    types = sae.cfg.token_types or ("image", "text_in_context", "text_only")
    harvester = Harvester(model, processor, [layer], max_caption_tokens=cfg.max_caption_tokens,
                          types=tuple(set(types) | {"text_in_context"}))
    harvester.check_boundary(records[0].caption)
    run.open(cfg.out, overwrite=cfg.overwrite)

    skips = SkipCounter()
    batches = record_batches(records, range(len(records)), cfg.root, cfg.batch_size, skips)
    metrics = evaluate(model, sae, harvester, _checked(run, batches), cfg.dense_threshold)
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
