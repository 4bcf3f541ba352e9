"""How sparse are steering vectors in an SAE's basis? Fit each with HardConcrete L0 gates over the
SAE's decoder rows (and, with ``--basis sae neurons``, over the model's MLP neuron directions),
against random directions as the baseline.

Each target vector ``v`` (a steering vector, or a random unit vector for the baseline) is
approximated by ``sum_j z_j c_j d_j`` over the unit-norm atoms ``d_j`` of a dictionary, with free
coefficients ``c_j`` and HardConcrete gates ``z_j`` (:mod:`lineofsight.sparse`; as in the paper:
beta 2/3, stretch (-0.1, 1.1), Adam). The loss is ``1 - cos(approx, v) + lambda * E[L0]``; a sweep
over lambda traces L0 against cosine. Every (vector, lambda) problem is independent and all of
them are fitted together as one batched tensor problem. At the end the gates are made
deterministic and L0 is the number of open gates.

Dictionaries (``--basis``): ``sae``, the SAE's decoder rows; ``neurons``, the output directions of
the MLP neurons of the decoder block before the layer (layer L reads the residual after block L-1,
so the columns of block L-1's down-projection: 14,336 on the 7B), the baseline that asks whether an
SAE beats the model's own neurons.

Outputs in ``--out``: ``approximation.json`` (per lambda: mean L0 and cosine of steering and random
vectors, and per vector; the SAE basis at the top level under ``steering``/``random``, the neuron
basis under ``neurons``), ``approximation.png`` (L0 vs cosine: every basis, steering and random),
the run record ``run.json`` and, with ``--export-lambda``, one folder ``vectors/lambda<value>/`` per
exported lambda in the layout of ``steering/compute_steering_vectors.py`` (written by
``lineofsight.steering.save_vectors``, with that lambda's mean L0 and cosine in its
``vectors.json``) holding the approximated vectors (rescaled to the originals' norms), ready for
``steering/eval_steering.py``. An earlier run's outputs in ``--out`` are replaced only with
``--overwrite``.

    python sae/approximate_steering_vectors.py --vectors runs/demo/vectors --sae runs/sae-l2/sae --out results/sae/approx
    python sae/approximate_steering_vectors.py --vectors runs/demo/vectors --sae runs/demo/sae/saes/L2 \\
        --basis sae neurons --export-lambda 0.001 0.003 --out results/sae/approx
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from lineofsight.models import Dtype
from lineofsight.run import Run, lifecycle

Basis = Literal["sae", "neurons"]


@dataclasses.dataclass
class Config:
    """Options for the sparse approximation of steering vectors."""

    vectors: Path = Path("runs/demo/vectors")
    """Folder written by steering/compute_steering_vectors.py."""
    sae: Path = Path("runs/sae/sae")
    """SAE folder (or trainer run folder) whose decoder rows form the dictionary (--basis sae)."""
    layer: int | None = None
    """Layer of the vectors to use: the input of decoder block L (hidden_states[L]); default: the SAE's layer
    (needed without --basis sae)."""
    basis: tuple[Basis, ...] = ("sae",)
    """Dictionaries to approximate in: 'sae' (the SAE's decoder rows) and/or 'neurons' (the MLP output
    directions of decoder block L-1, the last block that writes into layer L; not at layer 0)."""
    model: str | None = None
    """--basis neurons: the model (HF id, local directory or 'toy'); default: the model of the activation cache
    the vectors were computed from, else the SAE's model. Only its weights are read."""
    dtype: Dtype = "float32"
    """--basis neurons: dtype to load the model in (bfloat16 halves the 7B's memory; the directions are float32)."""
    lambdas: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    """L0 penalties to sweep."""
    steps: int = 1000
    """Adam steps."""
    lr: float = 1e-2
    """Adam learning rate (the paper: 1e-3, which needs several times more steps to close the gates)."""
    n_random: int | None = None
    """Random unit vectors for the baseline (default: as many as steering vectors)."""
    export_lambda: tuple[float, ...] = ()
    """Write the approximated vectors of each of these lambdas (each one of --lambdas) to <out>/vectors/lambda<value>:
    the SAE basis' approximations when --basis has sae, else the neurons'."""
    seed: int = 0
    """Seeds the random baseline and the gate noise."""
    device: str | None = None
    """Device: cpu, cuda or cuda:N (default: GPU if there is one, else cpu)."""
    out: Path = Path("runs/approx")
    """Output folder (refused when it holds an earlier run of this script, unless --overwrite)."""
    overwrite: bool = False
    """Replace the outputs of an earlier run in --out (other files there are kept)."""
    allow_resize_mismatch: bool = False
    """Run even when the vectors were computed from images of another size than the SAE's training images (a
    different image-token count and grid: normally a mistake)."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError

        if not self.lambdas or any(x < 0 for x in self.lambdas):
            raise UserError("--lambdas must be non-negative and not empty")
        if self.steps < 1:
            raise UserError("--steps must be positive")
        if self.n_random is not None and self.n_random < 1:
            raise UserError("--n-random must be positive (or left out: as many as steering vectors)")
        if self.lr <= 0:
            raise UserError("--lr must be positive")
        if not self.basis or len(set(self.basis)) != len(self.basis):
            raise UserError(f"--basis must name sae and/or neurons, each once (got {list(self.basis)})")
        for lam in self.export_lambda:
            if lam not in self.lambdas:
                raise UserError(f"--export-lambda {lam} is not one of --lambdas {list(self.lambdas)}")
        if len(set(self.export_lambda)) != len(self.export_lambda):
            raise UserError(f"--export-lambda lists a lambda twice: {list(self.export_lambda)}")
        if "sae" not in self.basis and self.layer is None:
            raise UserError("--basis neurons alone needs --layer (only an SAE gives a default layer)")
        if "neurons" in self.basis and self.layer == 0:
            raise UserError(NO_BLOCK_BEFORE_LAYER_0)


NO_BLOCK_BEFORE_LAYER_0 = ("--basis neurons at layer 0: no decoder block writes into layer 0 (the token embeddings); "
                           "use a layer >= 1")


def hard_concrete_fit(targets_VD: Any, dictionary_SD: Any, lambdas_V: Any, steps: int, lr: float,
                      seed: int = 0) -> dict[str, Any]:
    """Fit every row of ``targets_VD`` with its own gates and coefficients over ``dictionary_SD``
    (unit rows), with L0 penalty ``lambdas_V`` per row, all in one batched problem.

    Returns ``l0 [V]``, ``cosine [V]`` (deterministic gates), ``approx [V, D]`` and ``gates [V, S]``.
    """
    import torch
    import torch.nn.functional as F

    from lineofsight.sparse import deterministic_gates, expected_l0, sample_gates

    device = targets_VD.device
    gen = torch.Generator(device=device).manual_seed(seed)
    targets = F.normalize(targets_VD.float(), dim=-1)
    D = dictionary_SD.float()
    coef = (targets @ D.T).clone().requires_grad_(True)  # start at the projections
    log_alpha = torch.zeros_like(coef, requires_grad=True)
    opt = torch.optim.Adam([coef, log_alpha], lr=lr)
    lam = lambdas_V.float().to(device)[:, None]
    for _ in range(steps):
        approx = (sample_gates(log_alpha, gen) * coef) @ D
        cos = F.cosine_similarity(approx, targets, dim=-1)
        loss = ((1 - cos) + (lam * expected_l0(log_alpha)).sum(-1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = deterministic_gates(log_alpha)
        approx = (z * coef) @ D
        cos = F.cosine_similarity(approx, targets, dim=-1)
        cos = torch.where(approx.norm(dim=-1) > 0, cos, torch.zeros_like(cos))
    return {"l0": (z > 0).sum(-1), "cosine": cos, "approx": approx, "gates": z}


def random_unit(n: int, d: int, seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g)
    return v / v.norm(dim=-1, keepdim=True)


BASIS_STYLE = {"sae": ("SAE latents", "tab:red", "tab:gray"), "neurons": ("MLP neurons", "tab:blue", "tab:cyan")}
"""Per basis: its name on the plot, the colour of its steering vectors and of its random baseline."""


def sections(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The results of each basis (``steering`` and ``random``): the SAE's at the top level, the others by name."""
    return {basis: results if basis == "sae" else results[basis] for basis in results["bases"]}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lineofsight.io import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for basis, section in sections(results).items():
        label, steering_colour, random_colour = BASIS_STYLE[basis]
        for name, colour, style in (("steering", steering_colour, "o-"), ("random", random_colour, "s--")):
            rows = section[name]
            ax.scatter([r["l0"] for r in rows["per_vector"]], [r["cosine"] for r in rows["per_vector"]], s=8,
                       alpha=0.3, color=colour)
            xs = [rows["by_lambda"][k]["l0"] for k in rows["by_lambda"]]
            ys = [rows["by_lambda"][k]["cosine"] for k in rows["by_lambda"]]
            order = sorted(range(len(xs)), key=xs.__getitem__)
            ax.plot([xs[i] for i in order], [ys[i] for i in order], style, color=colour,
                    label=f"{name} vectors, {label} (mean per lambda)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("active atoms (L0)")
    ax.set_ylabel("cosine with the target vector")
    ax.set_title(f"Sparse approximation of steering vectors (layer {results['layer']})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def default_model(cfg: Config, info: dict[str, Any], sae: Any) -> str:
    """--basis neurons without --model: the model recorded with the vectors (``model`` in vectors.json, else the key
    of the activation cache they were computed from), else the SAE's model."""
    from lineofsight.cache import find_cache
    from lineofsight.cli import UserError
    from lineofsight.io import read_json

    if isinstance(info.get("model"), str) and info["model"]:
        return info["model"]
    if isinstance(info.get("activations"), str):
        try:
            meta = read_json(find_cache(info["activations"], "acts") / "metadata.json", "activation-cache metadata")
            model = meta.get("key", {}).get("model")
            if isinstance(model, str) and model:
                return model
        except UserError:
            pass  # the cache is gone or unreadable: fall back to the SAE's record
    if sae is not None and sae.cfg.model:
        return sae.cfg.model
    raise UserError(f"--basis neurons: no model is recorded with --vectors {cfg.vectors}; pass --model")


def neuron_directions(cfg: Config, info: dict[str, Any], sae: Any, layer: int, d_model: int) -> tuple[Any, dict]:
    """Unit output directions ``[d_mlp, d_model]`` of block ``layer - 1``'s MLP neurons (on the CPU), and what
    describes them in approximation.json."""
    from lineofsight.cli import UserError
    from lineofsight.models import check_layer, load_vlm, mlp_output_directions

    model_name = cfg.model or default_model(cfg, info, sae)
    model, _ = load_vlm(model_name, dtype=cfg.dtype, device="cpu")  # only the weights are read, no forward
    check_layer(model, layer)
    directions = mlp_output_directions(model, layer - 1)
    del model
    if directions.shape[1] != d_model:
        raise UserError(f"--model {model_name} has width {directions.shape[1]}, the steering vectors {d_model}")
    return directions, {"model": model_name, "block": layer - 1, "d_mlp": int(directions.shape[0])}


@lifecycle("sae/approximate_steering_vectors.py", outputs=("approximation.json", "approximation.png", "vectors"))
def main(cfg: Config, run: Run) -> dict[str, Any]:
    import time

    import torch

    from lineofsight.cli import UserError
    from lineofsight.data import check_resize_match, parse_pair, recorded_resize
    from lineofsight.sae import load_sae
    from lineofsight.steering import load_vectors

    start = time.perf_counter()
    run.setup(seed=cfg.seed, device=cfg.device)
    device = run.device
    sae = load_sae(cfg.sae, device) if "sae" in cfg.basis else None
    layer = cfg.layer if cfg.layer is not None else sae.cfg.layer
    if layer is None:
        raise UserError("the SAE's config has no layer; pass --layer")
    if sae is not None and sae.cfg.layer is not None and layer != sae.cfg.layer:
        raise UserError(f"--layer {layer}: the SAE reads layer {sae.cfg.layer}")
    if "neurons" in cfg.basis and layer == 0:
        raise UserError(NO_BLOCK_BEFORE_LAYER_0)
    vectors, info = load_vectors(cfg.vectors, layer)
    if sae is not None:
        check_resize_match(sae.cfg.resize, recorded_resize(info), f"the steering vectors in {cfg.vectors}",
                           cfg.allow_resize_mismatch, reader=f"the SAE {cfg.sae}")
    if not vectors:
        raise UserError(f"--vectors {cfg.vectors} holds no vectors for layer {layer}")
    names = sorted(vectors)
    pairs = [parse_pair(n) for n in names]
    if any(p is None for p in pairs):
        raise UserError(f"--vectors {cfg.vectors}: a vector name is not of the form src@tgt: {names}")
    V = torch.stack([vectors[n].float() for n in names]).to(device)
    dictionaries, results = {}, {"layer": layer, "lambdas": list(cfg.lambdas), "bases": list(cfg.basis)}
    if sae is not None:
        if V.shape[1] != sae.cfg.d_in:
            raise UserError(f"steering vectors have width {V.shape[1]}, the SAE's d_in is {sae.cfg.d_in}")
        dictionaries["sae"] = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=-1)
        results["d_sae"] = sae.cfg.d_sae
    if "neurons" in cfg.basis:
        directions, described = neuron_directions(cfg, info, sae, layer, V.shape[1])
        dictionaries["neurons"] = directions.to(device)
        results["neurons"] = described
    run.open(cfg.out, overwrite=cfg.overwrite)

    R = random_unit(len(names) if cfg.n_random is None else cfg.n_random, V.shape[1], cfg.seed + 1).to(device)
    lambdas = torch.tensor(cfg.lambdas, dtype=torch.float32)
    steering_fits = {}
    for basis in cfg.basis:
        section = results if basis == "sae" else results[basis]
        for name, targets in (("steering", V), ("random", R)):
            run.check_alive()
            n = len(targets)
            tiled = targets.repeat(len(lambdas), 1)  # lambda-major: row = i_lambda * n + i_vector
            fit = hard_concrete_fit(tiled, dictionaries[basis], lambdas.repeat_interleave(n), cfg.steps, cfg.lr,
                                    cfg.seed)
            if name == "steering":
                steering_fits[basis] = fit
            per_vector, by_lambda = [], {}
            for i_lam, lam in enumerate(cfg.lambdas):
                rows = slice(i_lam * n, (i_lam + 1) * n)
                l0, cos = fit["l0"][rows].float(), fit["cosine"][rows]
                by_lambda[str(lam)] = {"l0": float(l0.mean()), "cosine": float(cos.mean()),
                                       "l0_median": float(l0.median())}
                for j in range(n):
                    per_vector.append({"vector": names[j] if name == "steering" else f"random{j}", "lambda": lam,
                                       "l0": int(l0[j]), "cosine": float(cos[j])})
            section[name] = {"by_lambda": by_lambda, "per_vector": per_vector}

    plot(results, run.out / "approximation.png")
    exported = "sae" if "sae" in cfg.basis else "neurons"
    for lam in cfg.export_lambda:
        export_vectors(cfg, run.out / "vectors" / f"lambda{lam:g}", lam, exported, steering_fits[exported], pairs, V,
                       layer, info)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    for basis, section in sections(results).items():
        print(f"basis {basis} ({BASIS_STYLE[basis][0]}):")
        print(f"{'lambda':>8} {'steering L0':>12} {'cos':>6} {'random L0':>10} {'cos':>6}")
        for lam in cfg.lambdas:
            s, r = section["steering"]["by_lambda"][str(lam)], section["random"]["by_lambda"][str(lam)]
            print(f"{lam:>8g} {s['l0']:>12.1f} {s['cosine']:>6.3f} {r['l0']:>10.1f} {r['cosine']:>6.3f}")
    exports = ", ".join(f"lambda{lam:g}" for lam in cfg.export_lambda)
    return run.finish(f"wrote {run.out}/approximation.json and approximation.png"
                      + (f" and vectors/{{{exports}}} ({exported} basis)" if exports else "")
                      + f" for {len(names)} steering vectors at layer {layer}, bases {', '.join(cfg.basis)}",
                      results, "approximation.json")


def export_vectors(cfg: Config, folder: Path, lam: float, basis: str, fit: dict[str, Any],
                   pairs: list[tuple[str, str]], V: Any, layer: int, info: dict[str, Any]) -> None:
    """The approximations of ``lam`` in ``basis``, rescaled to the original vectors' norms, as a steering-vector
    folder (:func:`lineofsight.steering.save_vectors`) whose vectors.json also holds their L0 and cosine."""
    from lineofsight.steering import save_vectors

    n = len(pairs)
    i_lam = cfg.lambdas.index(lam)
    rows = slice(i_lam * n, (i_lam + 1) * n)
    approx, l0, cos = fit["approx"][rows], fit["l0"][rows], fit["cosine"][rows]
    scaled = approx / approx.norm(dim=-1, keepdim=True).clamp(min=1e-12) * V.norm(dim=-1, keepdim=True)
    derived = ("vectors", "provenance", "layers", "pairs", "d_model")  # save_vectors derives these
    save_vectors(folder, {(src, tgt, layer): scaled[i].cpu() for i, (src, tgt) in enumerate(pairs)}, {
        **{k: v for k, v in info.items() if k not in derived},
        "method": f"{basis}-approx(lambda={lam})", "source": str(cfg.vectors),
        **({"sae": str(cfg.sae)} if basis == "sae" else {}), "basis": basis, "lambda": lam,
        "mean_l0": float(l0.float().mean()), "mean_cosine": float(cos.mean()),
        "vectors": [{"src": src, "tgt": tgt, "layer": layer, "norm": float(V[i].norm()), "l0": int(l0[i]),
                     "cosine": float(cos[i])} for i, (src, tgt) in enumerate(pairs)],
    })


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
