"""How sparse are steering vectors in an SAE's basis? Fit each with HardConcrete L0 gates over the
SAE's decoder rows, against random directions as the baseline.

Each target vector ``v`` (a steering vector, or a random unit vector for the baseline) is
approximated by ``sum_j z_j c_j d_j`` over the unit-norm decoder rows ``d_j``, with free
coefficients ``c_j`` and HardConcrete gates ``z_j`` (Louizos et al.; as in the paper: beta 2/3,
stretch (-0.1, 1.1), Adam). The loss is ``1 - cos(approx, v) + lambda * E[L0]``; a sweep
over lambda traces L0 against cosine. Every (vector, lambda) problem is independent and all of
them are fitted together as one batched tensor problem. At the end the gates are made
deterministic (``clamp(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)``) and L0 is the number
of open gates.

Outputs in ``--out``: ``approximation.json`` (per lambda: mean L0 and cosine of steering and random
vectors, and per vector), ``approximation.png`` (L0 vs cosine, both sets), the run record
``run.json`` and, with ``--export-lambda``, ``vectors/`` in the layout of
``steering/compute_steering_vectors.py`` (written by ``lineofsight.steering.save_vectors``) holding
the approximated vectors (rescaled to the originals' norms), ready for ``steering/eval_steering.py``.
An earlier run's outputs in ``--out`` are replaced only with ``--overwrite``.

    python sae/approximate_steering_vectors.py --vectors runs/demo/vectors --sae runs/sae-l2/sae --out results/sae/approx
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lineofsight.run import Run, lifecycle

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


@dataclasses.dataclass
class Config:
    """Options for the sparse approximation of steering vectors."""

    vectors: Path = Path("runs/demo/vectors")
    """Folder written by steering/compute_steering_vectors.py."""
    sae: Path = Path("runs/sae/sae")
    """SAE folder (or trainer run folder) whose decoder rows form the dictionary."""
    layer: int | None = None
    """Layer of the vectors to use: the input of decoder block L (hidden_states[L]); default: the SAE's layer."""
    lambdas: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    """L0 penalties to sweep."""
    steps: int = 1000
    """Adam steps."""
    lr: float = 1e-2
    """Adam learning rate (the paper: 1e-3, which needs several times more steps to close the gates)."""
    n_random: int | None = None
    """Random unit vectors for the baseline (default: as many as steering vectors)."""
    export_lambda: float | None = None
    """Write the approximated vectors of this lambda (one of --lambdas) to <out>/vectors."""
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
        if self.export_lambda is not None and self.export_lambda not in self.lambdas:
            raise UserError(f"--export-lambda {self.export_lambda} is not one of --lambdas {list(self.lambdas)}")


