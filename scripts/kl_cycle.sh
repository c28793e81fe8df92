#!/usr/bin/env bash
# KL-focused GPU cycle: build, KL tests, the whole suite, the KL timings (with --kl-dense when
# KL_DENSE=1), per-kernel profile of the training call at each of KL_SEQLENS (profile), ncu
# on one pass-2 launch at 32K (ncu).
# sweep: a knob KL_SWEEP_VAR over KL_SWEEP_VALUES at KL_SEQLENS.
#   usage: scripts/kl_cycle.sh OUT_DIR [steps: build,kltest,test,sweep,bench,profile,ncu,sanitize]
set -uo pipefail
OUT=${1:?usage}; STEPS=${2:-build,kltest,bench}
source "$(dirname "$0")/cycle_common.sh"
if has build; then
  build_step  # the dense KL kernels' resource lines, summarized:
  kernel_resources _ZN3msa2kl15kl_dense
fi
if has kltest; then pytest_step "kl tests" kltests.log 300 tests/test_kl_gpu.py; fi
if has test; then pytest_step tests tests.log 240 tests; fi
if has bench; then
  timeout 300 python3 bench/bench_ops.py --ops attn,kl $([[ ${KL_DENSE:-1} == 1 ]] && echo --kl-dense) \
    --seqlens ${KL_SEQLENS:-8192 32768} --out "$OUT" 2>&1 | grep -v -i warn | tail -40
fi
if has sweep; then  # an environment knob of the KL (KL_SWEEP_VAR over KL_SWEEP_VALUES) in one process
  timeout 300 python3 bench/knob_sweep.py --op kl --var ${KL_SWEEP_VAR:?} --values ${KL_SWEEP_VALUES:?} \
    --seqlens ${KL_SEQLENS:-32768} 2>&1 | grep -v -i warn | tail -24
fi
if has profile; then
  for s in ${KL_SEQLENS:-32768}; do timeout 120 python3 bench/profile_fwd.py --kl --seqlen $s 2>&1 | grep -v -i warn; done
fi
if has ncu; then  # the second call's pass-2 launch (kl_kernel: pass 1, pass 2 per call)
  timeout 240 ncu --clock-control none --kernel-name regex:kl_kernel --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section SourceCounters \
    --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct \
    -o /tmp/kl_prof python3 bench/profile_fwd.py --kl --no-profiler --reps 2 --seqlen 32768 > "$OUT/ncu_kl_run.log" 2>&1
  echo "ncu rc=$?"; tail -2 "$OUT/ncu_kl_run.log"
  ncu --import /tmp/kl_prof.ncu-rep --page details --print-details all > "$OUT/ncu_kl.txt" 2>&1
  ncu --import /tmp/kl_prof.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_kl_source.csv" 2>&1
  grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Stall|Warp Cycles Per Issued|Issued Warp|Eligible|L2 Hit|Pipe|Tensor|Executed Ipc|dram__bytes|lts__t_sector" "$OUT/ncu_kl.txt" | head -40
fi
if has sanitize; then sanitize_step "${SAN_FILTER:-dense}" tests/test_kl_gpu.py; fi
