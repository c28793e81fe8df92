#!/usr/bin/env bash
# Backward-focused GPU cycle: build, backward tests, the whole suite, the backward bench against
# dense cuDNN in the same run, compute-sanitizer on the backward's varlen and deterministic tests.
#   usage: scripts/bwd_cycle.sh OUT_DIR [steps: build,bwdtest,test,bench,sanitize]
set -uo pipefail
OUT=${1:?usage}; STEPS=${2:-build,bwdtest,bench}
source "$(dirname "$0")/cycle_common.sh"
if has build; then
  build_step  # the backward kernels' resource lines, summarized:
  grep -A3 "Compiling entry function '_ZN3msa3bwd10bwd_kernel" /tmp/build.log | grep -E "Used|spill" | sort | uniq -c | head -12
fi
if has bwdtest; then
  timeout 300 python3 -m pytest tests/test_bwd_gpu.py -q -x -rs > "$OUT/bwdtests.log" 2>&1
  echo "bwd tests rc=$?"; tail -30 "$OUT/bwdtests.log"
fi
if has test; then
  timeout 240 python3 -m pytest tests -q -x > "$OUT/tests.log" 2>&1; echo "tests rc=$?"; tail -5 "$OUT/tests.log"
fi
if has bench; then
  timeout 300 python3 bench/bench_ops.py --ops attn,bwd --seqlens ${BWD_SEQLENS:-32768 131072} --out "$OUT" 2>&1 \
    | grep -v -i warn | tail -30
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 compute-sanitizer --tool $tool --print-limit 10 python3 -m pytest \
      tests/test_bwd_gpu.py -q -x -k "${SAN_FILTER:-varlen or deterministic_caller}" > "$OUT/san_$tool.log" 2>&1
    echo "$tool rc=$? $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/san_$tool.log" | tr '\n' ' ')"
  done
fi
