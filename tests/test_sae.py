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
