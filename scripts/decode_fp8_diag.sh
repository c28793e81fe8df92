#!/usr/bin/env bash
# fp8 decode indexer diagnostics in one GPU run (timing only; the no-scales build scores wrongly):
# the default build, a build without the scale loads (-DMSA_DECODE_PROFILE_NO_SCALES) and one with
# an 88 KB key ring (-DMSA_DECODE_RING_KB=88: 11 fp8 stages), each benched beside dense decoding.
#   usage: scripts/decode_fp8_diag.sh OUT_DIR
set -uo pipefail
OUT=${1:?usage}; STEPS=build
source "$(dirname "$0")/cycle_common.sh"
b() { timeout 150 python3 bench/bench_decode.py --profile --fp8 --layers 4 --out "$OUT/$1" 2>&1 | grep -v -i warn | grep -E "fp8|select|per layer" ; }
build_step; echo "== default"; b default
set_profile_define MSA_DECODE_PROFILE_NO_SCALES || exit 1
build_step; echo "== no scales"; b noscales
sed -i "/^-DMSA_DECODE_PROFILE_NO_SCALES/d" cmake/nvcc_flags.txt
set_profile_define MSA_DECODE_RING_KB=88 || exit 1
build_step; echo "== ring 88 KB"; b ring88
