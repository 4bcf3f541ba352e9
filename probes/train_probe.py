"""Linear probes for image class, one per layer, on a cache from compute_image_activations.py.

Per layer: a multiclass linear probe on the pooled residual (features standardised with the
training split's mean and std), trained with Adam and cross-entropy, weight decay, and early
stopping on a validation part of the training split; the seeded 80/20 train/test split is the
same for every layer. With ``--pairs`` also a binary probe per ``src@tgt`` pair and layer, whose
weight direction the steering scripts can use (``--method probe``).

With ``--features sae --sae <dir>`` it also probes the SAE's latents at its layer: a probe on all
latents and sparse probes on the m latents that separate the classes best (accuracy vs L0,
``sae_probe_accuracy.png``). ``--sparse hardconcrete`` adds, per ``--pairs`` pair and per L0 penalty
of ``--sparse-lambdas``, a binary logistic probe on the latents with HardConcrete L0 gates
(:mod:`lineofsight.sparse`; loss = BCE + lambda * E[L0], deterministic gates at the end), on the
pair's images of the same train/test split: test accuracy against L0, mean over the pairs
(``sae_probe.hardconcrete`` in metrics.json), as one more curve on the same plot (all pairs and
lambdas fitted as one batched problem).

Writes into ``--out``: ``metrics.json`` (per layer: top-1, top-5, n_train, n_test, chance),
``probe_layer{L}.safetensors`` (+ ``probe_layer{L}.json``), ``pair_probes_layer{L}.safetensors``
with ``--pairs``, and ``accuracy_by_layer.png`` (top-1 and top-5 against layer, chance line).

    python probes/train_probe.py --activations runs/acts/acts-<hash> --out runs/probes
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

from lineofsight.probes import PROBE_OUTPUTS
from lineofsight.run import Run, lifecycle

OUTPUTS = ("metrics.json", "accuracy_by_layer.png", "sae_probe_accuracy.png", *PROBE_OUTPUTS)

@dataclasses.dataclass
class Config:
    """Options for probe training."""

    activations: Path
    """Activation cache written by probes/compute_image_activations.py: the cache folder, or the --out given to it when that holds one cache."""
    out: Path = Path("runs/probes")
    """Output folder for metrics.json, probe weights and the plot."""
    pairs: Path | None = None
    """Optional file of src@tgt lines: also train a binary probe per pair and layer."""
    test_frac: float = 0.2
    """Share of images held out for testing (the same split for every layer)."""
    val_frac: float = 0.1
    """Share of the training images used for early stopping."""
    epochs: int = 200
    """Maximum passes over the training images."""
    patience: int = 20
    """Stop after this many epochs without a better validation loss."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 1e-4
    """Adam weight decay (L2)."""
    batch_size: int = 512
    """Images per optimisation step."""
    seed: int = 0
    """Seeds the split and the probe initialisation."""
    device: str = "cpu"
    """Device to train on ('cuda' for the 7B's 4096-wide features over 50k images)."""
    overwrite: bool = False
    """Replace the outputs of an earlier run of this script in --out (nothing else in it is touched)."""
    allow_resize_mismatch: bool = False
    """--features sae: run even when the cache's images were resized otherwise than the SAE's training images (a
    different image-token count and grid: normally a mistake)."""
    features: Literal["residual", "sae"] = "residual"
    """'residual': probe the pooled residual at every cached layer. 'sae': probe the latents of --sae
    (encoding the pooled residual at the SAE's layer): a dense probe on all latents, then sparse
    probes on the --sae-l0 latents that separate the classes best (ANOVA F on the training split)."""
    sae: Path | None = None
    """SAE folder (or trainer run folder) for --features sae."""
    sae_l0: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    """--features sae: numbers of latents the sparse probes may use."""
    sparse: Literal["topm", "hardconcrete"] = "topm"
    """--features sae: 'topm', multiclass probes on the --sae-l0 best latents by ANOVA F; 'hardconcrete', these
    and also binary probes per --pairs pair with HardConcrete L0 gates on the latents, one per --sparse-lambdas."""
    sparse_lambdas: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    """--sparse hardconcrete: L0 penalties (per open gate, added to the mean binary cross-entropy) to sweep."""
    sparse_steps: int = 1000
    """--sparse hardconcrete: full-batch Adam steps."""
    sparse_lr: float = 1e-2
    """--sparse hardconcrete: Adam learning rate."""

    def __post_init__(self) -> None:
        from lineofsight.cli import UserError

        if not 0 < self.test_frac < 1 or not 0 <= self.val_frac < 1:
            raise UserError("--test-frac must be in (0, 1) and --val-frac in [0, 1)")
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise UserError("--epochs, --batch-size and --patience must be positive")
        if self.lr <= 0 or self.weight_decay < 0:
            raise UserError("--lr must be positive and --weight-decay non-negative")
        if not self.sae_l0 or min(self.sae_l0) < 1:
            raise UserError("--sae-l0 must list positive numbers of latents")
        if self.features == "sae" and self.sae is None:
            raise UserError("--features sae needs --sae <SAE folder>")
        if self.sparse == "hardconcrete":
            if self.features != "sae" or self.pairs is None:
                raise UserError("--sparse hardconcrete needs --features sae and --pairs (it probes each pair)")
            if not self.sparse_lambdas or min(self.sparse_lambdas) < 0:
                raise UserError("--sparse-lambdas must be non-negative and not empty")
            if self.sparse_steps < 1 or self.sparse_lr <= 0:
                raise UserError("--sparse-steps and --sparse-lr must be positive")


