#!/usr/bin/env bash
# Everything kvpr measures or checks on a GPU, in one device call of at most BUDGET_S seconds:
#   (a) the GPU tests, log in $OUT; (b) bench_latency, --repeats $REPEATS, JSON/markdown/PNG and the
#   profiles in $OUT; (c) a short table of medians and floors, printed last.
# Usage (repo root), with the checkout's commit (the device's copy has no usable .git; print it here
# with `python3 benchmarks/provenance.py`):
#   KVPR_COMMIT=<full hash> KVPR_DIRTY=0 bash benchmarks/gpu_suite.sh [all|tests|bench] [SUITE:SYSTEM,SYSTEM ...]
# Default runs: RUNS below. Env: OUT (benchmarks/results), REPEATS (3), TAG (latency), HOST_MEMORY_GIB (100),
# BUDGET_S (560: the bench is stopped in time for the table; rows are written as they finish),
# ALLOW_DIRTY=1 (write results without a clean commit; recorded in the JSON).
set -uo pipefail
began=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"; REPEATS="${REPEATS:-3}"; TAG="${TAG:-latency}"; BUDGET_S="${BUDGET_S:-560}"
RUNS=(
  "paper:hf-offloaded,kvpr-off,kvpr-auto,kvpr-x4,floor"
  "long16:kvpr-off,kvpr-auto,kvpr-kvo-compile,floor"
  "llama-2048:kvpr-off,kvpr-int4,kvpr-x4"
)
mode="${1:-all}"; shift || true
[ $# -gt 0 ] && RUNS=("$@")
mkdir -p "$OUT"
echo "commit: ${KVPR_COMMIT:-unset} dirty: ${KVPR_DIRTY:-unset}; runs: ${RUNS[*]}; repeats $REPEATS; budget ${BUDGET_S}s"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
stem=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")-$(date -u +%Y%m%d)
left() { echo $(( BUDGET_S - (SECONDS - began) - ${1:-0} )); }

if [ "$mode" = tests ] || [ "$mode" = all ]; then
  log="$OUT/gpu-tests-$stem.log"
  echo "# commit ${KVPR_COMMIT:-unknown} (dirty: ${KVPR_DIRTY:-unknown}): tests/test_gpu.py tests/test_models.py tests/test_runtime.py" > "$log"
  timeout -k 10 "$(( $(left 300) < 150 ? $(left 300) : 150 ))" \
    python3 -m pytest tests/test_gpu.py tests/test_models.py tests/test_runtime.py -q -p no:cacheprovider 2>&1 \
    | tee -a "$log" | tail -15
fi
if [ "$mode" = bench ] || [ "$mode" = all ]; then
  # SIGINT first: the rows already written stay; the table below reads them.
  timeout -s INT -k 15 "$(left 25)" python3 benchmarks/bench_latency.py --run "${RUNS[@]}" --repeats "$REPEATS" \
    --out "$OUT" --tag "$TAG" --host-memory-gib "${HOST_MEMORY_GIB:-100}" ${ALLOW_DIRTY:+--allow-dirty} 2>&1 \
    | grep -v "it/s\]\|s/it\]" | tail -40
  echo "bench exit: ${PIPESTATUS[0]} after $(( SECONDS - began )) s"
  python3 - "$OUT/$TAG-$stem.json" <<'PY'
import json, sys
from pathlib import Path
path = Path(sys.argv[1])
if not path.exists():
    sys.exit(f"no results at {path}")
result = json.loads(path.read_text())
print(f"{path.name}: commit {result['commit'][:12]} dirty={result['dirty']} allow_dirty={result['allow_dirty']} "
      f"{result['device']} driver {result['driver']} torch {result['torch']} transformers {result['transformers']}")
print(f"{'model':<11}{'b':>3}{'s':>6} {'system':<17}{'decode ms [min-max]':>24}{'floor':>8}{'x fl':>6}{'prefill':>8}{'total':>8}")
num = lambda v, f: f"{'-':>{f.split('.')[0]}}" if v is None else format(v, f)  # noqa: E731
for r in result["rows"]:
    if r.get("skipped"):
        decode = "skipped: " + r["skipped"][:40]
    elif r.get("decode_ms_per_token_min") is not None:
        decode = f"{r['decode_ms_per_token']:.1f} [{r['decode_ms_per_token_min']:.1f}-{r['decode_ms_per_token_max']:.1f}]"
    else:
        decode = num(r.get("decode_ms_per_token"), "8.1f")
    timed = r.get("timed", True) and not r.get("skipped")
    ratio = r["decode_ms_per_token"] / r["floor_ms"] if timed and r.get("floor_ms") else None
    print(f"{r['model']:<11}{r['batch_size']:>3}{r['prompt_len']:>6} {r['system']:<17}{decode:>24}"
          f"{num(r.get('floor_ms'), '8.1f')}{num(ratio, '6.2f')}{num(r.get('prefill_s'), '8.2f')}{num(r.get('total_s'), '8.2f')}")
PY
fi
echo "gpu_suite: $(( SECONDS - began )) s"
