"""Import one of the paper's released SAEs (Hugging Face ``flybamboo/vlm-saes``) as an SAE folder of this project.

The released files (``sae_final_layer{8,12,16,20,24}_8x_norm.pkl``) are ``torch.save``d state dicts of an
``nn.DataParallel``-wrapped ReLU autoencoder: ``module.fc1.weight [d_sae, d_in]``, ``module.fc1.bias [d_sae]``,
``module.fc2.weight [d_in, d_sae]``, ``module.fc2.bias [d_in]``; latents ``relu(fc1(s x))``, reconstruction
``fc2(f) / s``, with ``s`` = 8 in the paper's evaluation code (``--scale``, the default). "Layer L" is the input of
decoder block L, this project's convention too (read from the file name, or ``--layer``). The file is read with
``torch.load(weights_only=True)``: nothing in it is unpickled beyond tensors and plain containers.

In this project's formula ``pre = (s x - b_dec) W_enc + b_enc``, ``x_hat = (f W_dec + b_dec) / s`` the same
SAE is ``W_enc = fc1.weight^T``, ``W_dec = fc2.weight^T``, ``b_dec = fc2.bias`` and ``b_enc = fc1.bias +
fc2.bias @ fc1.weight^T``, ``act_scale = s``: the reconstruction equals ``fc2(relu(fc1(s x))) / s`` exactly up
to float rounding (tested). ``--out`` becomes an SAE folder (``sae.safetensors`` + ``cfg.json``, plus the
run record) that every script taking ``--sae`` loads.

**``--scale auto``.** The released SAEs were trained on residuals rescaled to mean norm 64 = sqrt(4096), while the
paper's evaluation code multiplies by 8 at every layer, so the scale that fits may differ by layer. With ``--scale
auto`` the script loads ``--model``, reads the SAE's layer over ``--limit`` records of ``--data`` (all three token
types, as the SAE was trained) and takes ``s = sqrt(d_in) / mean ||x||`` (:func:`lineofsight.sae.act_scale_of`, the
scale this project's trainer uses). It then evaluates the SAE at ``s`` = 8 and at the measured ``s`` on the same
records (:func:`lineofsight.sae_eval.evaluate`: FVU per token type, CE loss recovered with the reconstruction spliced
in at the image / caption / all positions), prints both rows and writes them to ``scale.json``; the SAE written uses
the measured scale. ``--resize`` is both what cfg.json records as the training images' size and the size the
measuring records are read at. Without ``auto`` no model is loaded.

    python sae/import_sae.py --checkpoint sae_final_layer24_8x_norm.pkl --out runs/paper-sae-l24
    python sae/import_sae.py --hub flybamboo/vlm-saes --file sae_final_layer8_8x_norm.pkl --out runs/paper-sae-l8
    python sae/import_sae.py --hub flybamboo/vlm-saes --file sae_final_layer8_8x_norm.pkl --scale auto \\
        --dtype bfloat16 --data /data/sharegpt4v/sharegpt4v_instruct_gpt4-vision_cap100k.json \\
        --image-root /data/sharegpt4v --out runs/paper-sae-l8
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any

import tyro

from lineofsight.data import HeldOutRecords
from lineofsight.run import Run, lifecycle

OUTPUTS = ("sae.safetensors", "cfg.json", "scale.json")
PAPER_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"
PAPER_SCALE = 8.0
"""The activation scale of the paper's evaluation code (inputs times 8, outputs divided by 8)."""
AUTO = "auto"
"""``--scale auto``: measure the scale on ``--model``'s residuals."""