def split_indices(labels: Any, test_frac: float, seed: int) -> tuple[Any, Any]:
    """Seeded stratified split: every class contributes ``test_frac`` of its images to the test set."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = max(1, round(test_frac * len(idx))) if len(idx) > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def fit_linear(x_train: Any, y_train: Any, n_classes: int, cfg: Config, seed: int) -> dict[str, Any]:
    """Standardise, then fit ``softmax(W x + b)`` with Adam + CE, early-stopped on a validation split.

    Returns ``weight`` [C, D] and ``bias`` [C] in the *standardised* space plus ``mean``/``std``
    [D], so ``logits = ((x - mean) / std) @ weight.T + bias``.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    device = torch.device(cfg.device)
    mean = x_train.mean(0)
    std = x_train.std(0).clamp_min(1e-6) if len(x_train) > 1 else torch.ones_like(mean)
    x = ((x_train - mean) / std).to(device)
    y = y_train.to(device)
    perm = torch.randperm(len(x), generator=gen).to(device)
    n_val = int(cfg.val_frac * len(x)) if len(x) >= 10 else 0
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    torch.manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], n_classes).to(device)
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = (float("inf"), None)
    stale = 0
    for _ in range(cfg.epochs):
        order = fit_idx[torch.randperm(len(fit_idx), generator=gen).to(device)]
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            loss = torch.nn.functional.cross_entropy(probe(x[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            held = val_idx if n_val else fit_idx
            val_loss = torch.nn.functional.cross_entropy(probe(x[held]), y[held]).item()
        if val_loss < best[0] - 1e-6:
            best = (val_loss, {k: v.detach().clone() for k, v in probe.state_dict().items()})
            stale = 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    state = best[1]
    return {"weight": state["weight"].cpu(), "bias": state["bias"].cpu(), "mean": mean.cpu(), "std": std.cpu()}


def topk_accuracy(logits: Any, y: Any, k: int) -> float:
    k = min(k, logits.shape[1])
    return float((logits.topk(k, dim=1).indices == y[:, None]).any(1).float().mean())


def plot_accuracy(metrics: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lineofsight.io import save_figure

    layers = [int(layer) for layer in metrics["layers"]]
    top1 = [metrics["layers"][str(layer)]["top1"] for layer in layers]
    top5 = [metrics["layers"][str(layer)]["top5"] for layer in layers]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(layers, top1, "o-", label="top-1")
    ax.plot(layers, top5, "s--", label=f"top-{metrics['top5_k']}")
    ax.axhline(metrics["chance"], color="grey", lw=1, ls=":", label="chance")
    ax.set(xlabel="layer (input of decoder block)", ylabel="test accuracy", ylim=(0, 1.02),
           title=f"Linear probe for image class ({metrics['n_classes']} classes, {metrics['pool']} pooling)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path)


def f_statistic(x: Any, y: Any, n_classes: int) -> Any:
    """One-way ANOVA F per feature: between-class over within-class variance (0 for a constant feature)."""
    import torch

    x = x.double()
    grand = x.mean(0)
    between = torch.zeros_like(grand)
    within = torch.zeros_like(grand)
    present = 0
    for c in range(n_classes):
        xc = x[y == c]
        if len(xc) == 0:
            continue
        present += 1
        between += len(xc) * (xc.mean(0) - grand) ** 2
        within += ((xc - xc.mean(0)) ** 2).sum(0)
    between /= max(present - 1, 1)
    within /= max(len(x) - present, 1)
    return torch.where(within > 0, between / within.clamp(min=1e-12), torch.zeros_like(between)).float()


def hard_concrete_probes(x_NS: Any, y_N: Any, train_idx: Any, test_idx: Any, pairs: list[tuple[int, int]],
                         lambdas: tuple[float, ...], steps: int, lr: float, seed: int,
                         device: str = "cpu") -> dict[str, Any]:
    """Binary L0-gated logistic probes, one per (lambda, pair) problem ``q = i_lambda * n_pairs + i_pair``,
    fitted together as one batched problem.

    Pair ``(src, tgt)`` (class indices; label 1 = tgt) sees only its two classes' images. Its probe is
    ``sigmoid(sum_j z_j w_j (x_j - mean_j) / std_j + b)`` with the mean and std of the pair's training images
    (as :func:`fit_linear`), HardConcrete gates ``z_j`` (:mod:`lineofsight.sparse`) and the loss
    ``mean BCE + lambda * E[L0]``, full batch with Adam from ``w = 0`` and ``b`` at the pair's prior log-odds.
    All problems share one feature matrix: the standardisation is folded into the weights.

    Returns ``accuracy [Q]`` (on the pair's test images, deterministic gates; NaN without any), ``l0 [Q]`` and
    ``gates [Q, S]``.
    """
    import torch
    import torch.nn.functional as F

    from lineofsight.sparse import deterministic_gates, expected_l0, sample_gates

    dev = torch.device(device)
    n_pairs, n_lam = len(pairs), len(lambdas)
    src = torch.tensor([a for a, _ in pairs])[:, None]
    tgt = torch.tensor([b for _, b in pairs])[:, None]

    def rows(idx: Any) -> tuple[Any, Any, Any]:
        """Features [n, S] of the images of any pair's classes, and per problem which of them belong to its pair
        and which are tgt ([Q, n])."""
        idx = idx[torch.isin(y_N[idx], torch.cat([src, tgt]).flatten())]
        y = y_N[idx][None]
        member, label = (y == src) | (y == tgt), y == tgt
        return (x_NS[idx].to(dev, torch.float32), member.repeat(n_lam, 1).to(dev).float(),
                label.repeat(n_lam, 1).to(dev).float())

    x_train, in_train, y_train = rows(train_idx)
    x_test, in_test, y_test = rows(test_idx)
    n = in_train.sum(1, keepdim=True).double()
    mean = (in_train.double() @ x_train.double()) / n.clamp(min=1)
    var = (in_train.double() @ x_train.double() ** 2 - n * mean**2) / (n - 1).clamp(min=1)
    mean, std = mean.float(), var.clamp(min=0).sqrt().clamp(min=1e-6).float()  # [Q, S]
    prior = ((in_train * y_train).sum(1) / in_train.sum(1).clamp(min=1)).clamp(0.01, 0.99)
    lam = torch.tensor(lambdas, dtype=torch.float32).repeat_interleave(n_pairs).to(dev)[:, None]
    w = torch.zeros_like(mean, requires_grad=True)
    b = torch.logit(prior).clone().requires_grad_(True)
    log_alpha = torch.zeros_like(mean, requires_grad=True)
    gen = torch.Generator(device=dev).manual_seed(seed)
    opt = torch.optim.Adam([w, b, log_alpha], lr=lr)

    def logits(x: Any, z: Any) -> Any:  # [Q, n]
        w_eff = z * w / std
        return (x @ w_eff.T).T - (mean * w_eff).sum(-1, keepdim=True) + b[:, None]

    for _ in range(steps):
        bce = F.binary_cross_entropy_with_logits(logits(x_train, sample_gates(log_alpha, gen)), y_train,
                                                 reduction="none")
        mean_bce = (bce * in_train).sum(1) / in_train.sum(1).clamp(min=1)
        loss = (mean_bce + (lam * expected_l0(log_alpha)).sum(1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = deterministic_gates(log_alpha)
        correct = ((logits(x_test, z) > 0).float() == y_test).float() * in_test
        accuracy = correct.sum(1) / in_test.sum(1)  # NaN for a pair without test images
    return {"accuracy": accuracy.cpu(), "l0": (z > 0).sum(-1).cpu(), "gates": z.cpu()}


def sae_probes(cfg: Config, meta: dict[str, Any], acts: Any, y_all: Any, train_idx: Any, test_idx: Any,
               n_classes: int, pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """Probes on SAE latents of the pooled residual: all latents, then the m latents that separate the
    classes best (ANOVA F on the training split); with ``--sparse hardconcrete`` also L0-gated binary
    probes per class pair ``pairs`` (class indices)."""
    import torch

    from lineofsight.cli import UserError
    from lineofsight.probes import probe_logits
    from lineofsight.sae import load_sae

    sae = load_sae(cfg.sae, "cpu")
    layer = sae.cfg.layer
    if layer not in meta["layers"]:
        raise UserError(f"--sae reads layer {layer}; the activation cache holds layers {meta['layers']}")
    x = acts[:, meta["layers"].index(layer)]
    if x.shape[1] != sae.cfg.d_in:
        raise UserError(f"SAE width d_in {sae.cfg.d_in} does not match the cached activations' {x.shape[1]}")
    with torch.no_grad():
        z = sae.encode(x)
    y_test = y_all[test_idx]

    def accuracy(cols: Any) -> tuple[float, dict[str, Any]]:
        probe = fit_linear(z[train_idx][:, cols], y_all[train_idx], n_classes, cfg, cfg.seed + layer)
        with torch.no_grad():
            return topk_accuracy(probe_logits(probe, z[test_idx][:, cols]), y_test, 1), probe

    every = torch.arange(z.shape[1])
    dense_acc, _ = accuracy(every)
    order = f_statistic(z[train_idx], y_all[train_idx], n_classes).argsort(descending=True)
    by_l0 = {}
    for m in cfg.sae_l0:
        cols = order[: min(m, len(order))]
        by_l0[str(m)] = {"top1": accuracy(cols)[0], "latents": cols.tolist()}
        print(f"SAE probe, layer {layer}: {m:>4} latents -> top-1 {by_l0[str(m)]['top1']:.3f}", flush=True)
    live = int(((z > 0).sum(0) > 0).sum())
    print(f"SAE probe, layer {layer}: all {z.shape[1]} latents ({live} active on these images) -> top-1 "
          f"{dense_acc:.3f}", flush=True)
    result = {"layer": layer, "sae": str(cfg.sae), "d_sae": int(z.shape[1]), "live_latents": live,
              "dense_top1": dense_acc, "ranking": "anova_f", "by_l0": by_l0,
              "mean_l0_per_image": float((z > 0).sum(1).float().mean())}
    if cfg.sparse == "hardconcrete":
        result["hardconcrete"] = hard_concrete_summary(cfg, z, y_all, train_idx, test_idx, pairs, meta["class_names"])
    return result


MAX_LISTED_LATENTS = 64
"""A gated probe's open latents are listed in metrics.json when there are at most this many."""


def hard_concrete_summary(cfg: Config, z: Any, y_all: Any, train_idx: Any, test_idx: Any,
                          pairs: list[tuple[int, int]], names: list[str]) -> dict[str, Any]:
    """:func:`hard_concrete_probes` for every pair and lambda: test accuracy and L0 per pair, and their means over
    the pairs (those with test images) per lambda."""
    import math

    from lineofsight.data import pair_key

    fit = hard_concrete_probes(z, y_all, train_idx, test_idx, pairs, cfg.sparse_lambdas, cfg.sparse_steps,
                               cfg.sparse_lr, cfg.seed, cfg.device)
    by_lambda = {}
    for i_lam, lam in enumerate(cfg.sparse_lambdas):
        per_pair, accs, l0s = {}, [], []
        for i_pair, (a, b) in enumerate(pairs):
            q = i_lam * len(pairs) + i_pair
            acc, l0 = float(fit["accuracy"][q]), int(fit["l0"][q])
            entry: dict[str, Any] = {"accuracy": None if math.isnan(acc) else acc, "l0": l0}
            if l0 <= MAX_LISTED_LATENTS:
                entry["latents"] = fit["gates"][q].nonzero().flatten().tolist()
            per_pair[pair_key(names[a], names[b])] = entry
            if not math.isnan(acc):
                accs.append(acc)
                l0s.append(l0)
        by_lambda[str(lam)] = {"accuracy": sum(accs) / len(accs) if accs else None,
                               "l0": sum(l0s) / len(l0s) if l0s else None, "per_pair": per_pair}
        print(f"SAE gated pair probes, lambda {lam:g}: mean L0 {by_lambda[str(lam)]['l0'] or 0:.1f} -> accuracy "
              f"{by_lambda[str(lam)]['accuracy'] or 0:.3f} (mean over {len(accs)} pairs)", flush=True)
    return {"task": "binary, per pair", "n_pairs": len(pairs), "lambdas": list(cfg.sparse_lambdas),
            "steps": cfg.sparse_steps, "lr": cfg.sparse_lr, "by_lambda": by_lambda}


def plot_sae_probes(result: dict[str, Any], chance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lineofsight.io import save_figure

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ms = [int(m) for m in result["by_l0"]]
    ax.plot(ms, [result["by_l0"][str(m)]["top1"] for m in ms], "o-", label="sparse probe (m best latents by F)")
    gated = result.get("hardconcrete")
    if gated:
        points = sorted((row["l0"], row["accuracy"]) for row in gated["by_lambda"].values() if row["l0"] is not None)
        ax.plot([p[0] for p in points], [p[1] for p in points], "D-", color="tab:purple",
                label=f"binary pair probes, L0 gates (mean of {gated['n_pairs']} pairs)")
    ax.axhline(result["dense_top1"], color="tab:green", ls="--", label=f"all {result['d_sae']} latents")
    ax.axhline(chance, color="gray", ls=":", label="chance")
    if gated:  # gated probes may close every gate: L0 = 0 needs a linear part at the origin
        ax.set_xscale("symlog", base=2, linthresh=1)
        ax.set_xlim(left=-0.2)
    else:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("SAE latents used (L0)")
    ax.set_ylabel("top-1 accuracy (test)" if not gated else "test accuracy (top-1; binary for pair probes)")
    ax.set_title(f"Class probes on SAE latents, layer {result['layer']}")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


@lifecycle("probes/train_probe.py", outputs=OUTPUTS)
def main(cfg: Config, run: Run) -> dict[str, Any]:
    import torch

    from lineofsight.cache import read_activation_cache
    from lineofsight.cli import UserError
    from lineofsight.data import pair_key, read_class_pairs
    from lineofsight.probes import probe_logits, save_pair_probes, save_probe

    start = time.perf_counter()
    run.setup(seed=cfg.seed, device=cfg.device)
    cache = read_activation_cache(cfg.activations)
    meta = cache["meta"]
    names: list[str] = meta["class_names"]
    to_class = {label: i for i, label in enumerate(meta["class_labels"])}
    y_all = torch.tensor([to_class[int(label)] for label in cache["labels"]])
    acts = cache["acts"]  # [N, n_layers, D]
    n_classes = len(names)
    present = torch.bincount(y_all, minlength=n_classes)
    if (present > 0).sum() < 2:
        raise UserError(f"{cfg.activations}: probing needs images of at least two classes")
    train_idx, test_idx = split_indices(y_all, cfg.test_frac, cfg.seed)
    chance = float(present.max()) / len(y_all)
    k5 = min(5, n_classes)
    pairs = read_class_pairs(cfg.pairs) if cfg.pairs else []
    for src, tgt in pairs:
        for name in (src, tgt):
            if name not in names:
                raise UserError(f"--pairs: class {name!r} is not in the activation cache (classes: {', '.join(names)})")
    if cfg.features == "sae":
        from lineofsight.data import check_resize_match, recorded_resize
        from lineofsight.sae import load_sae

        sae_cfg = load_sae(cfg.sae, "cpu").cfg  # checked before any probe is trained
        check_resize_match(sae_cfg.resize, recorded_resize(meta.get("key", {})), f"the activation cache {cfg.activations}",
                           cfg.allow_resize_mismatch, reader=f"the SAE {cfg.sae}")
        if sae_cfg.layer not in meta["layers"]:
            raise UserError(f"--sae reads layer {sae_cfg.layer}; the activation cache holds layers {meta['layers']}")
        if sae_cfg.d_in != acts.shape[-1]:
            raise UserError(f"SAE width d_in {sae_cfg.d_in} does not match the cached activations' {acts.shape[-1]}")
    run.open(cfg.out, overwrite=cfg.overwrite)

    metrics: dict[str, Any] = {
        "activations": str(cfg.activations), "n_classes": n_classes, "class_names": names, "pool": meta["pool"],
        "chance": chance, "top5_k": k5, "n_train": len(train_idx), "n_test": len(test_idx), "layers": {},
        "pairs": {},
    }
    for li, layer in enumerate(meta["layers"]):
        x = acts[:, li]
        probe = fit_linear(x[train_idx], y_all[train_idx], n_classes, cfg, cfg.seed + layer)
        with torch.no_grad():
            logits = probe_logits(probe, x[test_idx])
        y_test = y_all[test_idx]
        metrics["layers"][str(layer)] = {
            "top1": topk_accuracy(logits, y_test, 1), "top5": topk_accuracy(logits, y_test, k5),
            "n_train": len(train_idx), "n_test": len(test_idx), "chance": chance,
        }
        save_probe(run.out, layer, probe, names, meta["pool"])
        pair_tensors = {}
        for src, tgt in pairs:
            a, b = names.index(src), names.index(tgt)
            tr = train_idx[(y_all[train_idx] == a) | (y_all[train_idx] == b)]
            te = test_idx[(y_all[test_idx] == a) | (y_all[test_idx] == b)]
            binary = fit_linear(x[tr], (y_all[tr] == b).long(), 2, cfg, cfg.seed + layer)
            with torch.no_grad():
                acc = topk_accuracy(probe_logits(binary, x[te]), (y_all[te] == b).long(), 1) if len(te) else None
            # Direction in the raw residual space that increases the tgt-vs-src logit.
            direction = (binary["weight"][1] - binary["weight"][0]) / binary["std"]
            pair_tensors[pair_key(src, tgt)] = direction
            metrics["pairs"].setdefault(pair_key(src, tgt), {})[str(layer)] = {"accuracy": acc, "n_test": len(te)}
        if pair_tensors:
            save_pair_probes(run.out, layer, pair_tensors)
        m = metrics["layers"][str(layer)]
        print(f"layer {layer:>2}: top-1 {m['top1']:.3f}  top-{k5} {m['top5']:.3f}  (chance {chance:.3f})", flush=True)

    if cfg.features == "sae":
        pair_classes = [(names.index(src), names.index(tgt)) for src, tgt in pairs]
        metrics["sae_probe"] = sae_probes(cfg, meta, acts, y_all, train_idx, test_idx, n_classes, pair_classes)
        plot_sae_probes(metrics["sae_probe"], chance, run.out / "sae_probe_accuracy.png")

    best = max(metrics["layers"], key=lambda layer: metrics["layers"][layer]["top1"])
    metrics["best_layer"] = int(best)
    plot_accuracy(metrics, run.out / "accuracy_by_layer.png")
    return run.finish(f"best layer {best}: top-1 {metrics['layers'][best]['top1']:.3f}; wrote {run.out}/metrics.json, "
                      f"probe weights and accuracy_by_layer.png in {time.perf_counter() - start:.1f}s", metrics)


if __name__ == "__main__":
    from lineofsight.cli import run as run_cli

    run_cli(main, Config)
