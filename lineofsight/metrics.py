"""Metrics more than one script computes, each defined once."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["NLL_CHUNK_TOKENS", "caption_nll", "caption_tail_mask", "caption_token_nll"]

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
