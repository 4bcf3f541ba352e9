"""Import one of the paper's released SAEs (Hugging Face ``flybamboo/vlm-saes``) as an SAE folder of this project.

The released files (``sae_final_layer{8,12,16,20,24}_8x_norm.pkl``) are ``torch.save``d state dicts of an
``nn.DataParallel``-wrapped ReLU autoencoder: ``module.fc1.weight [d_sae, d_in]``, ``module.fc1.bias [d_sae]``,
``module.fc2.weight [d_in, d_sae]``, ``module.fc2.bias [d_in]``; latents ``relu(fc1(s x))``, reconstruction
``fc2(f) / s``, with ``s`` = 8 in the paper's evaluation code (``--scale``). "Layer L" is the input of decoder
block L, this project's convention too (read from the file name, or ``--layer``). The file is read with
``torch.load(weights_only=True)``: nothing in it is unpickled beyond tensors and plain containers.

In this project's formula ``pre = (s x - b_dec) W_enc + b_enc``, ``x_hat = (f W_dec + b_dec) / s`` the same
SAE is ``W_enc = fc1.weight^T``, ``W_dec = fc2.weight^T``, ``b_dec = fc2.bias`` and ``b_enc = fc1.bias +
fc2.bias @ fc1.weight^T``, ``act_scale = s``: the reconstruction equals ``fc2(relu(fc1(s x))) / s`` exactly up
to float rounding (tested). ``--out`` becomes an SAE folder (``sae.safetensors`` + ``cfg.json``, plus the
run record) that every script taking ``--sae`` loads.

    python sae/import_sae.py --checkpoint sae_final_layer24_8x_norm.pkl --out runs/paper-sae-l24
    python sae/import_sae.py --hub flybamboo/vlm-saes --file sae_final_layer8_8x_norm.pkl --out runs/paper-sae-l8
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from lineofsight.run import Run, lifecycle

OUTPUTS = ("sae.safetensors", "cfg.json")
PAPER_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"


@dataclasses.dataclass
class Config:
    """Options for importing a released SAE."""

    checkpoint: Path | None = None
    """The released file (e.g. sae_final_layer24_8x_norm.pkl), downloaded beforehand; or --hub and --file."""
    hub: str | None = None
    """Download from this Hugging Face repository instead (the paper's: flybamboo/vlm-saes), with --file."""
    file: str | None = None
    """With --hub: the file in the repository (e.g. sae_final_layer24_8x_norm.pkl)."""
    layer: int | None = None
    """Residual-stream layer it reads (input of decoder block L); default: the number after 'layer' in the file name."""
    scale: float = 8.0
    """Activation scale s: latents relu(fc1(s x)), reconstruction fc2(f) / s (the paper's evaluation: 8)."""
    model: str = PAPER_MODEL
    """The model the SAE reads (recorded in cfg.json; scripts check it against their --model)."""
    resize: int | None = 336
    """Square side the training images were resized to (recorded; consumers compare it with their --resize)."""
    out: Path = Path("runs/paper-sae")
    """The SAE folder to write (refused when it holds an earlier import, unless --overwrite)."""
    overwrite: bool = False
    """Replace the SAE an earlier import wrote in --out."""

    def __post_init__(self) -> None:
        import math

        from lineofsight.cli import UserError
        from lineofsight.data import check_resize

        if (self.checkpoint is None) == (self.hub is None) or (self.hub is None) != (self.file is None):
            raise UserError("give --checkpoint FILE, or --hub REPO with --file NAME")
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise UserError(f"--scale {self.scale}: must be a positive number")
        if self.layer is not None and self.layer < 0:
            raise UserError(f"--layer {self.layer} must be >= 0")
        check_resize(self.resize)


def download(repo: str, name: str) -> Path:
    """``name`` from the Hugging Face repository ``repo`` (the local cache when it is there); one line on failure."""
    from lineofsight.cli import UserError

    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo, filename=name))
    except Exception as err:  # offline, unknown repo or file, no network: all one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--hub {repo} --file {name}: cannot download ({type(err).__name__}: {first[:160]})") from None


def read_released(path: Path) -> dict[str, Any]:
    """The four tensors of a released checkpoint (``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``),
    ``module.`` prefixes removed; one-line errors for a file that is missing, not a tensor state dict, has
    other keys, or shapes that do not fit together."""
    import pickle

    import torch

    from lineofsight.cli import UserError

    if not path.is_file():
        raise UserError(f"--checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--checkpoint {path} is not a tensor state dict readable with weights_only=True ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--checkpoint {path} holds a {type(state).__name__}, not a state dict of tensors")
    tensors = {k.removeprefix("module."): v for k, v in state.items()}
    expected = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    if set(tensors) != expected:
        raise UserError(f"--checkpoint {path} has keys {sorted(tensors)}, expected {sorted(expected)} "
                        "(with or without 'module.')")
    d_sae, d_in = tensors["fc1.weight"].shape if tensors["fc1.weight"].dim() == 2 else (0, 0)
    shapes = {"fc1.weight": (d_sae, d_in), "fc1.bias": (d_sae,), "fc2.weight": (d_in, d_sae), "fc2.bias": (d_in,)}
    wrong = [f"{k} is {list(v.shape)}" for k, v in tensors.items() if tuple(v.shape) != shapes[k]]
    if not d_sae or wrong:
        raise UserError(f"--checkpoint {path}: shapes do not form an autoencoder: {'; '.join(wrong) or 'fc1.weight'}")
    return tensors


def convert(tensors: dict[str, Any], scale: float, **provenance: Any) -> Any:
    """The released autoencoder as a :class:`lineofsight.sae.SparseAutoencoder` (ReLU), float32."""
    import torch

    from lineofsight.sae import SAEConfig, SparseAutoencoder

    w1, b1 = tensors["fc1.weight"].float(), tensors["fc1.bias"].float()
    w2, b2 = tensors["fc2.weight"].float(), tensors["fc2.bias"].float()
    cfg = SAEConfig(d_in=w1.shape[1], d_sae=w1.shape[0], activation="relu", act_scale=float(scale), **provenance)
    sae = SparseAutoencoder(cfg, seed=None, device="meta")
    state = {"W_enc": w1.T.contiguous(), "W_dec": w2.T.contiguous(), "b_dec": b2.clone(), "b_enc": b1 + b2 @ w1.T}
    sae.load_state_dict({k: state[k] for k in sae.state_dict()}, assign=True)
    return sae.to(torch.float32)


@lifecycle("sae/import_sae.py", outputs=OUTPUTS)
def main(cfg: Config, run: Run) -> Path:
    from lineofsight.cli import UserError

    run.setup(seed=0, device="cpu")
    checkpoint = cfg.checkpoint if cfg.checkpoint is not None else download(cfg.hub, cfg.file)
    tensors = read_released(checkpoint)
    layer = cfg.layer
    if layer is None:
        found = re.search(r"layer(\d+)", checkpoint.name)
        if found is None:
            raise UserError(f"no layer in the file name {checkpoint.name}; pass --layer")
        layer = int(found.group(1))
    sae = convert(tensors, cfg.scale, model=cfg.model, layer=layer, resize=cfg.resize,
                  token_types=("image", "text_in_context", "text_only"))
    run.open(cfg.out, overwrite=cfg.overwrite)
    sae.save(run.out)
    run.finish(f"imported {checkpoint.name}: layer {layer}, d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}, "
               f"scale {cfg.scale:g}; SAE in {run.out}")
    return run.out


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
