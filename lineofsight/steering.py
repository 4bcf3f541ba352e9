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
from lineofsight.data import pair_key, parse_pair
from lineofsight.models import image_token_mask, residual_site

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lineofsight.hooks import Trace

__all__ = ["ROLLOUTS_FILE", "ROLLOUT_OUTPUTS", "Positions", "append_rollouts", "load_vectors", "merge_rollouts",
           "paper_strengths", "read_rollout_folder", "read_rollouts", "rollout_key", "save_vectors", "steer",
           "steering_mask", "vector_key", "vector_pairs"]

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

    from lineofsight.hooks import Trace

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


VECTORS_FILE, VECTORS_INDEX = "vectors.safetensors", "vectors.json"


def vector_key(src: str, tgt: str, layer: int) -> str:
    """Key of one vector in ``vectors.safetensors``: ``"{src}@{tgt}/{layer}"``."""
    return f"{pair_key(src, tgt)}/{layer}"


def save_vectors(folder: Path, vectors: dict[tuple[str, str, int], torch.Tensor], info: dict[str, Any]) -> None:
    """Write a steering-vector folder: ``vectors.safetensors`` (``{(src, tgt, layer): v [d_model]}``,
    float32) and ``vectors.json`` (``info`` plus the derived ``layers``, ``pairs`` and ``d_model``).

    The one writer of the format; :func:`load_vectors` is its reader.
    """
    import torch

    from lineofsight.io import save_tensors, write_json

    if not vectors:
        raise ValueError("no steering vectors to save")
    pairs = list(dict.fromkeys(pair_key(src, tgt) for src, tgt, _ in vectors))
    layers = list(dict.fromkeys(layer for _, _, layer in vectors))
    d_model = {int(v.shape[-1]) for v in vectors.values()}
    if len(d_model) != 1:
        raise ValueError(f"steering vectors of different widths: {sorted(d_model)}")
    save_tensors(folder / VECTORS_FILE, {vector_key(*key): v.to(torch.float32) for key, v in vectors.items()},
                 {"method": str(info.get("method", ""))})
    write_json(folder / VECTORS_INDEX, {**info, "layers": layers, "pairs": pairs, "d_model": d_model.pop()})


def vector_pairs(info: dict[str, Any], source: Path | str = VECTORS_INDEX) -> list[tuple[str, str]]:
    """The ``(src, tgt)`` pairs of a ``vectors.json`` (read from ``source``), in order."""
    pairs = []
    for listed in info.get("pairs", []):
        pair = parse_pair(listed) if isinstance(listed, str) else None
        if pair is None:
            raise UserError(f"{source} lists a pair that is not of the form src@tgt: {listed!r}")
        pairs.append(pair)
    return pairs


