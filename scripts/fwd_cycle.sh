#!/usr/bin/env bash
# Forward-focused GPU cycle: build, forward tests, the whole suite, a sweep of the forward's knobs
# (e.g. the partial budget) in one process, the forward bench against dense cuDNN in the same
# run, compute-sanitizer on the chunked forward tests.
#   usage: scripts/fwd_cycle.sh OUT_DIR [steps: build,fwdtest,test,sweep,bench,sanitize]
# SWEEP_VAR / SWEEP_VALUES / SWEEP_SEQLENS pick the sweep (default: the partial budget MSA_FWD_PARTIAL_KIB).
set -uo pipefail
OUT=${1:?usage}; STEPS=${2:-build,fwdtest,sweep}
source "$(dirname "$0")/cycle_common.sh"
if has build; then
  build_step  # the forward kernels' resource lines, summarized:
  kernel_resources _ZN3msa3fwd10fwd_kernel
fi
if has fwdtest; then pytest_step "fwd tests" fwdtests.log 300 tests/test_fwd_gpu.py; fi
if has test; then pytest_step tests tests.log 300 tests; fi
if has sweep; then
  timeout 300 python3 bench/knob_sweep.py --op fwd --var ${SWEEP_VAR:-MSA_FWD_PARTIAL_KIB} \
    --values ${SWEEP_VALUES:-1048576 2097152 4194304} --seqlens ${SWEEP_SEQLENS:-32768 131072} 2>&1 | grep -v -i warn | tail -24
fi
if has bench; then
  timeout 300 python3 bench/bench_ops.py --ops select,attn,hot,sparse_attn --seqlens ${FWD_SEQLENS:-32768 131072} \
    --out "$OUT" 2>&1 | grep -v -i warn | tail -30
fi
if has sanitize; then sanitize_step "${SAN_FILTER:-many_chunks or (varlen and chunked)}" tests/test_fwd_gpu.py; fi
