"""The project's one sparse autoencoder: ReLU (April-update objective), TopK and BatchTopK.

    latents = act((s * x - b_dec) @ W_enc + b_enc)          encode
    x_hat   = (latents @ W_dec + b_dec) / s                   decode

``s`` is the activation scale stored in the config (``act_scale``): it maps raw residuals to mean
norm ``sqrt(d_in)``, so the paper's hyperparameters (lambda 5, lr 5e-5) mean the same at every
layer and every model. Callers always pass raw residuals and get raw reconstructions back; the
scale never appears outside this module. Losses are computed in the scaled space.

Activations:

* ``relu``: the April-update objective ``||x - x_hat||^2 + lambda * sum_j f_j ||W_dec_j||``
  (the gradient flows through the decoder norms; decoder rows are free).
* ``topk``: the k largest pre-activations per token (after a ReLU); decoder rows kept at unit
  norm by the trainer (:meth:`SparseAutoencoder.normalize_decoder`). Decoding can use the sparse
  path (``embedding_bag`` over the k active rows) which equals the dense product. In training the
  encoder's backward also runs over the active (token, latent) pairs only (``_EncoderAt``).
* ``batchtopk``: the ``k * n_tokens`` largest pre-activations over the whole batch during
  training; at inference a single threshold (estimated during training and stored in the config)
  replaces the batch coupling, so a token's code does not depend on its batch.

TopK and BatchTopK train with the AuxK loss on dead latents (a latent is dead after
``dead_after_tokens`` tokens without firing; the trainer keeps that count).

A saved SAE is a folder: ``sae.safetensors`` + ``cfg.json``. :meth:`SparseAutoencoder.export_saelens`
writes the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``) with the scale folded into
the weights, for SAELens / SAEBench / Neuronpedia tooling.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lineofsight.cli import UserError
from lineofsight.io import save_tensors, write_json

__all__ = ["ACTIVATIONS", "CHUNK_LATENTS", "SAEConfig", "SAEError", "SparseAutoencoder", "check_sae_fits", "fvu", "load_sae", "load_saes",
           "run_saes"]

ACTIVATIONS = ("relu", "topk", "batchtopk")
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "cfg.json"


CHUNK_LATENTS = 2**24
"""Latent values (tokens x d_sae) an SAE computes at once when it reads many tokens: 512 tokens at d_sae 32,768
(64 MB float32)."""


class SAEError(ValueError):
    """An SAE folder or input that does not fit (missing files, wrong width)."""


@dataclasses.dataclass
class SAEConfig:
    d_in: int
    """width of the residual stream it reads"""
    d_sae: int
    """number of latents"""
    activation: str = "relu"
    """relu (April update), topk or batchtopk"""
    k: int = 32
    """active latents per token for topk / batchtopk"""
    l1_coefficient: float = 5.0
    """lambda of the April-update sparsity penalty (relu)"""
    aux_k: int = 256
    """dead latents used by the AuxK loss (topk / batchtopk)"""
    aux_coefficient: float = 1 / 32
    """weight of the AuxK loss"""
    dead_after_tokens: int = 1_000_000
    """a latent that has not fired for this many tokens counts as dead"""
    act_scale: float = 1.0
    """raw residuals are multiplied by this inside encode (mean norm -> sqrt(d_in)); set from data"""
    threshold: float | None = None
    """batchtopk: inference threshold on pre-activations (estimated during training)"""
    decoder_init_norm: float = 0.1
    """norm of the decoder rows at init (the paper: 0.1 for relu); topk/batchtopk use unit rows"""
    model: str = ""
    """provenance: the model the SAE reads"""
    layer: int | None = None
    """provenance: the residual-stream index (input of decoder block ``layer``)"""
    hook_name: str = ""
    """provenance: the module whose input is read"""
    token_types: tuple[str, ...] = ()
    """provenance: the token types it was trained on"""
    resize: int | None = None
    """provenance: the square side (px) the training images were resized to before the processor; None: full size"""

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise SAEError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SAEError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        if self.activation != "relu" and not 0 < self.k <= self.d_sae:
            raise SAEError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        self.token_types = tuple(self.token_types)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, obj: Any) -> SAEConfig:
        """The config of a ``cfg.json`` (unknown keys ignored); :class:`SAEError` naming the first
        field that is missing or of the wrong type."""
        if not isinstance(obj, dict):
            raise SAEError(f"expected a JSON object, got {type(obj).__name__}")
        for name in ("d_in", "d_sae"):
            if name not in obj:
                raise SAEError(f"it has no {name!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        for name in names:
            kind = _FIELD_KINDS.get(name, str)
            if name in obj and not _json_fits(obj[name], kind):
                raise SAEError(f"{name!r} is {obj[name]!r}, not {_KIND_NAMES[kind]}")
        return cls(**{k: v for k, v in obj.items() if k in names})


# The JSON types of SAEConfig's fields (what from_json accepts): int, float (an int too),
# float | None, int | None, list of str; every other field is a string.
_FIELD_KINDS: dict[str, Any] = {
    "d_in": int, "d_sae": int, "k": int, "aux_k": int, "dead_after_tokens": int,
    "l1_coefficient": float, "aux_coefficient": float, "act_scale": float, "decoder_init_norm": float,
    "threshold": (float, None), "layer": (int, None), "token_types": list, "resize": (int, None),
}
_KIND_NAMES = {int: "an integer", float: "a number", (float, None): "a number or null",
               (int, None): "an integer or null", list: "a list of strings", str: "a string"}


def _json_fits(value: Any, kind: Any) -> bool:
    if isinstance(kind, tuple):
        return value is None or _json_fits(value, kind[0])
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the
    batch (squares summed, then divided: not a mean of per-token ratios)."""
    resid = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0, keepdim=True)).pow(2).sum()
    return resid / total.clamp(min=torch.finfo(total.dtype).tiny)


