"""The SAE class: objective and gradient, sparse decoding, planted-feature recovery, files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from lineofsight.sae import SAEConfig, SAEError, SparseAutoencoder, fvu


def planted(n_tokens: int, d_in: int = 64, n_atoms: int = 256, active: int = 4, seed: int = 0):
    """Tokens that are sparse non-negative combinations of known unit atoms: (x, atoms)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d_in, generator=g)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n_tokens, n_atoms, generator=g).topk(active, dim=1).indices
    coef = torch.zeros(n_tokens, n_atoms).scatter_(1, idx, 0.5 + torch.rand(n_tokens, active, generator=g))
    return coef @ atoms, atoms


def max_cosine(sae: SparseAutoencoder, atoms: torch.Tensor) -> float:
    dec = sae.W_dec.detach()
    dec = dec / dec.norm(dim=1, keepdim=True)
    return float((atoms @ dec.T).max(1).values.mean())


def train(sae: SparseAutoencoder, x: torch.Tensor, steps: int, lr: float, batch: int = 512, **kw) -> None:
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        xb = x[torch.randint(len(x), (batch,), generator=g)]
        out = sae.loss(xb, **kw)
        opt.zero_grad()
        out["loss"].backward()
        sae.optimizer_step(opt)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_planted_atoms_are_recovered(activation):
    torch.manual_seed(0)
    x, atoms = planted(20_000)
    cfg = SAEConfig(d_in=64, d_sae=512, activation=activation, k=4, l1_coefficient=1.0)
    sae = SparseAutoencoder(cfg, seed=0)
    sae.set_scale_from(x[:2000])
    sae.init_b_dec(x[:2000])
    train(sae, x, steps=1500, lr=3e-3 if activation == "topk" else 1e-3)
    assert max_cosine(sae, atoms) >= 0.9
    with torch.no_grad():
        x_hat, _ = sae(x[:2000])
    assert float(fvu(x[:2000], x_hat)) < 0.2


def test_april_update_loss_and_gradient_match_the_formula():
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=8, d_sae=16, activation="relu", l1_coefficient=5.0, act_scale=0.7)
    sae = SparseAutoencoder(cfg, seed=3)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.3)
        sae.b_dec.normal_()
    x = torch.randn(10, 8)
    out = sae.loss(x)

    W_enc, b_enc, W_dec, b_dec = (p.detach().clone().requires_grad_(True) for p in
                                  (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    xs = x * 0.7
    f = torch.relu((xs - b_dec) @ W_enc + b_enc)
    x_hat = f @ W_dec + b_dec
    ref = ((xs - x_hat) ** 2).sum(1).mean() + 5.0 * (f * W_dec.norm(dim=1)).sum(1).mean()
    torch.testing.assert_close(out["loss"], ref)
    ref.backward()
    out["loss"].backward()
    for ours, theirs in ((sae.W_enc, W_enc), (sae.b_enc, b_enc), (sae.W_dec, W_dec), (sae.b_dec, b_dec)):
        torch.testing.assert_close(ours.grad, theirs.grad)
    assert float(W_dec.grad.norm()) > 0  # the penalty's decoder-norm term carries gradient


def test_fvu_matches_reference():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 5.0], [4.0, 9.0]])
    # residual: 1 + 1 + 1 = 3; mean (3, 5); total: (4+9) + (0+1) + (4+16) = 34
    assert float(fvu(x, x_hat)) == pytest.approx(3 / 34)


