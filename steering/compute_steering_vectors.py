"""Class steering vectors from a pooled-activation cache: one per class pair and layer.

``--method diff`` (the paper's): ``v = mean(acts[tgt]) - mean(acts[src])`` over the cached
mean image-token residuals of each class. ``--method probe``: the direction of the binary
``src@tgt`` probe from ``probes/train_probe.py --pairs`` (raw residual space), rescaled to the
norm of the diff-of-means vector so that a strength ``k`` means the same for both methods.

Writes ``<out>/vectors.safetensors`` (keys ``"{src}@{tgt}/{layer}"``, each ``[d_model]``) and
``<out>/vectors.json`` (per vector: pair, layer, norm, images per class; the cache and method).

    python steering/compute_steering_vectors.py --activations runs/acts \\
        --pairs data/toy/world/class_pairs.txt --out runs/vectors
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from lineofsight.run import Run, lifecycle


@dataclasses.dataclass
class Config:
    """Options for computing steering vectors."""

    activations: Path
    """Activation cache from probes/compute_image_activations.py (the cache folder or the --out given to it)."""
    pairs: Path
    """File of src@tgt lines (class names as in the cache)."""
    out: Path = Path("runs/vectors")
    """Output folder for vectors.safetensors and vectors.json."""
    method: Literal["diff", "probe"] = "diff"
    """'diff': difference of class means (the paper); 'probe': binary probe direction, rescaled to the diff norm."""
    probes: Path | None = None
    """With --method probe: the --out folder of probes/train_probe.py --pairs."""
    n_pairs: int | None = None
    """Use only the first N pairs of the file (default: all)."""
    layers: tuple[int, ...] = ()
    """Layers to compute (default: every layer of the cache). Layer L = input of decoder block L (= hidden_states[L])."""
    overwrite: bool = False
    """Replace the vectors of an earlier run of this script in --out (nothing else in it is touched)."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError

        if self.method == "probe" and self.probes is None:
            raise UserError("--method probe needs --probes (the output folder of train_probe.py --pairs)")
        if self.n_pairs is not None and self.n_pairs < 1:
            raise UserError("--n-pairs must be positive")


@lifecycle("steering/compute_steering_vectors.py", outputs=("vectors.safetensors", "vectors.json"))
def main(cfg: Config, run: Run) -> Path:
    from lineofsight.cache import read_activation_cache
    from lineofsight.cli import UserError
    from lineofsight.data import pair_key, read_class_pairs
    from lineofsight.probes import load_pair_probes
    from lineofsight.steering import save_vectors

    run.setup(seed=0, device="cpu")
    cache = read_activation_cache(cfg.activations)
    meta = cache["meta"]
    names: list[str] = meta["class_names"]
    to_name = {label: name for label, name in zip(meta["class_labels"], names)}
    labels = [to_name[int(label)] for label in cache["labels"]]
    pairs = read_class_pairs(cfg.pairs)[: cfg.n_pairs]
    layers = list(cfg.layers) or list(meta["layers"])
    for layer in layers:
        if layer not in meta["layers"]:
            raise UserError(f"--layers {layer} is not in the cache (cached layers: {meta['layers']})")
    by_class: dict[str, list[int]] = {}
    for i, name in enumerate(labels):
        by_class.setdefault(name, []).append(i)
    for src, tgt in pairs:
        for name in (src, tgt):
            if name not in by_class:
                from difflib import get_close_matches

                close = get_close_matches(name, names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise UserError(f"class {name!r} of --pairs has no images in the activation cache{hint}")

    probe_dirs = {layer: load_pair_probes(cfg.probes, layer) for layer in layers} if cfg.method == "probe" else {}
    for layer, dirs in probe_dirs.items():
        for src, tgt in pairs:
            if pair_key(src, tgt) not in dirs:
                raise UserError(f"--probes has no binary probe for {pair_key(src, tgt)} at layer {layer}")
    run.open(cfg.out, overwrite=cfg.overwrite)

    vectors, entries = {}, []
    for layer in layers:
        li = meta["layers"].index(layer)
        acts = cache["acts"][:, li]
        for src, tgt in pairs:
            mean_src = acts[by_class[src]].mean(0)
            mean_tgt = acts[by_class[tgt]].mean(0)
            v = mean_tgt - mean_src
            if probe_dirs:
                direction = probe_dirs[layer][pair_key(src, tgt)].float()
                v = direction / direction.norm() * v.norm()
            vectors[(src, tgt, layer)] = v
            entries.append({"src": src, "tgt": tgt, "layer": layer, "norm": float(v.norm()),
                            "n_src": len(by_class[src]), "n_tgt": len(by_class[tgt]),
                            "mean_src_norm": float(mean_src.norm()), "mean_tgt_norm": float(mean_tgt.norm())})
    key = meta.get("key", {})
    resize = {"resize": key["resize"]} if "resize" in key else {}  # the images' size, for every consumer to check
    save_vectors(run.out, vectors, {"method": cfg.method, "activations": str(cfg.activations), "pool": meta["pool"],
                                    **resize, "vectors": entries})
    run.finish(f"wrote {len(vectors)} vectors ({len(pairs)} pairs x {len(layers)} layers, method {cfg.method}) "
               f"to {run.out}")
    return run.out


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
