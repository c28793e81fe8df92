#!/usr/bin/env bash
# Where the backward's time goes: ncu on one bwd_kernel launch at 32K (stall reasons, memory
# throughput, per-SASS-line stall samples as CSV). What the dQ costs: scripts/bwd_dq_cost.sh.
# Step l2red: L2 reduction / traffic counters of our backward and of the dense cuDNN backward at
# the same shape (8K, where cuDNN's launches are short), to compare the cost per reduced byte.
#   usage: scripts/bwd_profile.sh OUT_DIR [steps: build,ncu,l2red]
set -uo pipefail
OUT=${1:?usage}; STEPS=${2:-build,ncu}
source "$(dirname "$0")/cycle_common.sh"
if has build; then build_step; fi
if has ncu; then
  timeout 240 ncu --kernel-name regex:bwd_kernel --launch-skip 1 --launch-count 1 --section SpeedOfLight \
    --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters \
    -o /tmp/bwd_prof python3 bench/bwd_once.py 32768 2 > "$OUT/ncu_run.log" 2>&1
  echo "ncu rc=$?"; tail -3 "$OUT/ncu_run.log"
  ncu --import /tmp/bwd_prof.ncu-rep --page details > "$OUT/ncu_details.txt" 2>&1
  ncu --import /tmp/bwd_prof.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_source.csv" 2>&1
  grep -E "Duration|Throughput|Stall|Warp Cycles|Issued|Eligible|Active Warps|L2 Hit|Mem Busy" "$OUT/ncu_details.txt" | head -40
  ls -la "$OUT"
fi
if has l2red; then  # (sections, not raw metric names: one unknown name fails the whole run)
  for which in msa dense; do
    timeout 200 ncu --section SpeedOfLight --section MemoryWorkloadAnalysis_Tables --print-details all \
      --launch-skip 0 --launch-count 40 python3 bench/bwd_once.py 8192 1 $which > "$OUT/l2red_$which.txt" 2>&1
    echo "l2red $which rc=$?"
    grep -E "^  [a-zA-Z_].*\(|Duration|Reduction|Red|Atom|L2 Cache Throughput|DRAM Throughput" "$OUT/l2red_$which.txt" | head -60
  done
fi
