"""HardConcrete gates: a differentiable L0 penalty (Louizos, Welling and Kingma 2018, "Learning
Sparse Neural Networks through L0 Regularization"), as the paper uses them.

A gate ``z`` in ``[0, 1]`` per (problem, atom) has one free parameter ``log_alpha``. Training
samples ``u ~ U(0, 1)`` and sets ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
``z = clamp(s (zeta - gamma) + gamma, 0, 1)`` (:func:`sample_gates`: the stretch to
``(gamma, zeta) = (-0.1, 1.1)`` then the clamp lets a gate be exactly 0 or 1). The probability
that a gate is non-zero, ``sigmoid(log_alpha - beta log(-gamma / zeta))`` (:func:`expected_l0`,
eq. 12), summed over the atoms is the expected L0 that the loss penalises. After training the
gates are made deterministic, ``clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``
(:func:`deterministic_gates`), and L0 is the number of non-zero gates.

Every function works elementwise on a ``log_alpha`` of any shape, so many independent problems
(vectors x L0 penalties, or class pairs x penalties) are one batched tensor problem. Used by
``sae/approximate_steering_vectors.py`` (sparse approximation of steering vectors) and
``probes/train_probe.py --sparse hardconcrete`` (L0-gated probes on SAE latents).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["BETA", "GAMMA", "ZETA", "deterministic_gates", "expected_l0", "sample_gates"]

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
"""Temperature and stretch interval of the gates (the paper's and Louizos et al.'s values)."""


def sample_gates(log_alpha: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Reparameterised gate samples ``z`` (shaped like ``log_alpha``), with noise from ``generator``
    (on ``log_alpha``'s device)."""
    import torch

    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def expected_l0(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(z != 0)`` per gate (shaped like ``log_alpha``); its sum over atoms is the expected L0."""
    import torch

    shift = BETA * torch.log(torch.tensor(-GAMMA / ZETA))
    return torch.sigmoid(log_alpha - shift.to(log_alpha.device))


def deterministic_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """The gates at the end of training (no noise): exactly 0 for a closed gate."""
    import torch

    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
