#!/usr/bin/env bash
# Shared start of the focused GPU cycles (decode_cycle.sh, kl_cycle.sh): sourced with the cycle's
# OUT and STEPS set. Installs the carried CUTLASS wheel, names the card, and defines `has STEP`
# and `build_step [PATTERN]` (pip install of the working tree, its log kept in OUT; prints the
# errors and the log lines matching PATTERN).
has() { [[ ",$STEPS," == *",$1,"* ]]; }
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
build_step() {
  local s
  s=$(date +%s); python3 -m pip install --no-build-isolation --no-deps --no-index -v . > /tmp/build.log 2>&1
  echo "build rc=$? $(( $(date +%s) - s ))s"; cp /tmp/build.log "$OUT/build.log"
  grep -E "error" /tmp/build.log | head -20
  if [[ -n "${1:-}" ]]; then grep -E "$1" /tmp/build.log | head -30; fi
}
