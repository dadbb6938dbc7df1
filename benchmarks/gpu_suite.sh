#!/usr/bin/env bash
# Everything kvpr measures or checks on a GPU, in one device call. Full JSON goes to $OUT,
# a short table is printed last. Usage (repo root): bash benchmarks/gpu_suite.sh [tests|bench|all] [suites...]
# with SYSTEMS="kvpr-off kvpr-kvo floor" (default: bench_latency's) and TAG=latency-kvo (file stem).
# Pass KVPR_COMMIT=<hash> from the checkout: the device's copy of .git may be an older snapshot.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"
mode="${1:-all}"; shift || true
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 - <<'PY'
import torch, transformers
print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, "transformers", transformers.__version__)
PY
if [ "$mode" = tests ] || [ "$mode" = all ]; then
  python3 -m pytest tests/test_gpu.py tests/test_models.py tests/test_runtime.py -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
if [ "$mode" = bench ] || [ "$mode" = all ]; then
  python3 benchmarks/bench_latency.py --suite "${@:-paper}" --out "$OUT" --commit "${KVPR_COMMIT:-unknown}" \
    --host-memory-gib "${HOST_MEMORY_GIB:-100}" --tag "${TAG:-latency}" ${SYSTEMS:+--systems $SYSTEMS}
fi
