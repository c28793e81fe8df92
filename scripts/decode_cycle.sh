#!/usr/bin/env bash
# Decode-focused GPU cycle: build, decode tests, the whole suite, decode bench (+ per-kernel profile).
#   usage: scripts/decode_cycle.sh OUT_DIR [steps: build,dtest,test,bench,ncu,pmsample,sanitize]
# pmsample: ncu's PM sampling of one indexer launch (throughput over time inside the kernel: the
# ramp, the streaming and the tail of the ~9 us fixed cost in bench/RESULTS.md), bf16 and fp8.
set -uo pipefail
OUT=${1:?usage}; STEPS=${2:-build,dtest,bench}
source "$(dirname "$0")/cycle_common.sh"
if has build; then build_step "decode.*(registers|stack)"; fi
if has dtest; then pytest_step "decode tests" dtests.log 240 tests/test_decode_gpu.py tests/test_kvcache.py; fi
if has test; then pytest_step tests tests.log 200 tests; fi
if has bench; then
  timeout 240 python3 bench/bench_decode.py --profile --fp8 --append --timeline --layers 4 --out "$OUT" 2>&1 | grep -v -i warn | tail -100
fi
if has ncu; then
  for flag in "" --fp8; do
    # Unlocked clocks (ncu's default base clock changes the SM : DRAM ratio of a streaming kernel).
    timeout 200 ncu --clock-control none --kernel-name regex:decode_select_split --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
      --section LaunchStats --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
      --section SourceCounters -o "/tmp/select${flag}" python3 bench/decode_step_once.py 1048576 2 $flag \
      > "$OUT/ncu_select_run${flag}.log" 2>&1
    echo "ncu $flag rc=$?"; tail -2 "$OUT/ncu_select_run${flag}.log"
    ncu --import "/tmp/select${flag}.ncu-rep" --page details --print-details all > "$OUT/ncu_select${flag}.txt" 2>&1
    ncu --import "/tmp/select${flag}.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_select_source${flag}.csv" 2>&1
    grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Stall|Warp Cycles Per Issued|Issued Warp|Eligible|L2 Hit|Achieved Occupancy|Registers Per|Block Limit" "$OUT/ncu_select${flag}.txt" | head -24
  done
fi
if has pmsample; then  # (its own step: an ncu without the PmSampling sections fails the whole run)
  for flag in "" --fp8; do
    timeout 200 ncu --clock-control none --kernel-name regex:decode_select_split --launch-skip 2 --launch-count 1 \
      --section PmSampling --section SpeedOfLight --print-details all \
      python3 bench/decode_step_once.py 1048576 2 $flag > "$OUT/pmsample_select${flag}.txt" 2>&1
    echo "pmsample $flag rc=$?"; grep -iE "duration|dram|error" "$OUT/pmsample_select${flag}.txt" | head -8
  done
fi
if has sanitize; then
  sanitize_step "bad_lengths or (configs and bfloat16-d64-di64-bs64) or (configs and float16-d128-di128-bs128) or (topk_and_forced and 7-1-2) or (fp8_index_cache and bf16 and paged)" \
    tests/test_decode_gpu.py
fi
