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


SECTIONS = [("toy_eval.json", toy_section)]


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
