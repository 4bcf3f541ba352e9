"""HardConcrete gates (lineofsight.sparse) against their formulas and the fitter they came from."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import load_script

from lineofsight.sparse import BETA, GAMMA, ZETA, deterministic_gates, expected_l0, sample_gates

approx = load_script("sae/approximate_steering_vectors.py")


def test_expected_l0_is_the_frequency_of_open_sampled_gates():
    log_alpha = torch.tensor([-4.0, -1.0, 0.0, 0.5, 3.0])[:, None].expand(5, 100_000).contiguous()
    z = sample_gates(log_alpha, torch.Generator().manual_seed(0))
    assert z.min() == 0 and z.max() == 1  # the stretch and clamp reach both ends exactly
    frequency = (z > 0).float().mean(1)
    # eq. 12 of Louizos et al.: P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))
    import math

    reference = torch.sigmoid(log_alpha[:, 0] - BETA * math.log(-GAMMA / ZETA))
    assert torch.allclose(expected_l0(log_alpha[:, :1]).flatten(), reference, atol=1e-6)
    assert torch.allclose(frequency, reference, atol=0.01)


def test_deterministic_gates():
    log_alpha = torch.tensor([-10.0, -2.5, 0.0, 2.5, 10.0])
    z = deterministic_gates(log_alpha)
    assert z[0] == 0 and z[-1] == 1 and z[2] == 0.5
    assert torch.equal(z, (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1))


def _old_hard_concrete_fit(targets_VD, dictionary_SD, lambdas_V, steps, lr, seed):
    """The approximation's fitter before the gates moved to lineofsight.sparse, verbatim."""
    gen = torch.Generator().manual_seed(seed)
    targets = F.normalize(targets_VD.float(), dim=-1)
    D = dictionary_SD.float()
    coef = (targets @ D.T).clone().requires_grad_(True)
    log_alpha = torch.zeros_like(coef, requires_grad=True)
    opt = torch.optim.Adam([coef, log_alpha], lr=lr)
    l0_shift = BETA * torch.log(torch.tensor(-GAMMA / ZETA))
    lam = lambdas_V.float()[:, None]
    for _ in range(steps):
        u = torch.rand(coef.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / BETA)
        z = (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        cos = F.cosine_similarity((z * coef) @ D, targets, dim=-1)
        loss = ((1 - cos) + (lam * torch.sigmoid(log_alpha - l0_shift)).sum(-1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        approx_VD = (z * coef) @ D
        cos = F.cosine_similarity(approx_VD, targets, dim=-1)
        cos = torch.where(approx_VD.norm(dim=-1) > 0, cos, torch.zeros_like(cos))
    return {"l0": (z > 0).sum(-1), "cosine": cos, "approx": approx_VD, "gates": z}


def test_library_gates_reproduce_the_old_fitter_exactly():
    g = torch.Generator().manual_seed(3)
    D = F.normalize(torch.randn(96, 24, generator=g), dim=-1)
    targets = torch.randn(6, 24, generator=g)
    lambdas = torch.tensor([0.0, 1e-2, 1e-1]).repeat_interleave(2)
    new = approx.hard_concrete_fit(targets, D, lambdas, steps=100, lr=5e-2, seed=5)
    old = _old_hard_concrete_fit(targets, D, lambdas, steps=100, lr=5e-2, seed=5)
    for key in ("l0", "cosine", "approx", "gates"):
        assert torch.equal(new[key], old[key]), key
    assert len(set(new["l0"].tolist())) > 1  # the penalties made a difference: the comparison is not vacuous
