#!/usr/bin/env bash
# Set up .venv (see _setup.sh), then run the demo pipeline on the embedded toy model and
# its shape world, writing results/ (REPORT.md, JSON metrics, plots).
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
mkdir -p results
echo "== 1. shape world + held-out evaluation of the committed toy LLaVA-NeXT"
python scripts/eval_toy.py --out results/toy_eval.json
echo "== report"
python scripts/make_report.py
