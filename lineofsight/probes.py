"""Linear-probe weights on disk: the one writer and reader of ``probes/train_probe.py``'s files.

Per layer L, in the probe folder:

- ``probe_layer{L}.safetensors``: the multiclass probe, ``weight [C, D]`` and ``bias [C]`` in the
  standardised space and the training split's ``mean`` / ``std [D]``, so that
  ``logits = ((x - mean) / std) @ weight.T + bias`` (:func:`probe_logits`);
  ``probe_layer{L}.json``: its layer, class names, width and pooling;
- ``pair_probes_layer{L}.safetensors`` (with ``--pairs``): per ``src@tgt`` pair, the direction in
  the raw residual space that raises the tgt logit over the src logit ``[D]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lineofsight.cli import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["PROBE_OUTPUTS", "load_pair_probes", "load_probe", "probe_logits", "save_pair_probes", "save_probe"]

PROBE_FORMULA = "logits = ((x - mean) / std) @ weight.T + bias"
PROBE_OUTPUTS = ("probe_layer*.safetensors", "probe_layer*.json", "pair_probes_layer*.safetensors")
"""The files of this format in a probe folder (glob patterns)."""


def _probe_path(folder: Path, layer: int) -> Path:
    return Path(folder) / f"probe_layer{layer}.safetensors"


def _pairs_path(folder: Path, layer: int) -> Path:
    return Path(folder) / f"pair_probes_layer{layer}.safetensors"


def save_probe(folder: Path, layer: int, probe: dict[str, torch.Tensor], class_names: list[str], pool: str) -> None:
    """Write the multiclass probe of ``layer`` (``weight``, ``bias``, ``mean``, ``std``) and its JSON."""
    from lineofsight.io import save_tensors, write_json

    save_tensors(_probe_path(folder, layer), {k: probe[k] for k in ("weight", "bias", "mean", "std")})
    write_json(Path(folder) / f"probe_layer{layer}.json", {
        "layer": layer, "class_names": class_names, "d_model": int(probe["weight"].shape[1]), "pool": pool,
        "formula": PROBE_FORMULA,
    })


def load_probe(folder: Path, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The multiclass probe of ``layer`` written by :func:`save_probe`, and its JSON; a file that is
    missing, truncated or malformed, or tensors that disagree with the JSON, are a :class:`UserError`."""
    from lineofsight.io import load_tensors, read_json

    path = _probe_path(folder, layer)
    if not path.is_file():
        raise UserError(f"{folder} has no probe for layer {layer} ({path.name}); run probes/train_probe.py")
    info_path = Path(folder) / f"probe_layer{layer}.json"
    info = read_json(info_path, "probe description", required={"class_names": "list[str]", "d_model": "int"})
    probe = load_tensors(path, "probe", keys=("weight", "bias", "mean", "std"))
    n_classes, d_model = len(info["class_names"]), info["d_model"]
    shapes = {"weight": [n_classes, d_model], "bias": [n_classes], "mean": [d_model], "std": [d_model]}
    for name, shape in shapes.items():
        if list(probe[name].shape) != shape:
            raise UserError(f"probe {path}: {name} has shape {list(probe[name].shape)}, but {info_path.name} "
                            f"({n_classes} classes, d_model {d_model}) says {shape}")
    return probe, info


def probe_logits(probe: dict[str, torch.Tensor], x_ND: torch.Tensor) -> torch.Tensor:
    """Class logits ``[N, C]`` of a probe for raw residuals ``x_ND``."""
    return ((x_ND - probe["mean"]) / probe["std"]) @ probe["weight"].T + probe["bias"]


def save_pair_probes(folder: Path, layer: int, directions: dict[str, torch.Tensor]) -> None:
    """Write the ``{"src@tgt": direction [D]}`` binary-probe directions of ``layer``."""
    from lineofsight.io import save_tensors

    save_tensors(_pairs_path(folder, layer), directions,
                 {"layer": str(layer), "meaning": "direction raising the tgt logit over the src logit"})


def load_pair_probes(folder: Path, layer: int) -> dict[str, torch.Tensor]:
    """The ``{"src@tgt": direction}`` of ``layer`` written by :func:`save_pair_probes`."""
    from lineofsight.io import load_tensors

    path = _pairs_path(folder, layer)
    if not path.is_file():
        raise UserError(f"--probes {folder} has no {path.name}; run probes/train_probe.py with --pairs")
    directions = load_tensors(path, "pair probes")
    widths = {tuple(d.shape) for d in directions.values()}
    if len(widths) > 1 or any(len(w) != 1 for w in widths):
        raise UserError(f"pair probes {path} should hold one vector [d_model] per pair, found shapes {sorted(widths)}")
    return directions
