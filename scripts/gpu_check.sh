#!/usr/bin/env bash
# One GPU cycle on the lent H100/H200: install the carried CUTLASS wheel, build and install
# msa_cuda, record the compiler's resource report and a SASS summary, run the test suite with the
# GPU tests on, run compute-sanitizer on a small subset, then the benchmarks.
#   usage: scripts/gpu_check.sh OUT_DIR [STEPS]   STEPS: comma list of build,test,sanitize,bench
# Logs and JSON go to OUT_DIR; a short summary is printed last.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR [steps]}
STEPS=${2:-build,test,sanitize,bench}
mkdir -p "$OUT"
has() { [[ ",$STEPS," == *",$1,"* ]]; }
summary=()

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

if has build; then
  start=$(date +%s)
  python3 -m pip install --no-build-isolation --no-deps --no-index -v . > "$OUT/build.log" 2>&1
  rc=$?
  summary+=("build rc=$rc in $(( $(date +%s) - start ))s")
  grep -E "ptxas (info|warning)|bytes stack frame" "$OUT/build.log" > "$OUT/ptxas.txt" || true
  so=$(python3 -c "import msa_cuda._C as c; print(c.__file__)" 2>/dev/null)
  if [[ -n "$so" ]]; then
    cuobjdump -sass "$so" > /tmp/sass.txt 2>/dev/null
    {
      echo "HGMMA: $(grep -c HGMMA /tmp/sass.txt)  HMMA: $(grep -c ' HMMA' /tmp/sass.txt)"
      echo "LDL/STL (local memory): $(grep -cE ' (LDL|STL)' /tmp/sass.txt)"
      grep -E "Used [0-9]+ registers|stack frame" "$OUT/ptxas.txt" | sort | uniq -c
    } > "$OUT/sass_summary.txt"
    summary+=("$(head -2 "$OUT/sass_summary.txt" | tr '\n' ' ')")
  else
    tail -40 "$OUT/build.log"
  fi
fi

if has test; then
  python3 -m pytest tests -q -x -rs --durations=15 > "$OUT/tests.log" 2>&1
  summary+=("tests rc=$? : $(tail -1 "$OUT/tests.log")")
fi

if has sanitize; then
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --print-limit 20 \
      python3 -m pytest tests/test_select_gpu.py tests/test_fwd_gpu.py tests/test_bwd_gpu.py tests/test_kl_gpu.py tests/test_decode_gpu.py -q -x \
      -k "test_decode_bad_lengths or test_decode_append_in_place or test_kl_varlen or test_kl_every_support_empty or test_select_topk_exceeds_blocks or test_select_varlen_matches_padded or test_fwd_varlen_matches_padded or test_fwd_paths_agree_on_sparse_selections or test_select_cu_seqlens_overrunning or test_bwd_varlen" \
      > "$OUT/sanitizer_$tool.log" 2>&1
    summary+=("$tool rc=$? : $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitizer_$tool.log" | tr '\n' ' ')")
  done
fi

if has bench; then
  python3 bench/bench_ops.py --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
  summary+=("bench rc=$?")
  tail -40 "$OUT/bench.log"
fi

echo "==== summary ===="
printf '%s\n' "${summary[@]}"
