"""Metrics more than one script computes, each defined once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "NLL_CHUNK_TOKENS",
    "caption_nll",
    "caption_tail_mask",
    "caption_token_nll",
    "paired_difference",
    "wilson_interval",
]

NLL_CHUNK_TOKENS = 1024
"""Caption tokens whose logits exist at once in :func:`caption_token_nll` (``[1024, V]`` float32: 131 MB at the 7B's
vocabulary of 32,064)."""


def caption_nll(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, caption_BT: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of the caption tokens (each predicted from the position before it) and
    their count.

    ``caption_BT`` marks the caption positions of ``input_ids_BT``. ``logits_BTV`` may cover only
    the last positions of the rows (a forward with ``logits_to_keep``): it must start at or before
    the position preceding the first caption token. Computed in float32.
    """
    import torch

    lo = input_ids_BT.shape[1] - logits_BTV.shape[1]  # the first position with logits
    if bool(caption_BT[:, : lo + 1].any()):
        raise ValueError("the logits start after a caption token's predecessor; keep more positions")
    target = caption_BT[:, lo + 1 :]
    nll = torch.nn.functional.cross_entropy(
        logits_BTV[:, :-1].float().transpose(1, 2), input_ids_BT[:, lo + 1 :], reduction="none"
    )
    return float(nll[target].sum()), int(target.sum())


def caption_token_nll(model: Any, hidden_BTD: torch.Tensor, ids_BT: torch.Tensor, caption_BT: torch.Tensor,
                      chunk_tokens: int = NLL_CHUNK_TOKENS) -> torch.Tensor:
    """Next-token NLL ``[N]`` (float32) of the N caption tokens marked in ``caption_BT``, in row-major order, from
    the final hidden states (:func:`lineofsight.models.final_hidden`): each token's logits come from the hidden
    state one position before it, through the output embedding, ``chunk_tokens`` positions at a time, upcast to
    float32 before the log-softmax. The same numbers as :func:`caption_nll` on full logits, without the
    ``[B, T, V]`` logits of the whole sequence."""
    import torch

    if bool(caption_BT[:, 0].any()):
        raise ValueError("a caption token at position 0 has no predecessor to predict it")
    target_BT = caption_BT[:, 1:]
    h_ND = hidden_BTD[:, :-1][target_BT]  # the predecessors of the caption tokens
    y_N = ids_BT[:, 1:][target_BT]
    unembed = model.get_output_embeddings()
    out = []
    with torch.no_grad():
        for lo in range(0, len(y_N), chunk_tokens):
            logp_NV = unembed(h_ND[lo : lo + chunk_tokens]).float().log_softmax(-1)
            out.append(-logp_NV.gather(-1, y_N[lo : lo + chunk_tokens, None])[:, 0])
    return torch.cat(out) if out else h_ND.new_zeros(0, dtype=torch.float32)


def caption_tail_mask(ids_BT: torch.Tensor, n_caption_tokens: list[int]) -> torch.Tensor:
    """``[B, T]`` bool marking each left-padded row's caption: its last ``n_caption_tokens[b]`` positions."""
    import torch

    positions = torch.arange(ids_BT.shape[1], device=ids_BT.device)
    n = torch.tensor(n_caption_tokens, device=ids_BT.device)
    return positions[None, :] >= ids_BT.shape[1] - n[:, None]


Z_95 = 1.959963984540054
"""The standard normal's 97.5 % quantile: two-sided 95 % intervals."""


def wilson_interval(n_correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``n_correct / n`` (95 % by default); ``(0, 1)`` for ``n = 0``.
    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0 or n correct."""
    if n == 0:
        return 0.0, 1.0
    p = n_correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: list[bool], b: list[bool], z: float = Z_95) -> dict[str, float | int]:
    """Accuracy of ``b`` minus that of ``a`` on the same items, with a paired 95 % interval (the mean of the
    per-item differences in {-1, 0, 1} +- z standard errors), and the discordant counts: ``a_only`` items right
    under ``a`` alone, ``b_only`` under ``b`` alone (McNemar's b and c)."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs the same items on both sides ({len(a)} vs {len(b)})")
    n = len(a)
    d = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
    mean = sum(d) / n if n else 0.0
    var = sum((v - mean) ** 2 for v in d) / (n - 1) if n > 1 else 0.0
    half = z * (var / n) ** 0.5 if n else 0.0
    return {"diff": mean, "ci95": [mean - half, mean + half], "n": n,
            "a_only": sum(v < 0 for v in d), "b_only": sum(v > 0 for v in d)}
