"""Add a steering vector to the residual stream at chosen positions of one layer.

The paper's intervention: ``resid[layer] += k * v`` at the image-token positions, during the
prefill pass only, so that generated tokens see the edit only through the KV cache. Positions:

- ``image``: exactly the image-token positions of each sample (from ``input_ids``), prefill only;
- ``prompt``: every non-pad prompt position, prefill only;
- ``all``: every prompt position and every generated token.

Positions are resolved per sample, so a batch may mix image sizes, prompts and padding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lineofsight.cli import UserError
from lineofsight.hooks import Trace
from lineofsight.models import image_token_mask, residual_site

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Positions", "load_vectors", "paper_strengths", "steer", "steering_mask"]

Positions = Literal["image", "prompt", "all"]


def steering_mask(model: nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor,
                  positions: Positions) -> torch.Tensor:
    """Boolean ``[B, T]`` mask of the prompt positions that receive the vector."""
    if positions == "image":
        return image_token_mask(input_ids_BT, model)
    if positions in ("prompt", "all"):
        return attention_mask_BT.bool()
    raise ValueError(f"unknown positions {positions!r}; expected image, prompt or all")


@contextmanager
def steer(
    model: nn.Module,
    layer: int,
    delta_BD: torch.Tensor,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    positions: Positions = "image",
) -> Iterator[Trace]:
    """Within the block, forwards of ``model`` get ``delta_BD[b]`` added at ``layer`` (see module doc).

    Args:
        delta_BD: the per-sample addition, ``k * v`` (``[B, D]``, or ``[D]`` for all samples).
        input_ids_BT, attention_mask_BT: the prompt batch (left padded for generation).
        positions: ``image``, ``prompt`` or ``all``.

    A forward at least as long as the prompt is a prefill (or an uncached step recomputing the
    prompt): the masked prompt positions get the edit, later positions only for ``all``. A
    shorter one is a cached decoding step: edited only for ``all``.
    """
    import torch

    mask_BT = steering_mask(model, input_ids_BT, attention_mask_BT, positions)
    prompt_len = input_ids_BT.shape[1]

    def add(x_BTD: torch.Tensor) -> torch.Tensor:
        delta = delta_BD.to(device=x_BTD.device, dtype=x_BTD.dtype)
        delta = delta.expand(x_BTD.shape[0], -1) if delta.dim() == 1 else delta
        T = x_BTD.shape[1]
        if prompt_len > T:  # a cached decoding step: only new tokens are in x
            return x_BTD + delta[:, None, :] if positions == "all" else x_BTD
        # Prefill, or an uncached step that recomputes prompt + generated tokens.
        mask = mask_BT.to(x_BTD.device)
        if prompt_len < T:
            mask = torch.cat([mask, mask.new_full((mask.shape[0], T - prompt_len), positions == "all")], 1)
        return x_BTD + mask[..., None].to(x_BTD.dtype) * delta[:, None, :]

    with Trace(model, residual_site(model, layer), retain_output=False, edit_input=add) as trace:
        yield trace


def paper_strengths() -> list[float]:
    """The paper's strengths, ``linspace(0, 30, 20)`` (rounded to 6 decimals, so they key JSON)."""
    import numpy as np

    return [round(float(k), 6) for k in np.linspace(0, 30, 20)]


def load_vectors(vectors_dir: Path, layer: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{"src@tgt": v}`` at ``layer`` from steering/compute_steering_vectors.py's folder, and its JSON."""
    from safetensors.torch import load_file

    index_path = vectors_dir / "vectors.json"
    if not index_path.is_file():
        raise UserError(f"--vectors {vectors_dir} has no vectors.json; run steering/compute_steering_vectors.py")
    info = json.loads(index_path.read_text())
    if layer not in info["layers"]:
        raise UserError(f"--layer {layer}: the vectors in {vectors_dir} are for layers {info['layers']}")
    tensors = load_file(vectors_dir / "vectors.safetensors")
    return {key.rsplit("/", 1)[0]: v for key, v in tensors.items() if key.endswith(f"/{layer}")}, info
