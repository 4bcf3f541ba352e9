#!/usr/bin/env bash
# The GPU rows, in one short run on one GPU with nothing downloaded (a lent device machine; never
# needed by the tests). Prints the benchmark table for the real-width group and the SAE step on
# CUDA in bfloat16, then trains a tiny SAE under a 1-GPU torchrun (nccl), kills it after its first
# checkpoint, resumes it and checks it finishes.
#   bash scripts/gpu_check.sh            # about 5-8 minutes on one GPU
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: run this on a GPU machine"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
echo "== benchmark: real width (LLaVA-NeXT-Mistral, 2 blocks, random bf16; SAE steps fp32 and bf16 autocast with MFU)"
echo "   SAE steps and the multiple-choice splice (eval_benchmark vs the paper's loop) on cuda (host-RSS rows: CPU run)"
python scripts/benchmark.py --only realwidth sae mc_benchmark --device cuda --dtype bfloat16 --repeats 10
echo "== 1-GPU torchrun (nccl): three SAEs from one harvest, kill after the first checkpoint, --resume"
OUT="$(mktemp -d)/sae-gpu"
COMMON=(sae/sae-trainer.py --layer 1 2 3 --expansion 4 --batch-size 1024 --total-tokens 200000
        --checkpoint-every 20 --records-per-forward 8 --out "$OUT")
torchrun --standalone --nproc_per_node 1 "${COMMON[@]}" --step-delay 0.05 &
PID=$!
for _ in $(seq 600); do [ -f "$OUT/checkpoints/latest" ] && break; sleep 0.5; done
kill -9 "$PID" 2>/dev/null || true
pkill -9 -f -- "--out $OUT" 2>/dev/null || true
sleep 2
torchrun --standalone --nproc_per_node 1 "${COMMON[@]}" --resume
python - "$OUT" <<'PY'
import json, sys
rec = json.load(open(sys.argv[1] + "/run.json"))
print("resumed run:", rec["status"], "| sessions:", len(rec.get("sessions", [])) + 1, "|", rec["summary"])
assert rec["status"] == "done" and rec.get("sessions"), "the resumed run did not finish"
PY