# Above this fraction of (token, latent) pairs active (P / (N d_sae), the AuxK pairs included), the
# encoder backward of _EncoderAt builds the dense gradient [N, d_sae] and uses one matmul; below it, a
# sparse CSR product over the active pairs only. Full training step (loss, backward, Adam, decoder
# renorm), topk, CPU, 2 threads, fp32, d_in 1024, d_sae 8192, 4096 tokens, median of 3-5 runs with
# the three variants interleaved:
#     k      density   autograd (before)   dense backward   sparse backward
#     32     0.004     1337 ms             1006 ms           636 ms
#     128    0.016     1428 ms             1119 ms           774 ms
#     512    0.063     2237 ms             1938 ms          1495 ms
#     1024   0.125     3331 ms             3013 ms          2733 ms
#     1536   0.19      3662 ms             3104 ms          3311 ms
#     2048   0.25      4140 ms             3501 ms          4190 ms
# The cross-over lies between 1/8 and 3/16, hence 0.15. (On a loaded machine, where OpenMP's
# spin-waiting slows every small op, it came earlier, near 1/16-1/8.) Typical SAEs (k 32-128 of
# 8k-64k latents, plus AuxK's 256 per token) sit far below it.
SPARSE_BACKWARD_MAX_DENSITY = 0.15


