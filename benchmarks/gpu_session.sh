#!/usr/bin/env bash
# One device call for a change to the runtime, the server and the KVO prefill: the GPU tests that
# cover them, then the serve and KVO-prefill benchmarks, each within its own time limit so a slow
# part never eats the next one's. Logs and JSON go to $OUT; a short table is printed last.
# Usage (repo root; the device's copy has no usable .git, so name the commit; carry .whl-serve):
#   GIT_DIR=/nonexistent KVPR_COMMIT=<full hash> KVPR_DIRTY=0 bash benchmarks/gpu_session.sh [tests] [serve] [kvo] [kvo-encode] [tiered] [kvo-e2e] [graph]
# kvo-encode: the fused KVO encoder against the torch one (one layer's shape, then the whole prefill both ways).
# tiered: bench_tiered --suite $TIERED_SUITE (share-075), then the paper workload fully offloaded.
# kvo-e2e: KVO (--compile) end to end against kvpr-auto at opt-6.7b 16 x 2016 + 16 (issue 14's target).
# graph: --offload none with the CUDA-graph step against --no-cuda-graph, llama-3-8b 8 x 8184 + 8.
# Env: OUT (benchmarks/results), TESTS_S (240), SERVE_S (320), KVO_S (110), TIERED_S (300), PAPER_S (150), E2E_S (240),
# GRAPH_S (200), TESTS_K (a -k filter),
# SERVE_MODES ("thread process": the engine in a thread, then in its own process, on the same load).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"; mkdir -p "$OUT"
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(tests serve kvo)
if [ -d .whl-serve ]; then  # the server's stack and the openai client (carry .whl-serve: the device reaches no registry)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl-serve/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
stem=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")-$(date -u +%Y%m%d)
began=$SECONDS
for part in "${parts[@]}"; do
  case "$part" in
    tests)
      log="$OUT/gpu-tests-$stem-session.log"
      files=(tests/test_gpu.py tests/test_split_attention.py tests/test_kvo_prefill.py tests/test_kvo_encode_triton.py)
      # the server's tests need its stack (carry .whl-serve); without it they are left out, not failed at collection
      python3 -c "import openai, uvicorn" 2>/dev/null && files+=(tests/test_serve.py)
      echo "# commit ${KVPR_COMMIT:-unknown} (dirty: ${KVPR_DIRTY:-unknown}): ${files[*]} -k '${TESTS_K:-}'" > "$log"
      timeout -k 5 "${TESTS_S:-240}" python3 -m pytest "${files[@]}" -q -p no:cacheprovider -rfE ${TESTS_K:+-k "$TESTS_K"} >> "$log" 2>&1
      echo "pytest rc $?" >> "$log"; tail -6 "$log" ;;
    serve)
      timeout -s INT -k 10 "${SERVE_S:-320}" python3 benchmarks/bench_serve.py --model opt-6.7b --dummy-weights \
        --offload cpu --recompute 1.0 --clients 32 --requests 3 --prompt-len 256 --max-tokens 32 --out "$OUT" \
        --engine-modes ${SERVE_MODES:-thread process} 2>&1 | grep -v "it/s\]\|s/it\]" | tail -6 ;;
    kvo)
      timeout -s INT -k 10 "${KVO_S:-110}" python3 benchmarks/bench_kvo_prefill.py --model opt-6.7b --batch-size 16 \
        --prompt-len 2016 --device cuda --dtype float16 --repeats 3 --out "$OUT" 2>&1 | grep -v "it/s\]\|s/it\]" | tail -12 ;;
    kvo-encode)
      timeout -s INT -k 10 "${KVO_S:-110}" python3 benchmarks/bench_kvo_encode.py --device cuda --out "$OUT" 2>&1 | tail -12
      for encoder in torch fused; do
        timeout -s INT -k 10 "${KVO_S:-110}" python3 benchmarks/bench_kvo_prefill.py --model opt-6.7b --batch-size 16 \
          --prompt-len 2016 --device cuda --dtype float16 --repeats 3 --encoder "$encoder" --out "$OUT" 2>&1 | tail -3
      done ;;
    tiered)  # the host-bound tiered point (GPU share 0.75) and the paper workload fully offloaded
      timeout -s INT -k 10 "${TIERED_S:-300}" python3 benchmarks/bench_tiered.py --suite ${TIERED_SUITE:-share-075} \
        --out "$OUT" 2>&1 | grep -v "it/s\]\|s/it\]" | tail -8
      timeout -s INT -k 10 "${PAPER_S:-150}" python3 benchmarks/bench_latency.py --run paper:kvpr-off,kvpr-auto,floor \
        --out "$OUT" 2>&1 | grep -v "it/s\]\|s/it\]" | tail -8 ;;
    graph)  # the resident-only step as a CUDA graph against eager, same run (llama-3-8b 8 x 8184)
      OUT="$OUT" TAG=latency-gqa-graph BUDGET_S="${GRAPH_S:-200}" bash benchmarks/gpu_suite.sh bench \
        "gqa-8k:kvpr-gpu,kvpr-gpu-eager" 2>&1 | tail -5 ;;
    kvo-e2e)  # KVO end to end (its prefill and 16 decode steps) against kvpr-auto, opt-6.7b 16 x 2016 + 16
      timeout -s INT -k 10 "${E2E_S:-240}" python3 benchmarks/bench_latency.py --run kvo:kvpr-auto,kvpr-kvo-compile \
        --out "$OUT" --tag latency-kvo-e2e 2>&1 | grep -v "it/s\]\|s/it\]" | tail -6 ;;
    *) echo "unknown part $part (tests, serve, kvo, kvo-encode, tiered, kvo-e2e, graph)"; exit 2 ;;
  esac
  echo "== $part done at $(( SECONDS - began )) s"
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("serve-*.json")):
    r = json.loads(path.read_text())
    o = r["offline"]
    for mode, s in r.get("serve_by_mode", {r.get("engine_mode", "thread"): r["serve"]}).items():
        print(f"{path.name} ({mode}): serve {s['tokens_per_s']:.0f} tok/s [{s['tokens_per_s_min']:.0f}-{s['tokens_per_s_max']:.0f}] "
              f"vs offline decode {o['decode_tokens_per_s']:.0f} = {s['tokens_per_s'] / o['decode_tokens_per_s']:.0%}; "
              f"step {s.get('step_ms', 0):.1f} ms vs {o['decode_ms_per_token']:.1f}; joins {s.get('joins')}, ttft {s['ttft_s']:.2f} s")
for path in sorted(Path(sys.argv[1]).glob("kvo-prefill-*.json")):
    r = json.loads(path.read_text())
    phases = ", ".join(f"{name} {t:.2f}" for name, t in r.get("phases_s", {}).items())
    print(f"{path.name}: kvo {r['kvo_s']:.2f} s vs dense {r['dense_s']:.2f} s = {r['ratio']:.2f}x; phases (s): {phases}")
PY
