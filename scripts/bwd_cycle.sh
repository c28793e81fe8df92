#!/usr/bin/env bash
# Backward-focused GPU cycle: build, backward tests, the whole suite, the backward bench against
# dense cuDNN in the same run, compute-sanitizer on the backward's varlen and deterministic tests.
#   usage: scripts/bwd_cycle.sh OUT_DIR [steps: build,bwdtest,test,bench,sanitize]
set -uo pipefail
OUT=${1:?usage}; STEPS=${2:-build,bwdtest,bench}
source "$(dirname "$0")/cycle_common.sh"
if has build; then
  build_step  # the backward kernels' resource lines, summarized:
  kernel_resources _ZN3msa3bwd10bwd_kernel
fi
if has bwdtest; then pytest_step "bwd tests" bwdtests.log 300 tests/test_bwd_gpu.py; fi
if has test; then pytest_step tests tests.log 240 tests; fi
if has bench; then
  timeout 300 python3 bench/bench_ops.py --ops attn,bwd --seqlens ${BWD_SEQLENS:-32768 131072} --out "$OUT" 2>&1 \
    | grep -v -i warn | tail -30
fi
# (racecheck of "varlen or deterministic_caller" did not finish in 200 s: 2 of 5 tests.)
if has sanitize; then sanitize_step "${SAN_FILTER:-varlen and not deterministic}" tests/test_bwd_gpu.py; fi