@dataclasses.dataclass
class Config(HeldOutRecords):
    """Options for importing a released SAE."""

    checkpoint: Path | None = None
    """The released file (e.g. sae_final_layer24_8x_norm.pkl), downloaded beforehand; or --hub and --file."""
    hub: str | None = None
    """Download from this Hugging Face repository instead (the paper's: flybamboo/vlm-saes), with --file."""
    file: str | None = None
    """With --hub: the file in the repository (e.g. sae_final_layer24_8x_norm.pkl)."""
    layer: int | None = None
    """Residual-stream layer it reads (input of decoder block L); default: the number after 'layer' in the file name."""
    scale: str = f"{PAPER_SCALE:g}"
    """Activation scale s: latents relu(fc1(s x)), reconstruction fc2(f) / s. A positive number (the paper's
    evaluation: 8), or 'auto': sqrt(d_in) / mean ||x|| measured on --model at the SAE's layer over the records of the
    file --data, with FVU and CE loss recovered at 8 and at the measured scale written to scale.json."""
    model: str = PAPER_MODEL
    """The model the SAE reads (recorded in cfg.json; scripts check it against their --model); with --scale auto it
    is loaded and measured: 'toy', an HF id or a local directory."""
    limit: int | None = 16
    """With --scale auto: measure and evaluate on at most N records."""
    resize: int | None = 336
    """Square side the training images were resized to (recorded; consumers compare it with their --resize); with the
    option --scale auto also the size the records' images are read at."""
    allow_resize_mismatch: Annotated[bool, tyro.conf.Suppress] = False
    """Not an option here (hidden): the one --resize is both the SAE's and the measuring records', nothing to mismatch."""
    out: Path = Path("runs/paper-sae")
    """The SAE folder to write (refused when it holds an earlier import, unless --overwrite)."""
    overwrite: bool = False
    """Replace the SAE an earlier import wrote in --out."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError

        super().__post_init__()
        if (self.checkpoint is None) == (self.hub is None) or (self.hub is None) != (self.file is None):
            raise UserError("give --checkpoint FILE, or --hub REPO with --file NAME")
        self.scale_value()
        if self.layer is not None and self.layer < 0:
            raise UserError(f"--layer {self.layer} must be >= 0")

    def scale_value(self) -> float | None:
        """``--scale`` as a number, None for ``auto``; :class:`UserError` for anything else."""
        import math

        from lineofsight.cli import UserError

        if self.scale == AUTO:
            return None
        try:
            value = float(self.scale)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"--scale {self.scale}: must be a positive number or '{AUTO}'")
        return value


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
    from lineofsight.harvest import TOKEN_TYPES

    scale = cfg.scale_value()
    run.setup(seed=0, device=cfg.device if scale is None else "cpu")
    checkpoint = cfg.checkpoint if cfg.checkpoint is not None else download(cfg.hub, cfg.file)
    tensors = read_released(checkpoint)
    layer = cfg.layer
    if layer is None:
        found = re.search(r"layer(\d+)", checkpoint.name)
        if found is None:
            raise UserError(f"no layer in the file name {checkpoint.name}; pass --layer")
        layer = int(found.group(1))
    provenance = {"model": cfg.model, "layer": layer, "resize": cfg.resize, "token_types": TOKEN_TYPES}
    if scale is None:
        sae, report, skips = measure_scale(cfg, run, tensors, provenance)
        scale = sae.cfg.act_scale
        rows = report["scales"]
        compared = "; ".join(f"at {scale_label(key, row['scale'])}: FVU {row['fvu']['all']:.3f}, CE recovered "
                             f"{row['ce_recovered']['all']:.3f}" for key, row in rows.items())
        sae.save(run.out)
        run.finish(f"imported {checkpoint.name}: layer {layer}, d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}, "
                   f"scale {scale:.4g} measured on {report['n_records']} records ({compared}); SAE in {run.out}, "
                   f"both scales in {run.out / 'scale.json'}; {skips.summary()}", report, "scale.json")
        return run.out
    sae = convert(tensors, scale, **provenance)
    run.open(cfg.out, overwrite=cfg.overwrite)
    sae.save(run.out)
    run.finish(f"imported {checkpoint.name}: layer {layer}, d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}, "
               f"scale {scale:g}; SAE in {run.out}")
    return run.out


REPORTED = ("fvu", "ce_recovered", "l0", "cosine", "dead_frac", "n_tokens", "ce", "n_caption_tokens")
"""What scale.json keeps of :func:`lineofsight.sae_eval.evaluate`'s metrics per scale."""