def test_sparse_decode_equals_dense():
    cfg = SAEConfig(d_in=32, d_sae=256, activation="topk", k=8, act_scale=1.3)
    sae = SparseAutoencoder(cfg, seed=0)
    x = torch.randn(50, 32)
    pre = sae.pre_acts(x)
    vals, idx = sae.topk(pre)
    dense = sae.decode(torch.zeros_like(pre).scatter_(-1, idx, vals))
    torch.testing.assert_close(sae.decode_sparse(vals, idx), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x)[0], dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_training_loss_uses_sparse_decode_equal_to_dense(activation):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=256, activation=activation, k=4, act_scale=1.3)).train()
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(20, 32)
    out = sae.loss(x)
    out["mse"].backward()
    sparse_grads = [p.grad.clone() for p in sae.parameters()]
    sae.zero_grad()
    xs = x * 1.3
    latents = sae.activate((xs - sae.b_dec) @ sae.W_enc + sae.b_enc)
    x_hat = latents @ sae.W_dec + sae.b_dec
    ((xs - x_hat) ** 2).sum(-1).mean().backward()
    assert torch.equal(out["latents"], latents.detach())
    torch.testing.assert_close(out["x_hat"], x_hat, rtol=1e-5, atol=1e-5)
    for ours, ref in zip(sparse_grads, (p.grad for p in sae.parameters()), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_topk_and_batchtopk_sparsity():
    x = torch.randn(40, 16)
    topk = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64, activation="topk", k=3))
    assert int((topk.encode(x) > 0).sum(1).max()) <= 3
    btk = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64, activation="batchtopk", k=3)).train()
    lat = btk.encode(x)
    assert int((lat > 0).sum()) <= 3 * 40
    assert int((lat > 0).sum(1).max()) > 3 or int((lat > 0).sum(1).min()) < 3  # varies per token
    btk.observe_threshold(lat)
    btk.eval()
    thr = btk.cfg.threshold
    assert thr is not None and thr > 0
    single = btk.encode(x[:1])
    torch.testing.assert_close(single, btk.encode(x)[:1])  # inference does not depend on the batch


def test_aux_loss_only_with_dead_latents():
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64, activation="topk", k=4, aux_k=8))
    x = torch.randn(32, 16)
    assert float(sae.loss(x)["aux"]) == 0.0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:20] = True
    out = sae.loss(x, dead_mask=dead)
    assert float(out["aux"].detach()) > 0
    out["aux"].backward()
    assert float(sae.W_dec.grad[:20].abs().sum()) > 0
    assert float(sae.W_dec.grad[20:].abs().sum()) == 0.0  # the aux term touches dead rows only


