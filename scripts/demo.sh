#!/usr/bin/env bash
# Set up .venv (see _setup.sh), then run the demo pipeline on the embedded toy model and
# its shape world, writing results/ (REPORT.md, JSON metrics, plots). Caches go to runs/demo/.
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
mkdir -p results runs/demo
echo "== 1. shape world + held-out evaluation of the committed toy LLaVA-NeXT"
python scripts/eval_toy.py --out results/toy_eval.json
echo "== 2. linear probes: mean image-token residual per layer -> image class"
python probes/compute_image_activations.py --split train --images-per-class 48 --out runs/demo/acts
python probes/train_probe.py --activations runs/demo/acts --pairs data/toy/world/class_pairs.txt \
  --out results/probes --overwrite
echo "== 3. steering: diff-of-means vectors, steered rollouts, efficacy and damage"
python steering/compute_steering_vectors.py --activations runs/demo/acts --pairs data/toy/world/class_pairs.txt \
  --out runs/demo/vectors
rm -rf runs/demo/rollouts
python steering/steering_rollouts.py --vectors runs/demo/vectors --layer 2 --images-per-pair 1 --n-pairs 4 \
  --k 0 4 8 16 --max-new-tokens 12 --out runs/demo/rollouts
python steering/eval_steering.py --vectors runs/demo/vectors --layer 1 2 4 --k 0 4 8 16 --images-per-pair 6 \
  --rollouts runs/demo/rollouts/rollouts.jsonl --out results/steering
echo "== report"
python scripts/make_report.py
