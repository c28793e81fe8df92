#!/usr/bin/env bash
# Forward-focused GPU cycle: build, forward tests, the whole suite, a sweep of the forward's knobs
# (e.g. the partial budget) in one process, the forward bench against dense cuDNN in the same
# run, compute-sanitizer on the chunked forward tests.
# ncu: one forward main-kernel launch at FWD_NCU_SEQLEN (default 32K): bytes, L2 hit rate, stalls.
#   usage: scripts/fwd_cycle.sh OUT_DIR [steps: build,fwdtest,test,sweep,bench,ncu,sanitize]
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
if has ncu; then  # launch 0 is the warm-up call's
  timeout 240 ncu --clock-control none --kernel-name regex:fwd_kernel --launch-skip 1 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section SourceCounters \
    --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct \
    -o /tmp/fwd_prof python3 bench/profile_fwd.py --no-profiler --reps 1 --seqlen ${FWD_NCU_SEQLEN:-32768} \
    > "$OUT/ncu_fwd_run.log" 2>&1
  echo "ncu rc=$?"; tail -2 "$OUT/ncu_fwd_run.log"
  ncu --import /tmp/fwd_prof.ncu-rep --page details --print-details all > "$OUT/ncu_fwd.txt" 2>&1
  ncu --import /tmp/fwd_prof.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_fwd_source.csv" 2>&1
  grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Stall|Warp Cycles Per Issued|Issued Warp|Eligible|L2 Hit|Pipe|Tensor|Executed Ipc|dram__bytes|lts__t_sector" "$OUT/ncu_fwd.txt" | head -40
fi
if has sanitize; then sanitize_step "${SAN_FILTER:-many_chunks or (varlen and chunked)}" tests/test_fwd_gpu.py; fi
