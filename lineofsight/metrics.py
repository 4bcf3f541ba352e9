"""Metrics more than one script computes, each defined once."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["caption_nll"]


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
