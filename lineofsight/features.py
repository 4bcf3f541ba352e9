"""What an SAE's latents do over harvested tokens, streamed: the statistics behind the modality analysis and
the feature browser.

**Modality score** (the paper's image/text split of latents): ``mass_image / (mass_image + mass_text)``, the
share of a latent's activation mass on image tokens (text = caption tokens in context and alone); 1 fires only
on image tokens, 0 only on text. A live latent is image-only at ``>= IMAGE_ONLY``, text-only at ``<= TEXT_ONLY``,
shared in between.

:class:`FeatureStats` takes batches of harvested tokens (:class:`lineofsight.harvest.TokenBatch`) and their
latents and keeps, per latent: activation mass, firing counts and an activation histogram per token type, the
maximum, and two top-n tables: the ``top_n`` **images** (records) with the highest activation on any of their
image tokens, and the ``top_n`` **text sequences** (a record's caption in context or alone) with the highest
activation on any of their tokens, each kept with the latent's activation at every token of that image or
sequence (sparse: only where it fires), so a page can draw a per-patch heatmap or shade a caption. Memory is
``O(d_sae x top_n)`` entries however many records pass; no activation is kept for anything not in a top-n.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["CATEGORIES", "IMAGE_ONLY", "TEXT_ONLY", "FeatureStats", "TopUnits", "categorise", "category_masks",
           "modality_scores"]

CATEGORIES = ("image_only", "shared", "text_only")
IMAGE_ONLY = 0.9
"""Default: a live latent with modality score >= this is image-only."""
TEXT_ONLY = 0.1
"""Default: a live latent with modality score <= this is text-only."""

CHUNK_ELEMENTS = 2**24
"""Dense latents materialised at a time while encoding (tokens per chunk = this // d_sae)."""

# torch is imported inside the functions: scripts take the defaults above at import time, and --help stays instant.


def modality_scores(mass_image: Any, mass_text: Any) -> Any:
    """Share of a latent's activation (or firing) mass on image tokens; NaN for a latent with none."""
    import torch

    total = mass_image + mass_text
    return torch.where(total > 0, mass_image / total.clamp(min=1e-30), torch.full_like(total, float("nan")))


def category_masks(scores: Any, image_only: float, text_only: float) -> dict[str, Any]:
    """Boolean masks over latents: image-only (score >= ``image_only``), text-only (score <=
    ``text_only``), shared (in between, both ends excluded). A NaN score (a latent that never
    fires) is in none of them."""
    return {"image_only": scores >= image_only, "shared": (scores > text_only) & (scores < image_only),
            "text_only": scores <= text_only}


def categorise(scores: Any, image_only: float, text_only: float) -> dict[str, Any]:
    """Shares of the live latents (score not NaN) that are image-only, shared and text-only, their
    ``counts`` and ``n_live``."""
    import torch

    n = int((~torch.isnan(scores)).sum())
    counts = {cat: int(mask.sum()) for cat, mask in category_masks(scores, image_only, text_only).items()}
    return {**{cat: counts[cat] / max(n, 1) for cat in CATEGORIES}, "n_live": n, "counts": counts}


@dataclasses.dataclass
class Unit:
    """One kept image or text sequence of a latent: its max activation ``value``, its ``key`` (image: the
    record's index; text: ``2 * record + (0 in context | 1 alone)``), the ``peak`` token (rank among the unit's
    tokens) and its token id, and the latent's activation at every token where it fires (``positions``
    ascending, ``values``)."""

    value: float
    key: int
    peak: int
    peak_id: int
    positions: np.ndarray
    values: np.ndarray


class TopUnits:
    """The ``n`` units (images or text sequences) with the highest max activation, per latent.

    Values are kept sorted (descending) in ``val [d_sae, n]`` (``-inf`` = empty slot); a unit that ties the
    n-th value does not displace it (the earlier unit stays). ``payload[(latent, key)]`` holds the kept
    unit's per-token activations as ``(positions int32 bytes, values float16 bytes)``.
    """

    def __init__(self, d_sae: int, n: int) -> None:
        import torch

        self.n = n
        self.val = torch.full((d_sae, n), float("-inf"))
        self.key = torch.full((d_sae, n), -1, dtype=torch.long)
        self.peak = torch.full((d_sae, n), -1, dtype=torch.long)
        self.peak_id = torch.full((d_sae, n), -1, dtype=torch.long)
        self.payload: dict[tuple[int, int], tuple[bytes, bytes]] = {}

    def offer(self, lat: torch.Tensor, key: torch.Tensor, val: torch.Tensor, peak: torch.Tensor,
              peak_id: torch.Tensor, payload: Any) -> None:
        """Offer candidate units ``(lat, key)`` (pairs distinct, keys new) with their max ``val``; ``payload(i)``
        gives candidate ``i``'s ``(positions, values)`` when it is kept."""
        import torch

        better = val > self.val[lat, -1]
        if not bool(better.any()):
            return
        cand = better.nonzero().squeeze(1)
        lat_c = lat[cand]
        rows, inv = torch.unique(lat_c, return_inverse=True)
        order = torch.argsort(inv, stable=True)
        counts = torch.bincount(inv, minlength=len(rows))
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order)) - starts[inv[order]]
        width = int(counts.max())
        ref = torch.full((len(rows), width), -1, dtype=torch.long)
        ref[inv[order], rank] = cand[order]
        has = ref >= 0
        safe = ref.clamp(min=0)

        def stack(old: torch.Tensor, new: torch.Tensor, empty: float) -> torch.Tensor:
            return torch.cat([old[rows], torch.where(has, new[safe], torch.full_like(safe, empty, dtype=old.dtype))], 1)

        all_val = stack(self.val, val, float("-inf"))
        # A stable sort, not topk (which breaks ties arbitrarily): old columns come first, then candidates in key
        # order, so a tie keeps the unit seen first.
        ranked, by_rank = torch.sort(all_val, dim=1, descending=True, stable=True)
        top_values, top_indices = ranked[:, : self.n], by_rank[:, : self.n]
        kept = torch.zeros_like(all_val, dtype=torch.bool).scatter_(1, top_indices, True)
        evicted = ~kept[:, : self.n] & (self.key[rows] >= 0)
        for r, c in evicted.nonzero().tolist():
            self.payload.pop((int(rows[r]), int(self.key[rows[r], c])), None)
        for r, c in (kept[:, self.n :] & has).nonzero().tolist():
            i = int(ref[r, c])
            positions, values = payload(i)
            self.payload[(int(rows[r]), int(key[i]))] = (positions.astype(np.int32).tobytes(),
                                                        values.astype(np.float16).tobytes())
        for name, new, empty in (("key", key, -1), ("peak", peak, -1), ("peak_id", peak_id, -1)):
            table = getattr(self, name)
            table[rows] = stack(table, new, empty).gather(1, top_indices)
        self.val[rows] = top_values

    def units(self, latent: int) -> list[Unit]:
        """The kept units of ``latent``, highest first."""
        out = []
        for value, key, peak, peak_id in zip(self.val[latent].tolist(), self.key[latent].tolist(),
                                             self.peak[latent].tolist(), self.peak_id[latent].tolist(), strict=True):
            if key < 0:
                continue
            positions, values = self.payload[(latent, key)]
            out.append(Unit(value, key, peak, peak_id, np.frombuffer(positions, dtype=np.int32),
                            np.frombuffer(values, dtype=np.float16).astype(np.float32)))
        return out


