#!/usr/bin/env bash
# Quick look at one configuration on the GPU: decode time per placement, and a trace of one of them.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT="${OUT:-/tmp}"
model="${MODEL:-opt-1.3b}"; b="${B:-8}"; p="${P:-256}"; g="${G:-8}"
for placement in "--offload none" "--offload cpu --recompute off" "--offload cpu --recompute 1.0" "--offload cpu --recompute 0.5" "--offload cpu --recompute auto"; do
  python3 -m kvpr bench --model "$model" --dummy-weights $placement --batch-size "$b" --prompt-len "$p" --gen-len "$g"
done
trace="${TRACE:-off}"
python3 -m kvpr bench --model "$model" --dummy-weights --offload cpu --recompute "$trace" --batch-size "$b" --prompt-len "$p" --gen-len 4 --trace "$OUT/trace-$trace.json" 2>&1 | tail -22