class _EncoderAt(torch.autograd.Function):
    """Pre-activations ``(xs - b_dec) W_enc + b_enc`` at given (token, latent) pairs, differentiable in
    ``xs``, ``b_dec``, ``W_enc`` and ``b_enc`` with a backward that touches only those pairs.

    TopK / BatchTopK use a few of the ``d_sae`` pre-activations of each token. Plain autograd through
    the dense product costs three encoder-sized matmuls per step (the forward, ``xc^T G`` for
    ``W_enc``, and ``G W_enc^T`` for the input, needed because ``b_dec`` is subtracted from it);
    here the forward product is computed once by the caller (without autograd, to pick the pairs)
    and the backward, with ``g`` the gradient of the P picked values:

    * ``b_enc``:  ``g_lat[j] = sum of g over the pairs of latent j``      (index_add, O(P))
    * ``b_dec``:  ``-W_enc g_lat``                                        (a matvec, not ``G W_enc^T``)
    * ``W_enc``:  ``grad[:, j] = sum over pairs (t, j) of g_tj xc[t]``, i.e. ``(G^T xc)^T`` with
      ``G^T`` a CSR matrix ``[d_sae, N]`` holding the P pairs: O(P d_in) instead of O(N d_sae d_in)
    * ``xs``:     only when the input requires grad (never in training): ``G W_enc^T``, G in CSR.

    On CPU the CSR product (MKL) beat the alternatives at d_in 1024, d_sae 8192, k 32, 4096 tokens:
    ~30-90 ms against ~250 ms for a "transposed embedding_bag" (pairs sorted by latent, bags over
    ``xc`` rows), ~1.4 s for ``index_add_`` of ``g * xc[rows]`` (it materialises a ``[P, d_in]``
    tensor) and ~0.75 s for the dense matmul. Duplicate pairs (a dead latent that is also in the
    top k, when the AuxK pairs join) are summed before the CSR matrix is built. Above
    ``SPARSE_BACKWARD_MAX_DENSITY`` the dense ``G`` and one matmul are used instead (still one
    matmul fewer than autograd: ``b_dec`` goes through the matvec). On GPU the same code runs
    cuSPARSE SpMM (after a device sort of the P keys); the duplicate check in :func:`_csr`
    synchronises with the host once per backward. Not measured on GPU here: there a fused kernel
    (``index_add_`` with atomics over ``[P, d_in]`` chunks, or a Triton gather like sparsify's) may
    beat SpMM, and the dense matmul runs in bf16 under autocast; measure before changing the threshold.
    The backward runs in at least float32 (under bf16 autocast the forward product was bf16; the
    gradients here are the fp32 ones, within bf16 rounding of autograd's).
    """

    @staticmethod
    def forward(ctx: Any, xs: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                xc: torch.Tensor, pre: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``pre [N, d_sae]`` (= ``xc W_enc + b_enc``, ``xc = xs - b_dec``, computed by the caller) at
        the pairs ``(rows[i], cols[i])``; returns ``[P]``."""
        ctx.save_for_backward(xc, W_enc, rows, cols)
        ctx.dtypes = (xs.dtype, b_dec.dtype, W_enc.dtype, b_enc.dtype)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        with torch.autocast(g.device.type, enabled=False):  # a backward called inside autocast: stay in acc
            return _EncoderAt._backward(ctx, g)

    @staticmethod
    def _backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, W_enc, rows, cols = ctx.saved_tensors
        need_xs, need_b_dec, need_W_enc, need_b_enc = ctx.needs_input_grad[:4]
        n, d_sae = xc.shape[0], W_enc.shape[1]
        acc = torch.promote_types(W_enc.dtype, torch.float32)
        g = g.to(acc)
        W = W_enc.to(acc)
        g_lat = torch.zeros(d_sae, dtype=acc, device=g.device).index_add_(0, cols, g)
        sparse = rows.numel() <= SPARSE_BACKWARD_MAX_DENSITY * n * d_sae
        dense_g = None if sparse else torch.zeros(n, d_sae, dtype=acc, device=g.device).index_put_(
            (rows, cols), g, accumulate=True)
        grad_xs = grad_W_enc = None
        if need_W_enc:
            if sparse:
                grad_W_enc = (_csr(cols, rows, g, d_sae, n) @ xc.to(acc)).t()
            else:
                grad_W_enc = xc.to(acc).t() @ dense_g
        if need_xs:
            grad_xs = (_csr(rows, cols, g, n, d_sae) if sparse else dense_g) @ W.t()
        grads = (grad_xs, -(W @ g_lat) if need_b_dec else None, grad_W_enc, g_lat if need_b_enc else None)
        return (*(None if gr is None else gr.to(dt) for gr, dt in zip(grads, ctx.dtypes)), None, None, None, None)


@torch.no_grad()
def act_scale_of(x: torch.Tensor) -> float:
    """The activation scale that maps the mean norm of ``x [N, d_in]`` to ``sqrt(d_in)``."""
    mean_norm = float(x.float().norm(dim=-1).mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise SAEError(f"cannot estimate the activation scale: mean norm {mean_norm}")
    return math.sqrt(x.shape[-1]) / mean_norm


@torch.no_grad()
def scaled_mean(x: torch.Tensor, act_scale: float) -> torch.Tensor:
    """``[d_in]`` float32: the mean of ``x [N, d_in]`` in the SAE's scaled space (the data-dependent ``b_dec``)."""
    return (x.float() * act_scale).mean(0)


def _csr(major: torch.Tensor, minor: torch.Tensor, values: torch.Tensor, n_major: int, n_minor: int) -> torch.Tensor:
    """The ``[n_major, n_minor]`` CSR matrix with ``values`` at ``(major[i], minor[i])`` (duplicates summed).

    One sort of the flat keys; duplicates are merged only when there are any. (Not ``torch.unique``:
    with ``return_inverse`` it took ~200 ms on 131k keys on the 2-core CPU, against ~2 ms for a sort.)
    """
    key, order = (major * n_minor + minor).sort()
    values = values[order]
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    if not bool(first.all()):
        group = first.cumsum(0) - 1
        key = key[first]
        values = torch.zeros(len(key), dtype=values.dtype, device=values.device).index_add_(0, group, values)
    key_major = key // n_minor
    crow = torch.zeros(n_major + 1, dtype=key.dtype, device=key.device)
    crow[1:] = torch.bincount(key_major, minlength=n_major).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta" (torch 2.x), once per process
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, key - key_major * n_minor, values, (n_major, n_minor),
                                       check_invariants=False)


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig, *, seed: int | None = 0, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.cfg = cfg
        kw = {"device": device, "dtype": dtype or torch.float32}
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0) -> None:
        """Decoder rows in random directions at ``decoder_init_norm`` (unit for topk/batchtopk);
        ``W_enc = W_dec^T``; biases zero."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=gen)
        norm = self.cfg.decoder_init_norm if self.cfg.activation == "relu" else 1.0
        w = w / w.norm(dim=1, keepdim=True) * norm
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ---- encode / decode ----------------------------------------------------------------------

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``(s x - b_dec) W_enc + b_enc`` for raw residuals ``x [..., d_in]``."""
        if x.shape[-1] != self.cfg.d_in:
            raise SAEError(f"input width {x.shape[-1]} does not match the SAE's d_in {self.cfg.d_in}")
        xs = x.to(self.W_enc.dtype) * self.cfg.act_scale
        return (xs - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Dense latents from pre-activations, per the configured activation."""
        act = self.cfg.activation
        if act == "relu":
            return F.relu(pre)
        if act == "batchtopk" and (self.training or self.cfg.threshold is None):
            flat = F.relu(pre).reshape(-1, pre.shape[-1])
            n_keep = min(self.cfg.k * flat.shape[0], flat.numel())
            vals, idx = flat.flatten().topk(n_keep, sorted=False)
            out = torch.zeros_like(flat).flatten().scatter_(0, idx, vals)
            return out.reshape(pre.shape)
        if act == "batchtopk":
            return torch.where(pre > self.cfg.threshold, pre, torch.zeros_like(pre))
        vals, idx = self.topk(pre)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)

    def topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) ``[..., k]`` of the k largest ReLU'd pre-activations per token."""
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return F.relu(vals), idx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents ``[..., d_sae]`` for raw residuals ``x [..., d_in]``."""
        return self.activate(self.pre_acts(x))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction from dense latents."""
        return (latents @ self.W_dec + self.b_dec) / self.cfg.act_scale

    def decode_sparse(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction from (values, indices) ``[N, k]``: sums k decoder rows per token
        with ``embedding_bag`` instead of a ``[N, d_sae] @ [d_sae, d_in]`` product."""
        out = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals.to(self.W_dec.dtype), mode="sum")
        return (out + self.b_dec) / self.cfg.act_scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_hat, latents)`` for raw residuals ``x [..., d_in]``."""
        latents = self.encode(x)
        return self.decode(latents), latents

    @torch.no_grad()
    def reconstruct(self, x_ND: torch.Tensor, chunk_latents: int = CHUNK_LATENTS) -> torch.Tensor:
        """The reconstruction of ``x_ND`` in ``x``'s dtype, ``chunk_latents // d_sae`` tokens at a time, so the
        latents of many tokens never exist at once (BatchTopK without a threshold: all at once, since its latents
        depend on the whole batch). The same numbers as ``self(x)[0]`` up to the rounding of smaller products."""
        batchwise = self.cfg.activation == "batchtopk" and (self.training or self.cfg.threshold is None)
        step = len(x_ND) if batchwise else max(1, chunk_latents // self.cfg.d_sae)
        out = torch.empty_like(x_ND)
        for lo in range(0, len(x_ND), max(step, 1)):
            out[lo : lo + step] = self(x_ND[lo : lo + step])[0].to(x_ND.dtype)
        return out

    # ---- training objective --------------------------------------------------------------------

    def loss(
        self,
        x: torch.Tensor,
        *,
        l1_coefficient: float | None = None,
        dead_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training losses for a batch of raw residuals ``x [N, d_in]``, in the scaled space.

        Returns ``loss`` (what to minimise), ``mse`` (sum over d_in, mean over tokens), ``sparsity``
        (the April-update penalty for relu, else 0), ``aux`` (AuxK, 0 without dead latents),
        ``latents`` (dense, raw activations) and ``x_hat`` (scaled space).
        """
        xs = x.to(self.W_enc.dtype) * self.cfg.act_scale
        if self.cfg.activation == "relu":
            pre = (xs - self.b_dec) @ self.W_enc + self.b_enc
            latents = F.relu(pre)
            x_hat = latents @ self.W_dec + self.b_dec
        else:
            # The dense pre-activations are needed only to choose the active latents: computed without
            # autograd, and the encoder's gradient flows through the values at the chosen (token, latent)
            # pairs only (_EncoderAt). The AuxK pairs join the same call, so one backward serves both.
            with torch.no_grad():
                xc = xs - self.b_dec
                pre = xc @ self.W_enc + self.b_enc
            rows, idx, offsets = self._active(pre)
            aux_idx = None
            if dead_mask is not None and bool(dead_mask.any()):
                aux_idx = self._aux_latents(pre, dead_mask)
                aux_rows = torch.arange(len(pre), device=pre.device).repeat_interleave(aux_idx.shape[1])
                rows, idx = torch.cat([rows, aux_rows]), torch.cat([idx, aux_idx.flatten()])
            picked = F.relu(_EncoderAt.apply(xs, self.b_dec, self.W_enc, self.b_enc, xc, pre, rows, idx))
            n_main = len(picked) if aux_idx is None else len(picked) - aux_idx.numel()
            vals, rows, idx = picked[:n_main], rows[:n_main], idx[:n_main]
            x_hat = F.embedding_bag(idx, self.W_dec, offsets, mode="sum", per_sample_weights=vals) + self.b_dec
            latents = torch.zeros_like(pre).index_put_((rows, idx), vals.detach())
        err = xs - x_hat
        mse = err.pow(2).sum(-1).mean()
        zero = mse.new_zeros(())
        sparsity, aux = zero, zero
        if self.cfg.activation == "relu":
            lam = self.cfg.l1_coefficient if l1_coefficient is None else l1_coefficient
            sparsity = lam * (latents * self.W_dec.norm(dim=1)).sum(-1).mean()
        elif aux_idx is not None:
            aux_vals = picked[n_main:].view(aux_idx.shape)
            aux = self.cfg.aux_coefficient * self._aux_loss(aux_vals, aux_idx, err)
        loss = mse + sparsity + aux
        return {"loss": loss, "mse": mse, "sparsity": sparsity, "aux": aux, "latents": latents, "x_hat": x_hat}

    def _active(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Active latents of a training batch as flat (token, latent) pairs, token-major, and the offset
        of every token's ``embedding_bag`` bag (k per token for topk; a variable number for batchtopk)."""
        n = pre.shape[0]
        if self.cfg.activation == "topk":
            idx = pre.topk(self.cfg.k, dim=-1, sorted=False).indices
            rows = torch.arange(n, device=pre.device).repeat_interleave(self.cfg.k)
            offsets = torch.arange(0, n * self.cfg.k, self.cfg.k, device=pre.device)
            return rows, idx.flatten(), offsets
        flat = F.relu(pre).flatten()
        flat_idx = flat.topk(min(self.cfg.k * n, flat.numel()), sorted=False).indices.sort().values
        rows, idx = flat_idx // pre.shape[1], flat_idx % pre.shape[1]
        offsets = torch.searchsorted(rows, torch.arange(n, device=pre.device))
        return rows, idx, offsets

    def _aux_latents(self, pre: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor:
        """AuxK: the ``aux_k`` dead latents with the largest pre-activations, ``[N, aux_k]`` ids."""
        k_aux = min(self.cfg.aux_k, int(dead_mask.sum()))
        masked = torch.where(dead_mask, pre, torch.full_like(pre, -torch.inf))
        return masked.topk(k_aux, dim=-1, sorted=False).indices

    def _aux_loss(self, vals: torch.Tensor, idx: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
        """AuxK: the dead latents (ReLU'd values, ids ``[N, k_aux]``) reconstruct the residual error,
        normalised by its variance."""
        err_hat = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum")
        num = (err.detach() - err_hat).pow(2).sum(-1).mean()
        den = (err.detach() - err.detach().mean(0)).pow(2).sum(-1).mean()
        return num / den.clamp(min=1e-8)

    def optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        """After ``loss.backward()``: the optimiser step, keeping TopK/BatchTopK decoder rows on the
        unit sphere (the gradient along each row removed before, the rows renormalised after)."""
        if self.cfg.activation != "relu":
            self.remove_parallel_grad()
        opt.step()
        if self.cfg.activation != "relu":
            self.normalize_decoder()

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows (topk / batchtopk, after each optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of each decoder row's gradient along the row (keeps unit rows on the sphere)."""
        if self.W_dec.grad is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)
        self.W_dec.grad.sub_((self.W_dec.grad * w).sum(1, keepdim=True) * w)

    @torch.no_grad()
    def observe_threshold(self, latents: torch.Tensor, momentum: float = 0.99) -> None:
        """batchtopk: fold this batch's smallest active latent into the running inference threshold."""
        active = latents[latents > 0]
        if active.numel() == 0:
            return
        low = float(active.min())
        old = self.cfg.threshold
        self.cfg.threshold = low if old is None else momentum * old + (1 - momentum) * low

    @torch.no_grad()
    def set_scale_from(self, x: torch.Tensor) -> float:
        """Set ``act_scale`` so that the mean norm of ``x [N, d_in]`` maps to ``sqrt(d_in)``."""
        self.cfg.act_scale = act_scale_of(x)
        return self.cfg.act_scale

    @torch.no_grad()
    def init_b_dec(self, x: torch.Tensor) -> None:
        """Set ``b_dec`` to the (scaled) mean of ``x [N, d_in]``: the data-dependent start."""
        self.b_dec.copy_(scaled_mean(x, self.cfg.act_scale).to(self.b_dec.dtype))

    # ---- files ---------------------------------------------------------------------------------

    def save(self, folder: Path | str) -> Path:
        """``folder/sae.safetensors`` + ``folder/cfg.json``, each written atomically (config last)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(folder / WEIGHTS_FILE, {k: v for k, v in self.state_dict().items()})
        write_json(folder / CONFIG_FILE, self.cfg.to_json())
        return folder

    @classmethod
    def load(cls, folder: Path | str, *, device: Any = None, dtype: Any = None) -> SparseAutoencoder:
        """The SAE saved in ``folder`` by :meth:`save`. :class:`SAEError` naming the file when either
        file is missing, ``cfg.json`` is not a valid config, the weights file is truncated or not
        safetensors, or its tensors do not have the shapes ``cfg.json`` gives (``d_in``, ``d_sae``)."""
        from lineofsight.io import load_tensors, read_json

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise SAEError(f"{folder} is not an SAE folder (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
        try:
            obj = read_json(folder / CONFIG_FILE, "SAE config")
            state = load_tensors(folder / WEIGHTS_FILE, "SAE weights")
        except UserError as err:
            raise SAEError(str(err)) from None
        try:
            cfg = SAEConfig.from_json(obj)
        except (SAEError, TypeError) as e:
            raise SAEError(f"SAE config {folder / CONFIG_FILE} is not a valid SAE config: {e}") from None
        sae = cls(cfg, seed=None, device="meta")
        expected = {name: tuple(p.shape) for name, p in sae.state_dict().items()}
        got = {name: tuple(t.shape) for name, t in state.items()}
        if got != expected:
            wrong = sorted(n for n in expected.keys() & got.keys() if expected[n] != got[n])
            missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
            detail = "; ".join(
                [f"{n} is {list(got[n])}, expected {list(expected[n])}" for n in wrong[:2]]
                + ([f"missing {', '.join(missing)}"] if missing else [])
                + ([f"unexpected {', '.join(extra[:3])}"] if extra else [])
            )
            raise SAEError(f"SAE weights {folder / WEIGHTS_FILE} do not fit {CONFIG_FILE} (d_in {cfg.d_in}, "
                           f"d_sae {cfg.d_sae}): {detail}")
        if not all(t.is_floating_point() for t in state.values()):
            raise SAEError(f"SAE weights {folder / WEIGHTS_FILE} hold non-float tensors")
        sae.load_state_dict(state, assign=True)
        return sae.to(device=device, dtype=dtype) if (device or dtype) else sae

    def export_saelens(self, folder: Path | str) -> Path:
        """Write the SAELens layout: ``sae_weights.safetensors`` (scale folded in) + ``cfg.json``.

        With ``W_enc' = s W_enc``, ``W_dec' = W_dec / s``, ``b_dec' = b_dec / s`` the SAELens
        formula ``act((x - b_dec') W_enc' + b_enc) W_dec' + b_dec'`` gives exactly our raw-space
        reconstruction. BatchTopK with a threshold exports as ``jumprelu`` with that threshold.
        """
        folder = Path(folder)
        s = self.cfg.act_scale
        tensors = {
            "W_enc": self.W_enc * s,
            "b_enc": self.b_enc,
            "W_dec": self.W_dec / s,
            "b_dec": self.b_dec / s,
        }
        act = self.cfg.activation
        if act == "relu":
            arch, kwargs = "standard", {}
        elif act == "topk" or self.cfg.threshold is None:
            arch, kwargs = "topk", {"k": self.cfg.k}
        else:
            arch, kwargs = "jumprelu", {}
            tensors["threshold"] = torch.full((self.cfg.d_sae,), float(self.cfg.threshold))
        cfg = {
            "architecture": arch,
            "d_in": self.cfg.d_in,
            "d_sae": self.cfg.d_sae,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
            "device": "cpu",
            "model_name": self.cfg.model,
            "hook_name": self.cfg.hook_name,
            "hook_layer": self.cfg.layer,
            "hook_head_index": None,
            "activation_fn_str": "topk" if arch == "topk" else "relu",
            "activation_fn_kwargs": kwargs,
            "apply_b_dec_to_input": True,
            "finetuning_scaling_factor": False,
            "normalize_activations": "none",
            "prepend_bos": True,
            "context_size": None,
            "dataset_path": "",
            "sae_lens_training_version": None,
            "neuronpedia_id": None,
            "model_from_pretrained_kwargs": {},
        }
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(folder / "sae_weights.safetensors", tensors)
        write_json(folder / "cfg.json", cfg)
        return folder


def check_sae_fits(sae: Any, model: Any, model_source: str, layer: int | None) -> int:
    """The SAE's width and layer must fit the model; returns the layer to read."""
    from lineofsight.models import check_layer, text_config

    d_model = text_config(model).hidden_size
    if sae.cfg.d_in != d_model:
        raise UserError(f"SAE width d_in {sae.cfg.d_in} does not match the model's d_model {d_model}")
    if sae.cfg.model and Path(sae.cfg.model).name != Path(model_source).name:
        raise UserError(f"the SAE was trained on {sae.cfg.model}, not {model_source}")
    layer = sae.cfg.layer if layer is None else layer
    if layer is None:
        raise UserError("the SAE's cfg.json records no layer, so the layer it reads is unknown; "
                        "this needs an SAE trained by sae/sae-trainer.py (or imported with its layer)")
    if sae.cfg.layer is not None and sae.cfg.layer != layer:
        raise UserError(f"the SAE reads layer {sae.cfg.layer}, not layer {layer}")
    return check_layer(model, layer)


SAES_DIR = "saes"
"""A trainer run keeps its SAEs in ``<run>/saes/<name>/`` (one per layer and configuration)."""


def run_saes(run: Path | str) -> list[Path]:
    """The SAE folders of a trainer run (``<run>/saes/*/`` with a ``cfg.json``), sorted by name."""
    root = Path(run) / SAES_DIR
    return sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file()) if root.is_dir() else []


def load_sae(path: Path, device: Any) -> Any:
    """An SAE folder, or a trainer run folder holding exactly one SAE in ``saes/`` (or, from older runs,
    ``sae/``); one-line errors for anything else, naming the SAEs of a run that holds several."""
    path = Path(path)
    found = run_saes(path)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UserError(f"--sae: the run {path} holds {len(found)} SAEs ({names}); pass one of them, "
                        f"e.g. {found[0]}")
    if found:
        path = found[0]
    elif (path / "sae" / CONFIG_FILE).is_file():
        path = path / "sae"
    try:
        return SparseAutoencoder.load(path, device=device).eval()
    except SAEError as err:
        raise UserError(f"--sae: {err}") from None


def load_saes(paths: Sequence[Path], device: Any) -> list[Any]:
    """Every SAE named by ``paths``: SAE folders, and trainer runs, each standing for all the SAEs in its
    ``saes/`` (a five-layer run gives five); the same one-line errors as :func:`load_sae`."""
    out = []
    for path in paths:
        found = run_saes(path)
        out += [load_sae(p, device) for p in found] if found else [load_sae(path, device)]
    return out
