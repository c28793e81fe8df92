#!/usr/bin/env bash
# KL-focused GPU cycle: build, KL tests, the whole suite, the dense warm-up KL timing.
#   usage: scripts/kl_cycle.sh OUT_DIR [steps: build,kltest,test,bench,sanitize]
set -uo pipefail
OUT=${1:?usage}; STEPS=${2:-build,kltest,bench}
source "$(dirname "$0")/cycle_common.sh"
if has build; then
  build_step  # the dense KL kernels' resource lines, summarized:
  grep -A3 "Compiling entry function '_ZN3msa2kl15kl_dense" /tmp/build.log | grep -E "Used|spill" | sort | uniq -c | head -12
fi
if has kltest; then
  timeout 300 python3 -m pytest tests/test_kl_gpu.py -q -x -rs > "$OUT/kltests.log" 2>&1
  echo "kl tests rc=$?"; tail -30 "$OUT/kltests.log"
fi
if has test; then
  timeout 240 python3 -m pytest tests -q -x > "$OUT/tests.log" 2>&1; echo "tests rc=$?"; tail -5 "$OUT/tests.log"
fi
if has bench; then
  timeout 300 python3 bench/bench_ops.py --ops attn,kl --kl-dense --seqlens ${KL_SEQLENS:-8192 32768} --out "$OUT" 2>&1 \
    | grep -v -i warn | tail -40
fi
if has sanitize; then
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 compute-sanitizer --tool $tool --print-limit 10 python3 -m pytest \
      tests/test_kl_gpu.py -q -x -k "${SAN_FILTER:-dense}" > "$OUT/san_$tool.log" 2>&1
    echo "$tool rc=$? $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/san_$tool.log" | tr '\n' ' ')"
  done
fi
