#!/usr/bin/env bash
# A/B of a forward or backward change in one GPU run, so both sides share the card and the dense
# baseline's conditions: build the working tree (A), bench it, apply PATCH (B), rebuild
# (incremental), run the backward tests (or AB_TESTS) on B, bench B.
#   usage: [BWD_SEQLENS="32768 131072"] [AB_TESTS="tests"] [AB_PROFILE=131072] [AB_SANITIZE=1]
#          [AB_OPS=attn,kl AB_PROFILE_MODES=--kl AB_SAN_FILE=tests/test_kl_gpu.py] scripts/bwd_ab.sh OUT_DIR PATCH
# (AB_OPS: bench_ops.py's ops, default attn,bwd; AB_PROFILE: bench/profile_fwd.py's per-kernel split
# at that length of each of AB_PROFILE_MODES (default "fwd --backward"; fwd: the forward), on both sides;
# AB_SANITIZE: compute-sanitizer memcheck and racecheck on B, over AB_SAN_FILE (default the
# backward's tests) with SAN_FILTER as in bwd_cycle.sh)
set -uo pipefail
OUT=${1:?usage}; PATCH=${2:?usage}; STEPS=build
source "$(dirname "$0")/cycle_common.sh"
bench() {  # bench NAME: attn forward + backward beside dense, JSON under OUT/NAME
  timeout 240 python3 bench/bench_ops.py --ops ${AB_OPS:-attn,bwd} --seqlens ${BWD_SEQLENS:-32768 131072} --out "$OUT/$1" 2>&1 \
    | grep -v -i warn | grep -E "^ +[0-9]+ +(dense|block|indexer)|kl/attn" | head -16
  if [[ -n "${AB_PROFILE:-}" ]]; then
    for dir in ${AB_PROFILE_MODES:-fwd --backward}; do
      [[ $dir == fwd ]] && dir=""
      timeout 120 python3 bench/profile_fwd.py --seqlen "$AB_PROFILE" --reps 3 $dir 2>&1 | grep -v -i warn | head -9
    done
  fi
}
build_step; bench A
apply_patch "$PATCH" || exit 1
build_step
kernel_resources _ZN3msa3bwd10bwd_kernel
pytest_step "tests (B): ${AB_TESTS:-tests/test_bwd_gpu.py}" tests_B.log 300 ${AB_TESTS:-tests/test_bwd_gpu.py}
bench B
if [[ -n "${AB_SANITIZE:-}" ]]; then
  sanitize_step "${SAN_FILTER:-varlen and not deterministic}" ${AB_SAN_FILE:-tests/test_bwd_gpu.py}
fi
