"""Assemble ``results/REPORT.md`` from the JSON metrics the demo steps wrote into ``results/``.

Each section is rendered from its own JSON file when that file exists, so the report always
shows exactly what the last demo run produced.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass
class Config:
    """Options for the report."""

    results_dir: Path = Path("results")
    """Folder holding the demo's JSON metrics and plots; REPORT.md is written here."""
    rollouts: Path | None = Path("runs/demo/rollouts/rollouts.jsonl")
    """Rollout records to quote a few steered generations from (skipped when missing)."""


def toy_section(result: dict) -> list[str]:
    lines = [
        "## The embedded toy model",
        "",
        f"Held-out accuracy of `{result['model']}` on {result['n_images']} unseen images of the shape world "
        "(greedy generation):",
        "",
        "| task | accuracy | bar |",
        "|---|---|---|",
    ]
    names = {"caption_acc": "class named in the caption", "forced_choice_acc": "forced choice",
             "yesno_acc": "yes/no (balanced)"}
    for key, label in names.items():
        lines.append(f"| {label} | {result[key]:.1%} | {result['bar'][key]:.0%} |")
    lines += ["", "Sample generations:", "", "| task | question | answer | expected |", "|---|---|---|---|"]
    for task, question, answer, expected in result["examples"]:
        lines.append(f"| {task} | {question} | {answer} | {expected} |")
    return lines + [""]


