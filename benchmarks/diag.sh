#!/usr/bin/env bash
# Trace one configuration on the GPU and say where its decode step goes:
#   bash benchmarks/diag.sh NAME <kvpr bench flags...>
# runs `kvpr bench --dummy-weights --offload cpu <flags> --trace $OUT/trace-NAME.json`, prints the last
# line of the bench and benchmarks/trace_report.py's per-stream table, and gzips the trace.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp}"
name="$1"; shift
trace="$OUT/trace-$name.json"
python3 -m kvpr bench --dummy-weights --offload cpu "$@" --trace "$trace" 2>&1 | tail -1
python3 benchmarks/trace_report.py "$trace" --skip 1
gzip -f "$trace"
