#!/usr/bin/env bash
# What the backward's dQ costs: rebuild with -DMSA_BWD_PROFILE_DQ=1 (dQ GEMM kept, its atomics
# skipped), =2 (no dQ at all) and =3 (dQ rows stored as bf16 instead of reduced: what per-slot
# partials would cost), timing each with bench/knob_sweep.py over the query chunk sizes given
# (wrong gradients: timing only). Compare with a plain build's sweep on the same card.
#   usage: [DQ_VARIANTS="1 2 3"] scripts/bwd_dq_cost.sh OUT_DIR [chunk sizes, default "4096 0"]
set -uo pipefail
OUT=${1:?usage}; CHUNKS=${2:-4096 0}; STEPS=build
source "$(dirname "$0")/cycle_common.sh"
for dq in ${DQ_VARIANTS:-1 2 3}; do
  set_profile_define MSA_BWD_PROFILE_DQ=$dq || exit 1
  echo "MSA_BWD_PROFILE_DQ=$dq"; build_step
  timeout 150 python3 bench/knob_sweep.py --var MSA_BWD_CHUNK_TOKENS --values $CHUNKS 2>&1 | grep -v -i warn | tail -4
done
