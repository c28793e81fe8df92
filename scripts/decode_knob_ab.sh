#!/usr/bin/env bash
# A/B of a decode runtime knob in one GPU run (one build): the decode tests, then bench_decode.py
# once per value of the knob, in the order given (repeat values to see the run-to-run spread),
# each in its own process beside dense decoding.
#   usage: KNOB=NAME VALUES="1 0 1 0" [DECODE_BENCH_ARGS="..."] [STEPS=build,test,bench]
#          scripts/decode_knob_ab.sh OUT_DIR
set -uo pipefail
OUT=${1:?usage}; STEPS=${STEPS:-build,test,bench}
source "$(dirname "$0")/cycle_common.sh"
has build && build_step
has test && pytest_step "decode tests" dtests.log 300 tests/test_decode_gpu.py tests/test_kvcache.py
if has bench; then
  i=0
  for value in ${VALUES:?}; do
    i=$((i + 1)); mkdir -p "$OUT/${KNOB:?}_${i}_$value"
    echo "== $KNOB=$value (run $i)"
    env "$KNOB=$value" timeout 240 python3 bench/bench_decode.py ${DECODE_BENCH_ARGS:---fp8 --layers 4} \
      --out "$OUT/${KNOB}_${i}_$value" 2>&1 | grep -v -i warn | grep -E "graph|per layer|clusters|Error|error" | tail -20
  done
fi