def measure_scale(cfg: Config, run: Run, tensors: dict[str, Any], provenance: dict[str, Any]
                  ) -> tuple[Any, dict[str, Any], Any]:
    """``--scale auto``: load ``--model``, measure ``sqrt(d_in) / mean ||x||`` at the SAE's layer over the records
    (every token type the SAE reads), evaluate the SAE at :data:`PAPER_SCALE` and at the measured scale on the same
    records, and take ``--out``. Returns the SAE at the measured scale (on the CPU), scale.json's contents and the
    :class:`lineofsight.data.SkipCounter` of unreadable images."""
    import time

    import torch

    from lineofsight.cli import UserError
    from lineofsight.data import SkipCounter
    from lineofsight.harvest import Harvester, record_batches
    from lineofsight.models import check_model
    from lineofsight.sae import act_scale_of, check_sae_fits
    from lineofsight.sae_eval import evaluate
    from lineofsight.toy import ensure_toy_world

    start = time.perf_counter()
    ensure_toy_world(cfg.data)
    records = cfg.read_records()
    model_source = check_model(cfg.model)
    model, processor = run.load_model(cfg.model, cfg.dtype)
    provenance = {**provenance, "model": model_source}
    paper = convert(tensors, PAPER_SCALE, **provenance).to(run.device).eval()
    layer = check_sae_fits(paper, model, model_source, None)
    harvester = Harvester(model, processor, [layer], max_caption_tokens=cfg.max_caption_tokens,
                          types=provenance["token_types"])
    harvester.check_boundary(records[0].caption)
    run.open(cfg.out, overwrite=cfg.overwrite)

    skips = SkipCounter()
    # The records are read once (images decoded and preprocessed) and run three times: the measurement and the
    # evaluation at each scale. A few records: at the 7B, --limit 16 holds tens of MB of pixels, and the measured
    # residuals (~1,400 tokens a record, float32 on the CPU) ~0.4 GB.
    batches = [batch for batch in record_batches(records, range(len(records)), cfg.root, cfg.batch_size, skips,
                                                 cfg.load_threads, resize=cfg.resize, prepare=harvester.prepare)
               if batch[0]]
    if not batches:
        raise UserError(f"none of the {len(records)} records' images could be read ({skips.summary()})")
    x_ND = torch.cat([harvester(captions, images, idx).acts[:, 0] for idx, captions, images in batches])
    measured = act_scale_of(x_ND)
    del x_ND
    rows: dict[str, Any] = {}
    for key, sae in ((f"{PAPER_SCALE:g}", paper),
                     (AUTO, convert(tensors, measured, **provenance).to(run.device).eval())):
        run.check_alive()
        # dense_threshold 1: no latent counts as dense (dense fractions are not reported here)
        metrics = evaluate(model, sae, harvester, batches, dense_threshold=1.0)
        rows[key] = {"scale": sae.cfg.act_scale, **{k: metrics[k] for k in REPORTED}}
    print_scales(rows)
    report = {"scales": rows, "chosen": AUTO, "layer": layer, "model": model_source, "data": str(cfg.data),
              "n_records": len(records), "offset": cfg.offset, "resize": cfg.resize, "skipped": skips.to_dict(),
              "wall_s": round(time.perf_counter() - start, 1)}
    return sae.to("cpu"), report, skips


def print_scales(rows: dict[str, Any]) -> None:
    """One row per scale: FVU per token group (text: the caption in context), CE loss recovered per splice."""
    from lineofsight.sae_eval import GROUPS, SPLICES

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    short = {"text_in_context": "text", "text_only": "text-only"}
    columns = [f"FVU {short.get(g, g)}" for g in GROUPS] + [f"CE rec {s}" for s in SPLICES]
    print(f"{'scale':<16}" + "".join(f"{c:>14}" for c in columns))
    for key, row in rows.items():
        values = [fmt(row["fvu"][g]) for g in GROUPS] + [fmt(row["ce_recovered"][s]) for s in SPLICES]
        print(f"{scale_label(key, row['scale']):<16}" + "".join(f"{v:>14}" for v in values))


def scale_label(key: str, scale: float) -> str:
    """``8``, or ``auto (0.6078)``: a row of scale.json as the table and the summary name it."""
    return f"{key} ({scale:.4g})" if key == AUTO else key


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
