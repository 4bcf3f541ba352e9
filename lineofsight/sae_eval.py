"""SAE evaluation on held-out captioned images, for every script that evaluates an SAE (``sae/evaluation/eval_sae.py``,
``sae/import_sae.py --scale auto``): sparsity, reconstruction and CE loss recovered, split by token type.

Over the tokens an SAE was made for (image tokens, caption tokens in context, caption tokens alone) :func:`evaluate`
measures, per token group (:data:`GROUPS`), L0, FVU (``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``, streamed),
mean cosine and the dead / dense latent fractions (:class:`Stats`), and CE loss recovered (:func:`ce_recovered`) with
the SAE's reconstruction or zeros spliced in at the image, caption or all positions (:data:`SPLICES`).
"""

from __future__ import annotations

from typing import Any

from lineofsight.metrics import NLL_CHUNK_TOKENS

__all__ = ["GROUPS", "RUNS", "SPLICES", "Stats", "ce_recovered", "evaluate"]

SPLICES = ("image", "text", "all")
"""Where the reconstruction (or zeros) replaces the residual: the image positions, the caption positions, both."""
GROUPS = ("all", "image", "text_in_context", "text_only")
"""The token groups the sparsity and reconstruction metrics are reported for."""


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


def evaluate(model: Any, sae: Any, harvester: Any, batches: Any, dense_threshold: float, fork_rows: int | None = None,
             nll_chunk_tokens: int = NLL_CHUNK_TOKENS, sae_chunk_latents: int | None = None) -> dict[str, Any]:
    """Stream ``batches`` of ``(indices, captions, images)`` and return the metrics dict.

    Per batch, the clean run and all six splices fork at the SAE's layer into seven copies of the
    residual (clean; zeros and the SAE's reconstruction at the image, caption and all positions)
    that the later blocks run as one batch (:func:`lineofsight.hooks.fork_batch`), ``fork_rows`` rows at a
    time (default: the batch's rows), so what runs before the layer runs once and the peak stays near a plain
    forward's. The SAE encodes the kept tokens ``sae_chunk_latents // d_sae`` at a time (default
    :data:`lineofsight.sae.CHUNK_LATENTS`; all
    at once for BatchTopK without a threshold, whose latents depend on the whole batch) and only
    the caption tokens' predecessors get logits (:func:`lineofsight.metrics.caption_token_nll`). Results do not
    depend on the chunk sizes.
    """
    import torch

    from lineofsight.harvest import TOKEN_TYPES
    from lineofsight.hooks import fork_batch
    from lineofsight.metrics import caption_token_nll
    from lineofsight.models import final_hidden, final_norm_name, layer_names
    from lineofsight.sae import CHUNK_LATENTS

    layer = harvester.layers[0]
    # blocks layer.. and the final norm (whose float32 arithmetic on 7x the rows would otherwise set the peak)
    fork_at = [*layer_names(model)[layer:], final_norm_name(model)]
    stats = {g: Stats(sae.cfg.d_in, sae.cfg.d_sae, harvester.device) for g in GROUPS}
    nll = dict.fromkeys(RUNS, 0.0)
    n_caption = 0
    image_code, text_code = TOKEN_TYPES.index("image"), TOKEN_TYPES.index("text_in_context")
    text_only = "text_only" in harvester.types
    batchwise = sae.cfg.activation == "batchtopk" and (sae.training or sae.cfg.threshold is None)
    sae_chunk = None if batchwise else max(1, (sae_chunk_latents or CHUNK_LATENTS) // sae.cfg.d_sae)
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
