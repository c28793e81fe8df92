#!/usr/bin/env bash
# KL-focused GPU cycle: build, KL tests, the whole suite, the dense warm-up KL timing.
#   usage: scripts/kl_cycle.sh OUT_DIR [steps: build,kltest,test,bench,sanitize]
set -uo pipefail
OUT=${1:?usage}; STEPS=${2:-build,kltest,bench}
source "$(dirname "$0")/cycle_common.sh"
if has build; then
  build_step  # the dense KL kernels' resource lines, summarized:
  kernel_resources _ZN3msa2kl15kl_dense
fi
if has kltest; then pytest_step "kl tests" kltests.log 300 tests/test_kl_gpu.py; fi
if has test; then pytest_step tests tests.log 240 tests; fi
if has bench; then
  timeout 300 python3 bench/bench_ops.py --ops attn,kl --kl-dense --seqlens ${KL_SEQLENS:-8192 32768} --out "$OUT" 2>&1 \
    | grep -v -i warn | tail -40
fi
if has sanitize; then sanitize_step "${SAN_FILTER:-dense}" tests/test_kl_gpu.py; fi
