#!/usr/bin/env bash
# Issue 3: the forward's DRAM bytes and L2 hit rate against the byte model (bench/RESULTS.md):
# ncu on one launch each of the main kernel and the combine (the second launch of each, after a
# warm-up forward) at M3 shape with the indexer's selection.
#   usage: [SEQLENS="32768 131072"] scripts/fwd_bytes.sh OUT_DIR [steps: build,ncu]
set -uo pipefail
OUT=${1:?usage}; STEPS=${2:-build,ncu}
source "$(dirname "$0")/cycle_common.sh"
has build && build_step
if has ncu; then
  metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct
  metrics=$metrics,lts__t_bytes.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
  metrics=$metrics,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed
  for s in ${SEQLENS:-32768 131072}; do
    for k in fwd_kernel combine_kernel; do
      timeout 200 ncu --kernel-name "regex:$k" --launch-skip 1 --launch-count 1 --metrics "$metrics" \
        python3 bench/profile_fwd.py --no-profiler --seqlen "$s" --reps 1 > "$OUT/ncu_${k}_$s.txt" 2>&1
      echo "== $k S=$s rc=$?"
      grep -E "gpu__time|dram__|lts__|sm__pipe|==ERR|PROF" "$OUT/ncu_${k}_$s.txt" | head -12
    done
  done
fi