def load_vectors(vectors_dir: Path, layer: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{"src@tgt": v}`` at ``layer`` from a folder written by :func:`save_vectors`, and its ``vectors.json``.

    :class:`UserError` naming the file when ``vectors.json`` is not JSON or lacks ``layers`` or
    ``pairs``, or ``vectors.safetensors`` is missing, truncated, not safetensors, or holds no
    vector for ``layer``, or vectors that are not ``[d_model]`` (``d_model`` as ``vectors.json``
    gives it; a hand-written one without it: one width for all).
    """
    from lineofsight.io import check_shape, load_tensors, read_json

    vectors_dir = Path(vectors_dir)
    index_path = vectors_dir / VECTORS_INDEX
    if not index_path.is_file():
        raise UserError(f"--vectors {vectors_dir} has no {VECTORS_INDEX}; run steering/compute_steering_vectors.py")
    info = read_json(index_path, "steering-vector index", required={"layers": "list[int]", "pairs": "list[str]"})
    if "d_model" in info:
        check_shape(info["d_model"], "int", f"steering-vector index {index_path}: 'd_model'")
    vector_pairs(info, index_path)
    if layer not in info["layers"]:
        raise UserError(f"--layer {layer}: the vectors in {vectors_dir} are for layers {info['layers']}")
    tensors_path = vectors_dir / VECTORS_FILE
    tensors = load_tensors(tensors_path, "steering vectors")
    vectors = {key.rsplit("/", 1)[0]: v for key, v in tensors.items() if key.endswith(f"/{layer}")}
    if not vectors:
        raise UserError(f"steering vectors {tensors_path} hold no vector for layer {layer}, which {VECTORS_INDEX} lists")
    d_model = info.get("d_model", next(iter(vectors.values())).shape[-1])
    for key, v in vectors.items():
        if v.dim() != 1 or v.shape[0] != d_model or not v.is_floating_point():
            where = f"d_model in {VECTORS_INDEX}" if "d_model" in info else "the width of the others"
            raise UserError(f"steering vectors {tensors_path}: {key}/{layer} has shape {list(v.shape)} ({v.dtype}), "
                            f"expected [{d_model}] floats ({where})")
    return vectors, info


# ---------------------------------------------------------------------------------------------
# Rollouts (steering/steering_rollouts.py): one JSON record per steered generation
# ---------------------------------------------------------------------------------------------

ROLLOUTS_FILE = "rollouts.jsonl"
ROLLOUT_OUTPUTS = (ROLLOUTS_FILE, "rollouts.rank*.jsonl")
"""The files of this format in a rollouts folder: the merged file and torchrun ranks' part files."""


def rollout_key(rec: dict[str, Any]) -> tuple:
    """What identifies a rollout: pair, layer, k, prompt, image and positions."""
    return (rec["src"], rec["tgt"], rec["layer"], round(float(rec["k"]), 6), rec["prompt_id"], rec["image"],
            rec["positions"])


ROLLOUT_FIELDS: dict[str, tuple[type, ...]] = {
    "src": (str,), "tgt": (str,), "layer": (int,), "k": (int, float), "prompt_id": (int,), "image": (str,),
    "positions": (str,), "text": (str,),
}
"""What a rollout record must hold (what :func:`rollout_key` and the evaluation read), with its JSON types."""


def read_rollouts(path: Path) -> list[dict[str, Any]]:
    """The records of one rollouts file. A last line without its newline is a write cut by a kill
    and is left out (the unit is simply redone); blank lines are ignored; any other line that is
    not UTF-8 JSON, not an object, or lacks a field of :data:`ROLLOUT_FIELDS` (or has it of the
    wrong type) is a :class:`UserError` naming the file, the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"rollouts file {path} does not exist")
    lines = path.read_bytes().split(b"\n")
    lines.pop()  # b"" when the file ends with a newline, else a torn last write
    records = []
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path}:{n} is not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as err:
            raise UserError(f"{path}:{n} is not a rollout record (not valid JSON: {err})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{n} is not a rollout record (a JSON {type(rec).__name__}, not an object)")
        missing = [key for key in ROLLOUT_FIELDS if key not in rec]
        if missing:
            raise UserError(f"{path}:{n} is an incomplete rollout record (no {', '.join(missing)})")
        wrong = [key for key, types in ROLLOUT_FIELDS.items()
                 if not isinstance(rec[key], types) or isinstance(rec[key], bool)]
        if wrong:
            raise UserError(f"{path}:{n} is not a rollout record ({', '.join(f'{k}={rec[k]!r}' for k in wrong)} "
                            "of the wrong type)")
        records.append(rec)
    return records


def read_rollout_folder(folder: Path) -> dict[tuple, dict[str, Any]]:
    """Every rollout in ``folder`` (merged file first, then torchrun part files), by :func:`rollout_key`."""
    done: dict[tuple, dict[str, Any]] = {}
    for path in [folder / ROLLOUTS_FILE, *sorted(folder.glob("rollouts.rank*.jsonl"))]:
        if path.is_file():
            for rec in read_rollouts(path):
                done.setdefault(rollout_key(rec), rec)
    return done


@contextmanager
def append_rollouts(path: Path) -> Iterator[Any]:
    """A ``write(records)`` function appending whole lines to ``path``, flushed per call. A torn last
    line left by a kill is cut off first, so the next record never glues onto it."""
    path = Path(path)
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    with path.open("a") as sink:

        def write(records: list[dict[str, Any]]) -> None:
            sink.write("".join(json.dumps(r) + "\n" for r in records))
            sink.flush()

        yield write


def merge_rollouts(folder: Path, units: list[dict[str, Any]]) -> int:
    """Merge ``folder``'s part files into ``rollouts.jsonl`` (atomically) and remove them; returns the
    number of records in it. Nothing is dropped: records of other configs (other layers, k, pairs)
    keep their order first, then this run's ``units`` in their order."""
    from lineofsight.io import atomic_write_text

    merged = read_rollout_folder(folder)
    order = {rollout_key(u): i for i, u in enumerate(units)}
    others = [r for key, r in merged.items() if key not in order]
    ours = sorted((r for key, r in merged.items() if key in order), key=lambda r: order[rollout_key(r)])
    atomic_write_text(folder / ROLLOUTS_FILE, "".join(json.dumps(r) + "\n" for r in others + ours))
    for part in folder.glob("rollouts.rank*.jsonl"):
        part.unlink()
    return len(others) + len(ours)