def histogram_edges(n_bins: int = 36, low: float = 1e-3, high: float = 1e3) -> torch.Tensor:
    """Log-spaced activation bin edges ``[n_bins + 1]``; activations below ``low`` count in the first bin,
    above ``high`` in the last."""
    import torch

    return torch.logspace(float(np.log10(low)), float(np.log10(high)), n_bins + 1)


class FeatureStats:
    """Streamed per-latent statistics of one SAE (see the module docstring). Token types are the harvester's
    codes: 0 image, 1 caption in context, 2 caption alone."""

    def __init__(self, d_sae: int, top_n: int, edges: torch.Tensor | None = None) -> None:
        import torch

        self.d_sae = d_sae
        self.edges = histogram_edges() if edges is None else edges
        n_bins = len(self.edges) - 1
        self.mass = torch.zeros(3, d_sae, dtype=torch.float64)
        self.fires = torch.zeros(3, d_sae, dtype=torch.long)
        self.tokens = torch.zeros(3, dtype=torch.long)
        self.max = torch.zeros(d_sae)
        self.hist = torch.zeros(3, d_sae, n_bins, dtype=torch.int32)
        self.images = TopUnits(d_sae, top_n)
        self.texts = TopUnits(d_sae, top_n)

    def add(self, sae: Any, x_ND: torch.Tensor, batch: Any) -> None:
        """Encode the residuals ``x_ND`` of ``batch`` (a TokenBatch: token types, records, ranks, ids) with
        ``sae``, a chunk of tokens at a time, and add them."""
        import torch

        n = x_ND.shape[0]
        step = max(1, CHUNK_ELEMENTS // self.d_sae)
        parts = []
        for lo in range(0, n, step):
            with torch.no_grad():
                z = sae.encode(x_ND[lo : lo + step]).float().cpu()
            tok, lat = (z > 0).nonzero(as_tuple=True)
            parts.append((tok + lo, lat, z[tok, lat]))
        tok = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
        lat = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
        val = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0)
        self.add_sparse(tok, lat, val, batch)

    def add_sparse(self, tok: torch.Tensor, lat: torch.Tensor, val: torch.Tensor, batch: Any) -> None:
        """Add one batch given as its nonzero latents: token ``tok`` (row of ``batch``) has latent ``lat`` at
        ``val`` > 0."""
        import torch

        types = batch.token_type.long()
        self.tokens += torch.bincount(types, minlength=3)
        if tok.numel() == 0:
            return
        d = self.d_sae
        t = types[tok]
        flat = t * d + lat
        self.mass.view(-1).index_add_(0, flat, val.double())
        self.fires.view(-1).index_add_(0, flat, torch.ones_like(flat))
        self.max.scatter_reduce_(0, lat, val, "amax")
        n_bins = self.hist.shape[2]
        b = (torch.bucketize(val, self.edges[1:-1].to(val.dtype), right=True)).clamp(0, n_bins - 1)
        self.hist.view(-1).index_add_(0, flat * n_bins + b, torch.ones_like(b, dtype=torch.int32))
        sample, rank, token_id = batch.sample.long(), batch.type_index.long(), batch.token_id.long()
        unit_key = torch.where(types == 0, sample, 2 * sample + types - 1)
        for table, sel in ((self.images, t == 0), (self.texts, t != 0)):
            if bool(sel.any()):
                self._offer(table, tok[sel], lat[sel], val[sel], unit_key, rank, token_id)

    def _offer(self, table: TopUnits, tok: torch.Tensor, lat: torch.Tensor, val: torch.Tensor,
               unit_key: torch.Tensor, rank: torch.Tensor, token_id: torch.Tensor) -> None:
        import torch

        d = self.d_sae
        keys, unit = torch.unique(unit_key[tok], return_inverse=True)
        pair = unit * d + lat
        pairs, inv = torch.unique(pair, return_inverse=True)
        best = torch.zeros(len(pairs)).scatter_reduce_(0, inv, val, "amax", include_self=False)
        rows = torch.arange(len(tok))
        at_max = val == best[inv]
        peak_row = torch.full((len(pairs),), len(tok), dtype=torch.long)
        peak_row.scatter_reduce_(0, inv[at_max], rows[at_max], "amin")
        order = torch.argsort(inv, stable=True)
        counts = torch.bincount(inv, minlength=len(pairs))
        starts = (torch.cumsum(counts, 0) - counts).tolist()
        counts_l = counts.tolist()
        positions_all = rank[tok[order]].numpy()
        values_all = val[order].numpy()

        def payload(i: int) -> tuple[np.ndarray, np.ndarray]:
            lo, hi = starts[i], starts[i] + counts_l[i]
            pos, vals = positions_all[lo:hi], values_all[lo:hi]
            sort = np.argsort(pos, kind="stable")
            return pos[sort], vals[sort]

        peak_tok = tok[peak_row]
        table.offer(pairs % d, keys[pairs // d], best, rank[peak_tok], token_id[peak_tok], payload)

    # ---- summaries ------------------------------------------------------------------------------

    def live(self) -> torch.Tensor:
        """Bool ``[d_sae]``: latents that fired on at least one token."""
        return self.fires.sum(0) > 0

    def frequency(self) -> dict[str, torch.Tensor]:
        """Firing frequency per latent: ``all`` (share of all tokens) and per token type."""
        total = self.fires.sum(0).double() / max(int(self.tokens.sum()), 1)
        per_type = self.fires.double() / self.tokens.clamp(min=1)[:, None].double()
        return {"all": total, "image": per_type[0], "text_in_context": per_type[1], "text_only": per_type[2]}

    def mean_when_firing(self) -> torch.Tensor:
        return self.mass.sum(0) / self.fires.sum(0).clamp(min=1).double()

    def modality(self) -> torch.Tensor:
        """The mass-based modality score per latent (NaN for dead latents)."""
        return modality_scores(self.mass[0], self.mass[1] + self.mass[2])
