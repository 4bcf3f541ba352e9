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


SECTIONS = [("toy_eval.json", toy_section), ("probes/metrics.json", probe_section),
            ("steering/metrics.json", steering_section)]


def main(cfg: Config) -> None:
    from lineofsight.io import atomic_write_text

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
            sha = sha or data.get("provenance", {}).get("git_sha")
            lines += render(data)
    if sha:
        lines.append(f"_Code version: `{sha[:12]}`._")
    out = atomic_write_text(cfg.results_dir / "REPORT.md", "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    from lineofsight.cli import run

    run(main, Config)
