#!/usr/bin/env bash
# Where the forward main kernel's loop spends its cycles: builds with -DMSA_FWD_PROFILE_PHASES
# (include/msa/fwd/fwd_phase_clock.h; a measurement build, do not bench it), runs one forward per
# sequence length and averages the per-tile cycles CTA 0 printed over every main-kernel launch.
#   usage: scripts/fwd_phases.sh OUT_DIR [steps: build,phases]   (SEQLENS, default "32768 131072")
# Consumer columns: wait S, softmax, issue P V, load tile, issue Q K^T, wait P V, epilogue.
# Producer columns: prefetch, K/V load, wait for the tile's entry, query-stage acquire, query copies,
# scheduler advance.
set -uo pipefail
OUT=${1:?usage}; STEPS=${2:-build,phases}
source "$(dirname "$0")/cycle_common.sh"
if has build; then set_profile_define MSA_FWD_PROFILE_PHASES || exit 1; build_step; fi
if has phases; then
  for s in ${SEQLENS:-32768 131072}; do
    timeout 200 python3 bench/profile_fwd.py --no-profiler --reps 1 --seqlen "$s" > "$OUT/phases_$s.log" 2>&1
    echo "S=$s rc=$?"
    python3 - "$OUT/phases_$s.log" <<'PY'
import collections, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    parts = line.split()
    if parts[:1] == ["msa_fwd_phases"]:
        rows[parts[1]].append([int(parts[3])] + [int(x) for x in parts[5:]])
for role, vals in sorted(rows.items()):
    n = len(vals)
    mean = [sum(v[i] for v in vals) / n for i in range(len(vals[0]))]
    print(f"{role:10} launches {n:3d} tiles/launch {mean[0]:7.1f} cycles/tile " + " ".join(f"{x:7.0f}" for x in mean[1:]),
          f"sum {sum(mean[1:]):7.0f}")
PY
  done
fi
