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
             "yesno_acc": "yes/no (balanced)", "mc_shape_acc": "lettered multiple choice: which shape",
             "mc_colour_acc": "lettered multiple choice: which colour"}
    for key, label in names.items():
        if key in result:
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
        "positions, prefill only). Efficacy: probability that the model answers `tgt` / `src` "
        + ("(the whole class name as the model writes it: the product of its tokens' probabilities, teacher forced)"
           if result.get("answer_scoring") == "sequence" else "(the probability of the name's first token)")
        + " to the forced choice "
        '`<image>\\n Reply either "src" or "tgt" ...` (spaced as the paper\'s code) on held-out `src` images; flip '
        "rate: share where `tgt` is the likelier answer. Damage: "
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
    for approx in sorted((results / "sae").glob("approx*/approximation.json")):
        lines += approximation_section(results, approx.parent, json.loads(approx.read_text()))
    probe = results / "probes-sae" / "metrics.json"
    if probe.is_file():
        p = json.loads(probe.read_text()).get("sae_probe")
        if p:
            lines += ["### Class probes on SAE latents", "",
                      f"Layer {p['layer']}: the SAE encodes the mean image-token residual; all {p['d_sae']} latents give "
                      f"top-1 {p['dense_top1']:.3f} (the residual itself: see the probe table); the m latents that "
                      "separate the classes best (ANOVA F on the training images):", "", "| latents | top-1 |", "|---|---|"]
            lines += [f"| {m} | {v['top1']:.3f} |" for m, v in p["by_l0"].items()]
            gated = p.get("hardconcrete")
            if gated:
                lines += ["", f"L0-gated probes ({gated['task']}, {gated['n_pairs']} class pairs, the same split): a "
                          "logistic probe per pair on HardConcrete-gated latents, accuracy vs the number of open gates "
                          "over the L0 penalty (chance 0.5, where the top-m probes' chance is 1 / classes):", "",
                          "| lambda | mean L0 | pair accuracy |", "|---|---|---|"]
                lines += [f"| {float(lam):g} | {v['l0']:.1f} | {v['accuracy']:.3f} |"
                          for lam, v in gated["by_lambda"].items()]
            lines += ["", "![SAE probes](probes-sae/sae_probe_accuracy.png)", ""]
    return lines