def probe_section(metrics: dict) -> list[str]:
    k5 = metrics["top5_k"]
    lines = [
        "## Linear probes: image class from the mean image-token residual",
        "",
        f"A multiclass linear probe per layer on the residual stream averaged over the image-token positions "
        f"({metrics['n_classes']} classes, {metrics['n_train']} training and {metrics['n_test']} test images, "
        f"the same seeded split for every layer). Layer L is the input of decoder block L.",
        "",
        f"| layer | top-1 | top-{k5} | chance |",
        "|---|---|---|---|",
    ]
    for layer, m in sorted(metrics["layers"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {layer} | {m['top1']:.3f} | {m['top5']:.3f} | {m['chance']:.3f} |")
    lines += ["", f"Best layer: {metrics['best_layer']}.", "", "![probe accuracy by layer](probes/accuracy_by_layer.png)", ""]
    if metrics.get("pairs"):
        lines += ["Binary probes for the steering pairs (test accuracy per layer):", ""]
        layers = sorted(metrics["layers"], key=int)
        lines += ["| pair | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
        for pair, by_layer in metrics["pairs"].items():
            cells = [f"{by_layer[layer]['accuracy']:.2f}" if by_layer[layer]["accuracy"] is not None else "-"
                     for layer in layers]
            lines.append(f"| {pair} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def steering_section(result: dict) -> list[str]:
    metrics = result["metrics"]
    lines = [
        "## Steering: class-pair difference-of-means vectors",
        "",
        f"`k * v(src@tgt)` added to the residual at the image-token positions of one layer ({result['positions']} "
        "positions, prefill only). Efficacy: probability of the first token of `tgt` / `src` for the forced choice "
        '`Reply either "src" or "tgt" ...` on held-out `src` images; flip rate: share where `tgt` wins. Damage: '
        f"increase of the caption NLL (nats/token, {result['n_captions']} captions). Rollouts: share of steered "
        "generations naming `tgt` / still naming `src`.",
        "",
        "| layer | k | p(tgt) | p(src) | flip rate | damage | rollouts naming tgt | naming src |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer, by_k in metrics.items():
        for k, m in sorted(by_k.items(), key=lambda kv: float(kv[0])):
            if "p_tgt" not in m:
                continue
            tgt = f"{m['rollout_tgt']:.2f}" if "rollout_tgt" in m else "-"
            src = f"{m['rollout_src']:.2f}" if "rollout_src" in m else "-"
            lines.append(f"| {layer} | {float(k):g} | {m['p_tgt']:.3f} | {m['p_src']:.3f} | {m['flip_rate']:.2f} | "
                         f"{m['damage_nll']:+.3f} | {tgt} | {src} |")
    lines += ["", "![efficacy](steering/efficacy.png)", "", "![damage](steering/damage.png)", ""]
    if any("rollout_tgt" in m for by_k in metrics.values() for m in by_k.values()):
        lines += ["![rollouts](steering/rollouts.png)", ""]
    return lines


def rollout_examples(path: Path, n: int = 4) -> list[str]:
    """A few steered rollouts next to the unsteered one (k = 0) of the same image and prompt."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_unit: dict[tuple, dict[float, dict]] = {}
    for r in records:
        pair = f"{r['src']}@{r['tgt']}"
        by_unit.setdefault((pair, r["layer"], r["prompt_id"], r["image"]), {})[float(r["k"])] = r
    lines = ["Steered rollouts (greedy): unsteered, and at the smallest k whose answer names `tgt` (else the "
             "largest k):", "", "| pair | layer | prompt | k = 0 | k | steered |", "|---|---|---|---|---|---|"]
    shown = 0
    for (pair, layer, _, _), by_k in sorted(by_unit.items(), key=lambda kv: (kv[0][2], kv[0])):
        if 0.0 not in by_k or len(by_k) < 2 or shown >= n:
            continue
        tgt = pair.split("@")[1]
        naming = [k for k in sorted(by_k) if k > 0 and tgt in by_k[k]["text"].split()]
        k = naming[0] if naming else max(by_k)
        prompt = by_k[k].get("prompt", "")
        lines.append(f"| {pair} | {layer} | {prompt} | {by_k[0.0]['text'].strip()} | {k:g} | {by_k[k]['text'].strip()} |")
        shown += 1
    return lines + [""] if shown else []


def sae_section(results: Path) -> list[str]:
    evals = sorted(results.glob("sae/eval-L*/eval.json"), key=lambda p: int(p.parent.name.removeprefix("eval-L")))
    if not evals:
        return []
    lines = [
        "## Sparse autoencoders on the toy model's residual stream",
        "",
        "One SAE per layer (ReLU, April-update objective, 8x expansion) trained on image tokens, caption tokens "
        "in context and caption tokens alone of the shape world's ShareGPT4V-format captions; evaluated on held-out "
        "records. FVU: fraction of variance unexplained. CE recovered: `1 - (CE_sae - CE_clean) / (CE_zero - "
        "CE_clean)` on the caption tokens, with the reconstruction spliced at image / caption / all positions.",
        "",
        "| layer | L0 all | L0 image | L0 text (ctx) | L0 text (alone) | FVU all | FVU image | FVU text (ctx) | "
        "dead | CE rec. image | CE rec. text | CE rec. all |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in evals:
        m = json.loads(path.read_text())
        lines.append(
            f"| {m['layer']} | {m['l0']['all']:.1f} | {m['l0']['image']:.1f} | {m['l0']['text_in_context']:.1f} | "
            f"{m['l0']['text_only']:.1f} | {m['fvu']['all']:.3f} | {m['fvu']['image']:.3f} | "
            f"{m['fvu']['text_in_context']:.3f} | {m['dead_frac']['all']:.3f} | {m['ce_recovered']['image']:.3f} | "
            f"{m['ce_recovered']['text']:.3f} | {m['ce_recovered']['all']:.3f} |")
    lines.append("")
    modality = results / "sae" / "modality" / "modality.json"
    if modality.is_file():
        m = json.loads(modality.read_text())
        th = m["thresholds"]
        lines += [
            "### Image and text features by layer",
            "",
            f"A live latent's modality score is the share of its activation mass on image tokens; image-only: score "
            f">= {th['image_only']}, text-only: <= {th['text_only']}, shared in between ({m['n_records']} held-out "
            "records).",
            "",
            "| layer | live latents | image-only | shared | text-only |",
            "|---|---|---|---|---|",
        ]
        for layer, v in m["layers"].items():
            s = v["mass"]
            lines.append(f"| {layer} | {s['n_live']} | {s['image_only']:.3f} | {s['shared']:.3f} | {s['text_only']:.3f} |")
        lines += ["", "![modality by layer](sae/modality/modality_by_layer.png)", "",
                  "![modality histograms](sae/modality/modality_hist.png)", ""]
        for key, ex in m.get("examples", {}).items():
            lines.append(f"![{key}](sae/modality/{ex['plot']})")
        lines.append("")
    approx = results / "sae" / "approx" / "approximation.json"
    if approx.is_file():
        a = json.loads(approx.read_text())
        lines += [
            "### Steering vectors are sparse in the SAE basis",
            "",
            f"Each steering vector of layer {a['layer']} approximated by HardConcrete-gated SAE decoder rows, a sweep "
            "over the L0 penalty; the same for random unit vectors.",
            "",
            "| lambda | steering: mean L0 | cosine | random: mean L0 | cosine |",
            "|---|---|---|---|---|",
        ]
        for lam in a["lambdas"]:
            s, r = a["steering"]["by_lambda"][str(lam)], a["random"]["by_lambda"][str(lam)]
            lines.append(f"| {lam:g} | {s['l0']:.1f} | {s['cosine']:.3f} | {r['l0']:.1f} | {r['cosine']:.3f} |")
        lines += ["", "![approximation](sae/approx/approximation.png)", ""]
    probe = results / "probes-sae" / "metrics.json"
    if probe.is_file():
        p = json.loads(probe.read_text()).get("sae_probe")
        if p:
            lines += ["### Class probes on SAE latents", "",
                      f"Layer {p['layer']}: the SAE encodes the mean image-token residual; all {p['d_sae']} latents give "
                      f"top-1 {p['dense_top1']:.3f} (the residual itself: see the probe table); the m latents that "
                      "separate the classes best (ANOVA F on the training images):", "", "| latents | top-1 |", "|---|---|"]
            lines += [f"| {m} | {v['top1']:.3f} |" for m, v in p["by_l0"].items()]
            lines += ["", "![SAE probes](probes-sae/sae_probe_accuracy.png)", ""]
    return lines


SECTIONS = [("toy/eval.json", toy_section), ("probes/metrics.json", probe_section),
            ("steering/metrics.json", steering_section)]


def main(cfg: Config) -> None:
    from lineofsight.io import atomic_write_text
    from lineofsight.run import read_run_record

    lines = [
        "# lineofsight demo report",
        "",
        "Written by `bash scripts/demo.sh` (via `scripts/make_report.py`) on the embedded toy "
        "LLaVA-NeXT and its synthetic shape world. Regenerate with `bash scripts/demo.sh`.",
        "",
    ]
    sha = None
    for filename, render in SECTIONS:
        path = cfg.results_dir / filename
        if path.is_file():
            data = json.loads(path.read_text())
            sha = sha or (read_run_record(path.parent) or {}).get("git_sha")  # the run record of its folder
            lines += render(data)
            if filename.startswith("steering/") and cfg.rollouts is not None:
                lines += rollout_examples(cfg.rollouts)
    lines += sae_section(cfg.results_dir)
    if sha:
        lines.append(f"_Code version: `{sha[:12]}`._")
    out = atomic_write_text(cfg.results_dir / "REPORT.md", "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    from lineofsight.cli import run

    run(main, Config)
