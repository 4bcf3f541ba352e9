#!/usr/bin/env bash
# Set up .venv (see _setup.sh), then run the demo pipeline on the embedded toy model and
# its shape world, writing results/ (REPORT.md, JSON metrics, plots). Caches go to runs/demo/.
# Every output folder carries the run.json of the script that wrote it; --overwrite replaces only
# that script's outputs, and the activation caches are reused when their config is unchanged.
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
mkdir -p results runs/demo
echo "== 1. shape world + held-out evaluation of the committed toy LLaVA-NeXT"
python scripts/eval_toy.py --out results/toy --overwrite
echo "== 2. linear probes: mean image-token residual per layer -> image class"
python probes/compute_image_activations.py --split train --images-per-class 48 --out runs/demo/acts
python probes/train_probe.py --activations runs/demo/acts --pairs data/toy/world/class_pairs.txt \
  --out results/probes --overwrite
echo "== 3. steering: diff-of-means vectors, steered rollouts, efficacy and damage"
python steering/compute_steering_vectors.py --activations runs/demo/acts --pairs data/toy/world/class_pairs.txt \
  --out runs/demo/vectors --overwrite
python steering/steering_rollouts.py --vectors runs/demo/vectors --layer 0 --images-per-pair 1 --n-pairs 4 \
  --k 0 4 8 16 --max-new-tokens 12 --out runs/demo/rollouts --overwrite
python steering/eval_steering.py --vectors runs/demo/vectors --layer 0 1 2 --k 0 4 8 16 --images-per-pair 6 \
  --rollouts runs/demo/rollouts/rollouts.jsonl --out results/steering --overwrite
echo "== 4. SAEs: harvest once, one SAE per layer (six in one run), evaluation, modality by layer"
# The world's first 448 captions train the SAEs; the last 64 are held out for evaluation.
python sae/cache_activations.py --layers 0 1 2 3 4 5 --limit 448 --out runs/demo/sae-cache
python sae/sae-trainer.py --activations runs/demo/sae-cache --layer 0 1 2 3 4 5 --expansion 8 --l1-coefficient 5 \
  --lr 1e-3 --batch-size 1024 --total-tokens 400000 --dead-after-tokens 100000 --log-every 100 --out runs/demo/sae \
  --overwrite
for L in 0 1 2 3 4 5; do
  python sae/evaluation/eval_sae.py --sae runs/demo/sae/saes/L$L --offset 448 --limit 64 --out results/sae/eval-L$L \
    --overwrite
done
python sae/evaluation/modality.py --saes runs/demo/sae --offset 448 --limit 64 --out results/sae/modality --overwrite
echo "== 5. steering vectors approximated in the SAE and MLP-neuron bases; do the approximations still steer?"
# Layer 2 in both bases (layer 0 has no MLP before it); the toy's steering works at layer 0 (see REPORT.md), so
# the approximations are evaluated there.
python sae/approximate_steering_vectors.py --vectors runs/demo/vectors --sae runs/demo/sae/saes/L2 \
  --basis sae neurons --out results/sae/approx --overwrite
python sae/approximate_steering_vectors.py --vectors runs/demo/vectors --sae runs/demo/sae/saes/L0 \
  --export-lambda 0.001 0.003 --out results/sae/approx-L0 --overwrite
for LAM in 0.001 0.003; do
  python steering/eval_steering.py --vectors results/sae/approx-L0/vectors/lambda$LAM --layer 0 --k 0 4 8 16 \
    --images-per-pair 6 --out results/sae/approx-L0/eval-lambda$LAM --overwrite
done
python probes/train_probe.py --activations runs/demo/acts --features sae --sae runs/demo/sae/saes/L2 \
  --pairs data/toy/world/class_pairs.txt --sparse hardconcrete --out results/probes-sae --overwrite
echo "== 6. benchmarks (the toy's lettered multiple choice, MMMU-Pro and A-OKVQA schemas): clean vs each SAE spliced in"
for B in mmmu-pro aokvqa; do
  python sae/evaluation/eval_benchmark.py --benchmark $B --sae runs/demo/sae --out results/benchmark/$B --overwrite
done
echo "== 7. feature browser: every live latent of the layer-2 SAE (top images with heatmaps, text contexts)"
python sae/evaluation/browse_features.py --sae runs/demo/sae/saes/L2 --offset 448 --limit 64 --top-n 8 \
  --vectors runs/demo/vectors --probes results/probes --out results/browser --overwrite
python scripts/screenshot_browser.py --site results/browser --out results
echo "== report"
python scripts/make_report.py