def approximation_section(results: Path, folder: Path, a: dict) -> list[str]:
    """L0 vs cosine of the sparse approximations per basis, and how much steering the approximated vectors keep."""
    bases = [b for b in ("sae", "neurons") if (b == "sae" and "steering" in a) or b in a]
    what = {"sae": f"the SAE's {a.get('d_sae', '')} decoder rows",
            "neurons": f"the {a.get('neurons', {}).get('d_mlp', '')} MLP neuron output directions of block "
                       f"{a.get('neurons', {}).get('block', '')}"}
    lines = [f"### Steering vectors in a sparse basis (layer {a['layer']})", "",
             f"Each steering vector of layer {a['layer']} approximated by HardConcrete-gated atoms of "
             + " and of ".join(what[b] for b in bases) + ", a sweep over the L0 penalty; the same for random unit "
             "vectors (the baseline).", ""]
    header = "| lambda | " + " | ".join(f"{b} steering: L0 | cosine | {b} random: L0 | cosine" for b in bases) + " |"
    lines += [header, "|---|" + "---|---|---|---|" * len(bases)]
    for lam in a["lambdas"]:
        cells = []
        for b in bases:
            part = a if b == "sae" else a[b]
            s, r = part["steering"]["by_lambda"][str(lam)], part["random"]["by_lambda"][str(lam)]
            cells += [f"{s['l0']:.1f}", f"{s['cosine']:.3f}", f"{r['l0']:.1f}", f"{r['cosine']:.3f}"]
        lines.append(f"| {lam:g} | " + " | ".join(cells) + " |")
    lines += ["", f"![approximation]({folder.relative_to(results).as_posix()}/approximation.png)", ""]
    evals = []
    for run in sorted(folder.glob("eval-lambda*")):
        info = folder / "vectors" / run.name.removeprefix("eval-") / "vectors.json"
        metrics = run / "metrics.json"
        if metrics.is_file() and info.is_file():
            evals.append((json.loads(info.read_text()), json.loads(metrics.read_text())))
    original = results / "steering" / "metrics.json"
    if evals and original.is_file():
        layer = str(a["layer"])
        ref = json.loads(original.read_text())["metrics"].get(layer)
        ks = [k for k in evals[0][1]["metrics"][layer] if float(k) > 0]
        lines += [f"Steering with the approximated vectors (layer {layer}, the same images, prompt and k as the "
                  "originals; flip rate / damage in nats per caption token):", "",
                  "| vectors | " + " | ".join(f"k = {float(k):g}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        rows = ([("original difference of means", ref)] if ref else []) + [
            (f"SAE, lambda {info['lambda']:g} (mean L0 {info['mean_l0']:.1f}, cosine {info['mean_cosine']:.3f})",
             m["metrics"][layer]) for info, m in evals]
        for name, by_k in rows:
            lines.append(f"| {name} | " + " | ".join(
                f"{by_k[k]['flip_rate']:.2f} / {by_k[k]['damage_nll']:+.3f}" if k in by_k else "-" for k in ks) + " |")
        lines.append("")
    return lines


def benchmark_section(results: Path) -> list[str]:
    """Clean vs SAE-spliced vs zero-ablated multiple-choice accuracy, one column pair per benchmark."""
    found = {p.parent.name: json.loads(p.read_text()) for p in sorted(results.glob("benchmark/*/metrics.json"))}
    if not found:
        return []
    lines = [
        "## Benchmarks with the SAEs spliced in",
        "",
        "The toy world's lettered multiple-choice task in the MMMU-Pro and A-OKVQA schemas, scored like the paper's "
        "benchmarks (`sae/evaluation/eval_benchmark.py`: the next token's logits over the option letters): clean, with "
        "each layer's SAE reconstruction spliced in at the image-token positions, and with the image tokens zeroed "
        "there (the floor). 95 % Wilson intervals; the difference to clean is paired over the same items.",
        "",
    ]
    names = list(next(iter(found.values()))["conditions"])
    header = "| condition | " + " | ".join(f"{b} accuracy | vs clean" for b in found) + " |"
    lines += [header, "|---|" + "---|---|" * len(found)]
    for name in names:
        cells = []
        for m in found.values():
            c = m["conditions"].get(name)
            if c is None:
                cells += ["-", "-"]
                continue
            acc = f"{c['accuracy']:.3f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"
            diff = c.get("vs_clean")
            cells += [acc, "" if diff is None else f"{diff['diff']:+.3f} [{diff['ci95'][0]:+.2f}, {diff['ci95'][1]:+.2f}]"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = "; ".join(f"{b}: {m['n_items']} items, chance {m['chance']:.2f}, skipped {m['skipped']['total']}"
                       for b, m in found.items())
    lines += ["", counts + ".", ""]
    for b, m in found.items():
        if len(m["by_subject"]) > 1:
            lines += [f"Per subject ({b}):", "", "| subject | n | " + " | ".join(names) + " |",
                      "|---|---|" + "---|" * len(names)]
            for subject, row in m["by_subject"].items():
                lines.append(f"| {subject} | {row['n']} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")
            lines.append("")
        lines += [f"![{b}](benchmark/{b}/accuracy.png)", ""]
    return lines


def browser_section(results: Path) -> list[str]:
    """The feature browser of one SAE: what it holds, its sizes and timings, and its screenshots."""
    path = results / "browser" / "browser.json"
    if not path.is_file():
        return []
    m = json.loads(path.read_text())
    b, t = m["bytes"], m["seconds"]
    counts = m["counts"]
    lines = [
        "## Feature browser",
        "",
        f"[`browser/index.html`](browser/index.html) (open it from a checkout: a static site, no server) browses "
        f"every live latent of the layer-{m['layer']} SAE over {m['n_records']} held-out records "
        f"(`sae/evaluation/browse_features.py`): {m['n_live']} live of {m['d_sae']} ({m['n_dead']} dead, "
        f"{m['n_dense']} dense); by modality score {counts['image_only']} image-only, {counts['shared']} shared, "
        f"{counts['text_only']} text-only. Each latent's page has its top images with a per-patch heatmap, its "
        "top text contexts, activation histograms by token type, the vocabulary its decoder direction promotes and "
        "suppresses, and its cosine with the steering vectors and probe directions of the layer.",
        "",
        f"Sizes: index page {b['index_page'] / 1e3:.0f} KB, a latent page {b['latent_page_mean'] / 1e3:.0f} KB on "
        f"average ({b['latent_page_max'] / 1e3:.0f} KB at most, thumbnails included). Time: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in t.items()) + ".",
        "",
    ]
    for name, caption in (("browser_index.png", "the index"), ("browser_latent.png", "a latent's page")):
        if (results / name).is_file():
            lines += [f"![{caption}]({name})", ""]
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
    lines += benchmark_section(cfg.results_dir)
    lines += browser_section(cfg.results_dir)
    if sha:
        lines.append(f"_Code version: `{sha[:12]}`._")
    out = atomic_write_text(cfg.results_dir / "REPORT.md", "\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    from lineofsight.cli import run

    run(main, Config)