def hard_concrete_fit(targets_VD: Any, dictionary_SD: Any, lambdas_V: Any, steps: int, lr: float,
                      seed: int = 0) -> dict[str, Any]:
    """Fit every row of ``targets_VD`` with its own gates and coefficients over ``dictionary_SD``
    (unit rows), with L0 penalty ``lambdas_V`` per row, all in one batched problem.

    Returns ``l0 [V]``, ``cosine [V]`` (deterministic gates), ``approx [V, D]`` and ``gates [V, S]``.
    """
    import torch
    import torch.nn.functional as F

    device = targets_VD.device
    gen = torch.Generator(device=device).manual_seed(seed)
    targets = F.normalize(targets_VD.float(), dim=-1)
    D = dictionary_SD.float()
    coef = (targets @ D.T).clone().requires_grad_(True)  # start at the projections
    log_alpha = torch.zeros_like(coef, requires_grad=True)
    opt = torch.optim.Adam([coef, log_alpha], lr=lr)
    l0_shift = BETA * torch.log(torch.tensor(-GAMMA / ZETA))
    lam = lambdas_V.float().to(device)[:, None]
    for _ in range(steps):
        u = torch.rand(coef.shape, generator=gen, device=device).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / BETA)
        z = (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        approx = (z * coef) @ D
        cos = F.cosine_similarity(approx, targets, dim=-1)
        expected_l0 = torch.sigmoid(log_alpha - l0_shift)
        loss = ((1 - cos) + (lam * expected_l0).sum(-1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        approx = (z * coef) @ D
        cos = F.cosine_similarity(approx, targets, dim=-1)
        cos = torch.where(approx.norm(dim=-1) > 0, cos, torch.zeros_like(cos))
    return {"l0": (z > 0).sum(-1), "cosine": cos, "approx": approx, "gates": z}


def random_unit(n: int, d: int, seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g)
    return v / v.norm(dim=-1, keepdim=True)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lineofsight.io import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, colour in (("steering", "tab:red"), ("random", "tab:gray")):
        rows = results[name]
        ax.scatter([r["l0"] for r in rows["per_vector"]], [r["cosine"] for r in rows["per_vector"]], s=8,
                   alpha=0.3, color=colour)
        xs = [rows["by_lambda"][k]["l0"] for k in rows["by_lambda"]]
        ys = [rows["by_lambda"][k]["cosine"] for k in rows["by_lambda"]]
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-", color=colour,
                label=f"{name} vectors (mean per lambda)")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("active SAE latents (L0)")
    ax.set_ylabel("cosine with the target vector")
    ax.set_title(f"Sparse approximation by SAE decoder rows (layer {results['layer']})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


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
    sae = load_sae(cfg.sae, device)
    layer = cfg.layer if cfg.layer is not None else sae.cfg.layer
    if layer is None:
        raise UserError("the SAE's config has no layer; pass --layer")
    if sae.cfg.layer is not None and layer != sae.cfg.layer:
        raise UserError(f"--layer {layer}: the SAE reads layer {sae.cfg.layer}")
    vectors, info = load_vectors(cfg.vectors, layer)
    check_resize_match(sae.cfg.resize, recorded_resize(info), f"the steering vectors in {cfg.vectors}",
                       cfg.allow_resize_mismatch, reader=f"the SAE {cfg.sae}")
    if not vectors:
        raise UserError(f"--vectors {cfg.vectors} holds no vectors for layer {layer}")
    names = sorted(vectors)
    pairs = [parse_pair(n) for n in names]
    if any(p is None for p in pairs):
        raise UserError(f"--vectors {cfg.vectors}: a vector name is not of the form src@tgt: {names}")
    V = torch.stack([vectors[n].float() for n in names]).to(device)
    if V.shape[1] != sae.cfg.d_in:
        raise UserError(f"steering vectors have width {V.shape[1]}, the SAE's d_in is {sae.cfg.d_in}")
    run.open(cfg.out, overwrite=cfg.overwrite)

    D = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=-1)
    R = random_unit(len(names) if cfg.n_random is None else cfg.n_random, V.shape[1], cfg.seed + 1).to(device)
    lambdas = torch.tensor(cfg.lambdas, dtype=torch.float32)
    results: dict[str, Any] = {"layer": layer, "lambdas": list(cfg.lambdas), "d_sae": sae.cfg.d_sae}
    fits = {}
    for name, targets in (("steering", V), ("random", R)):
        run.check_alive()
        n = len(targets)
        tiled = targets.repeat(len(lambdas), 1)  # lambda-major: row = i_lambda * n + i_vector
        fit = hard_concrete_fit(tiled, D, lambdas.repeat_interleave(n), cfg.steps, cfg.lr, cfg.seed)
        fits[name] = fit
        per_vector, by_lambda = [], {}
        for i_lam, lam in enumerate(cfg.lambdas):
            rows = slice(i_lam * n, (i_lam + 1) * n)
            l0, cos = fit["l0"][rows].float(), fit["cosine"][rows]
            by_lambda[str(lam)] = {"l0": float(l0.mean()), "cosine": float(cos.mean()),
                                   "l0_median": float(l0.median())}
            for j in range(n):
                per_vector.append({"vector": names[j] if name == "steering" else f"random{j}", "lambda": lam,
                                   "l0": int(l0[j]), "cosine": float(cos[j])})
        results[name] = {"by_lambda": by_lambda, "per_vector": per_vector}

    plot(results, run.out / "approximation.png")
    if cfg.export_lambda is not None:
        export_vectors(cfg, run.out / "vectors", fits["steering"], pairs, V, layer, info)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"{'lambda':>8} {'steering L0':>12} {'cos':>6} {'random L0':>10} {'cos':>6}")
    for lam in cfg.lambdas:
        s, r = results["steering"]["by_lambda"][str(lam)], results["random"]["by_lambda"][str(lam)]
        print(f"{lam:>8g} {s['l0']:>12.1f} {s['cosine']:>6.3f} {r['l0']:>10.1f} {r['cosine']:>6.3f}")
    return run.finish(f"wrote {run.out}/approximation.json and approximation.png"
                      + (f" and vectors/ (lambda {cfg.export_lambda})" if cfg.export_lambda is not None else "")
                      + f" for {len(names)} steering vectors at layer {layer}", results, "approximation.json")


def export_vectors(cfg: Config, folder: Path, fit: dict[str, Any], pairs: list[tuple[str, str]], V: Any, layer: int,
                   info: dict[str, Any]) -> None:
    """The approximations of ``--export-lambda``, rescaled to the original vectors' norms, as a
    steering-vector folder (:func:`lineofsight.steering.save_vectors`)."""
    from lineofsight.steering import save_vectors

    n = len(pairs)
    i_lam = cfg.lambdas.index(cfg.export_lambda)
    approx = fit["approx"][i_lam * n : (i_lam + 1) * n]
    scaled = approx / approx.norm(dim=-1, keepdim=True).clamp(min=1e-12) * V.norm(dim=-1, keepdim=True)
    derived = ("vectors", "provenance", "layers", "pairs", "d_model")  # save_vectors derives these
    save_vectors(folder, {(src, tgt, layer): scaled[i].cpu() for i, (src, tgt) in enumerate(pairs)}, {
        **{k: v for k, v in info.items() if k not in derived},
        "method": f"sae-approx(lambda={cfg.export_lambda})", "source": str(cfg.vectors), "sae": str(cfg.sae),
        "vectors": [{"src": src, "tgt": tgt, "layer": layer, "norm": float(V[i].norm())}
                    for i, (src, tgt) in enumerate(pairs)],
    })


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
