#!/usr/bin/env bash
# A/B of a decode change in one GPU run, so both sides share the card and dense decoding's
# conditions: build the working tree (A), bench it, apply PATCH (B), rebuild (incremental), run
# the decode tests on B, bench B.
#   usage: [DECODE_BENCH_ARGS="..."] [AB_SANITIZE=1] scripts/decode_ab.sh OUT_DIR PATCH
set -uo pipefail
OUT=${1:?usage}; PATCH=${2:?usage}; STEPS=build
source "$(dirname "$0")/cycle_common.sh"
bench() {  # bench NAME: bench_decode beside dense decoding, JSON under OUT/NAME
  mkdir -p "$OUT/$1"
  timeout 200 python3 bench/bench_decode.py ${DECODE_BENCH_ARGS:---profile --fp8 --layers 4} --out "$OUT/$1" 2>&1 \
    | grep -v -i warn | tail -40
}
build_step; bench A
apply_patch "$PATCH" || exit 1
build_step "decode_select.*(registers|stack)|C7514"
pytest_step "decode tests (B)" dtests_B.log 240 tests/test_decode_gpu.py tests/test_kvcache.py
bench B
if [[ -n "${AB_SANITIZE:-}" ]]; then
  sanitize_step "(configs and bfloat16-d128-di128-bs128) or (fp8_index_cache and bf16 and paged)" tests/test_decode_gpu.py
fi
