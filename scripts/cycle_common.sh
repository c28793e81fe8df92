#!/usr/bin/env bash
# Shared start of the focused GPU cycles (decode_cycle.sh, kl_cycle.sh, bwd_cycle.sh,
# bwd_profile.sh): sourced with the cycle's OUT and STEPS set. Installs the carried CUTLASS wheel,
# names the card, and defines `has STEP`, `build_step [PATTERN]` (pip install of the working tree,
# its log kept in OUT; prints the errors and the log lines matching PATTERN), `pytest_step` and
# `sanitize_step` (below; SAN_TOOLS picks the tools, default "memcheck racecheck"),
# `kernel_resources MANGLED_PREFIX`, `set_profile_define NAME[=VALUE]` and `apply_patch PATCH` (below).
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
# kernel_resources PREFIX: the last build's ptxas register and spill lines of the kernels whose
# mangled names start with PREFIX (e.g. _ZN3msa3bwd10bwd_kernel), summarized.
kernel_resources() {
  grep -A3 "Compiling entry function '$1" /tmp/build.log | grep -E "Used|spill" | sort | uniq -c | head -12
}
# pytest_step NAME LOG TIMEOUT ARGS...: a pytest run with its log in OUT, rc and tail printed.
pytest_step() {
  local name=$1 log=$2 limit=$3; shift 3
  timeout "$limit" python3 -m pytest "$@" -q -x -rs > "$OUT/$log" 2>&1
  echo "$name rc=$?"; tail -30 "$OUT/$log" | grep -v -i warn
}
# sanitize_step FILTER FILES...: compute-sanitizer memcheck and racecheck on the selected tests.
sanitize_step() {
  local filter=$1 tool; shift
  for tool in ${SAN_TOOLS:-memcheck racecheck}; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 compute-sanitizer --tool $tool --print-limit 10 python3 -m pytest \
      "$@" -q -x -k "$filter" > "$OUT/san_$tool.log" 2>&1
    echo "$tool rc=$? $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/san_$tool.log" | tr '\n' ' ')"
  done
}
# set_profile_define NAME[=VALUE]: builds from now on get -DNAME[=VALUE] (a measurement switch of
# the kernels; any earlier value of NAME is replaced). Edits the device copy's cmake/nvcc_flags.txt.
set_profile_define() {
  sed -i "/^-D${1%%=*}\b/d; s/^-DNDEBUG\$/-DNDEBUG\n-D$1/" cmake/nvcc_flags.txt
  grep -q "^-D$1\$" cmake/nvcc_flags.txt || { echo "set_profile_define $1 failed"; return 1; }
}
# apply_patch PATCH: the B side of an A/B run (bwd_ab.sh, decode_ab.sh) onto the device's copy of
# the tree, by git or, where its copy has no git, by patch.
apply_patch() {
  if command -v git > /dev/null && git apply "$1" 2> /dev/null || patch -p1 < "$1"; then echo "applied $1"; else return 1; fi
}