def saelens_reconstruct(folder: Path, x: torch.Tensor) -> torch.Tensor:
    """The reference: reconstruct ``x`` from an exported SAELens folder with SAELens' own formulas
    (``act((x - b_dec) W_enc + b_enc) W_dec + b_dec``; JumpReLU gates on the threshold), no SAELens needed."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(folder / "sae_weights.safetensors")
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "standard":
        f = F.relu(pre)
    elif cfg["architecture"] == "jumprelu":
        f = F.relu(pre) * (pre > w["threshold"])
    else:
        vals, idx = pre.topk(cfg["activation_fn_kwargs"]["k"], dim=-1)
        f = torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))
    return f @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("activation", ["relu", "topk", "batchtopk"])
def test_save_load_and_saelens_round_trip(tmp_path, activation):
    cfg = SAEConfig(d_in=24, d_sae=96, activation=activation, k=6, act_scale=0.37, model="toy", layer=2)
    sae = SparseAutoencoder(cfg, seed=5)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.2, 0.2)
        sae.b_dec.normal_()
    x = torch.randn(30, 24) * 3
    if activation == "batchtopk":
        sae.observe_threshold(sae.train().encode(x))
    sae.eval()
    ref, _ = sae(x)
    sae.save(tmp_path / "sae")
    back = SparseAutoencoder.load(tmp_path / "sae").eval()
    assert back.cfg == sae.cfg
    assert torch.equal(back(x)[0], ref)
    sae.export_saelens(tmp_path / "lens")
    torch.testing.assert_close(saelens_reconstruct(tmp_path / "lens", x), ref, rtol=1e-4, atol=1e-4)


def test_bad_inputs_name_the_problem(tmp_path):
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=16))
    with pytest.raises(SAEError, match="input width 9 does not match the SAE's d_in 8"):
        sae.encode(torch.randn(2, 9))
    with pytest.raises(SAEError, match="not an SAE folder"):
        SparseAutoencoder.load(tmp_path)
    with pytest.raises(SAEError, match="activation must be one of"):
        SAEConfig(d_in=8, d_sae=16, activation="gelu")
    with pytest.raises(SAEError, match="k must be in"):
        SAEConfig(d_in=8, d_sae=16, activation="topk", k=17)


def test_scale_maps_mean_norm_to_sqrt_d():
    x = torch.randn(500, 64) * 11.0
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=128))
    sae.set_scale_from(x)
    assert float((x * sae.cfg.act_scale).norm(dim=1).mean()) == pytest.approx(math.sqrt(64), rel=1e-5)


# ---- the sparse encoder backward of TopK / BatchTopK (lineofsight.sae._EncoderAt) ----------------


def dense_reference_loss(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The training loss written with plain dense autograd: dense pre-activations, dense latents,
    dense decoder product, AuxK with a dense scatter (the formula ``loss`` must reproduce)."""
    cfg = sae.cfg
    xs = x.to(sae.W_enc.dtype) * cfg.act_scale
    pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    latents = sae.activate(pre)
    x_hat = latents @ sae.W_dec + sae.b_dec
    err = xs - x_hat
    mse = err.pow(2).sum(-1).mean()
    aux = mse.new_zeros(())
    if dead is not None:
        masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        vals, idx = masked.topk(min(cfg.aux_k, int(dead.sum())), dim=-1)
        err_hat = torch.zeros_like(pre).scatter(-1, idx, F.relu(vals)) @ sae.W_dec
        den = (err.detach() - err.detach().mean(0)).pow(2).sum(-1).mean()
        aux = cfg.aux_coefficient * (err.detach() - err_hat).pow(2).sum(-1).mean() / den
    return {"loss": mse + aux, "mse": mse, "aux": aux, "x_hat": x_hat, "latents": latents}


class MatmulLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the layout and shape of the first operand of every matrix product."""

    def __init__(self) -> None:
        super().__init__()
        self.mms: list[tuple[torch.layout, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a = args[0] if func is torch.ops.aten.mm.default else args[1]
            self.mms.append((a.layout, tuple(a.shape)))
        return func(*args, **(kwargs or {}))


def encoder_case(activation: str, dtype=torch.float32, seed: int = 0):
    """A small TopK/BatchTopK SAE with non-zero biases and a batch: (sae, x, dead latents)."""
    torch.manual_seed(seed)
    cfg = SAEConfig(d_in=24, d_sae=192, activation=activation, k=5, aux_k=12, act_scale=1.3)
    sae = SparseAutoencoder(cfg, seed=seed, dtype=dtype).train()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_()
        sae.W_enc.add_(torch.randn_like(sae.W_enc) * 0.1)  # W_enc != W_dec^T, so a transposed grad shows
    x = torch.randn(40, 24, dtype=dtype)
    dead = torch.zeros(192, dtype=torch.bool)
    dead[torch.randperm(192, generator=torch.Generator().manual_seed(seed))[:50]] = True
    return sae, x, dead


def loss_and_grads(fn, sae: SparseAutoencoder, x: torch.Tensor, x_grad: bool, autocast: bool = False):
    """Outputs and gradients of ``fn(x)``; with ``autocast`` the forward runs under CPU bf16 autocast and
    the backward outside it, as in sae-trainer.py."""
    sae.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(x_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(x)
    (out["loss"] + 0.3 * out["x_hat"].sum()).backward()  # x_hat's own gradient too, not only the loss's
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    if x_grad:
        grads["x"] = x.grad.clone()
    return {k: v.detach() for k, v in out.items() if k in ("loss", "mse", "aux", "x_hat", "latents")}, grads


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    """Max abs difference within ``tol`` times the largest magnitude of the reference."""
    scale = float(ref.abs().max().clamp(min=1e-12))
    diff = float((ours.float() - ref.float()).abs().max())
    assert diff <= tol * scale, f"{what}: max diff {diff:.3g} > {tol:g} * {scale:.3g}"


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_dead", [False, True], ids=["no-aux", "aux"])
@pytest.mark.parametrize("x_grad", [False, True], ids=["x-no-grad", "x-grad"])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_sparse_encoder_backward_equals_dense_autograd(monkeypatch, activation, with_dead, x_grad, backward):
    import lineofsight.sae as sae_module

    monkeypatch.setattr(sae_module, "SPARSE_BACKWARD_MAX_DENSITY", 1.0 if backward == "sparse" else 0.0)
    sae, x, dead = encoder_case(activation)
    dead = dead if with_dead else None
    ours, our_grads = loss_and_grads(lambda xx: sae.loss(xx, dead_mask=dead), sae, x, x_grad)
    ref, ref_grads = loss_and_grads(lambda xx: dense_reference_loss(sae, xx, dead), sae, x, x_grad)
    assert torch.equal(ours["latents"], ref["latents"])
    assert with_dead == (float(ours["aux"]) > 0)
    for name in ("loss", "mse", "aux", "x_hat"):
        assert_rel_close(ours[name], ref[name], 1e-5, name)
    assert our_grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        assert float(ref_grad.abs().max()) > 0, name
        assert_rel_close(our_grads[name], ref_grad, 1e-5, f"grad {name}")


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_sparse_encoder_backward_under_bf16_autocast(activation):
    sae, x, dead = encoder_case(activation, seed=1)
    ours, our_grads = loss_and_grads(lambda xx: sae.loss(xx, dead_mask=dead), sae, x, True, autocast=True)
    ref, ref_grads = loss_and_grads(lambda xx: dense_reference_loss(sae, xx, dead), sae, x, True, autocast=True)
    assert ours["x_hat"].dtype == ref["x_hat"].dtype
    assert torch.equal(ours["latents"], ref["latents"])  # the same bf16 product picks the same latents
    for name in ("loss", "mse", "aux", "x_hat"):
        assert_rel_close(ours[name], ref[name], 2e-2, name)
    for name, ref_grad in ref_grads.items():
        assert our_grads[name].dtype == ref_grad.dtype
        assert_rel_close(our_grads[name], ref_grad, 1.5e-2, f"grad {name}")


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.bfloat16, 3e-2)], ids=["fp64", "bf16"])
def test_sparse_encoder_backward_with_float64_and_bfloat16_weights(activation, dtype, tol):
    sae, x, dead = encoder_case(activation, dtype=dtype, seed=2)
    ours, our_grads = loss_and_grads(lambda xx: sae.loss(xx, dead_mask=dead), sae, x, False)
    ref, ref_grads = loss_and_grads(lambda xx: dense_reference_loss(sae, xx, dead), sae, x, False)
    assert_rel_close(ours["loss"], ref["loss"], tol, "loss")
    for name, ref_grad in ref_grads.items():
        assert our_grads[name].dtype == dtype
        assert_rel_close(our_grads[name], ref_grad, tol, f"grad {name}")


@pytest.mark.parametrize("x_grad", [False, True])
def test_sparse_encoder_backward_uses_only_active_pairs(x_grad):
    """The encoder backward is one CSR product over the N k active pairs (two when the input needs its
    gradient): no dense [N, d_sae] gradient, no input-gradient product in training."""
    sae, x, _ = encoder_case("topk")
    out = sae.loss(x.clone().requires_grad_(x_grad))
    log = MatmulLog()
    with log:
        out["mse"].backward()
    n, d_sae = len(x), sae.cfg.d_sae
    expected = [(torch.sparse_csr, (d_sae, n))] + ([(torch.sparse_csr, (n, d_sae))] if x_grad else [])
    assert log.mms == expected
