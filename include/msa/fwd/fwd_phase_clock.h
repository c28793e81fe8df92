// Where a forward main kernel's loop spends its cycles (a measurement build only).
//
// Built with -DMSA_FWD_PROFILE_PHASES (scripts/fwd_phases.sh sets it), each role of CTA 0 sums
// clock64 deltas between the marks it passes and prints the sums once at the end of the kernel:
// one line for producer thread 0, one for the first thread of each consumer warpgroup. Without the
// define every mark compiles to nothing and the kernel is unchanged.
#pragma once

#include <cstdio>

namespace msa::fwd {

// Phases of a consumer warpgroup's tile (fwd_kernel's loop, in order).
enum ConsumerPhase : int { kWaitS, kSoftmax, kIssuePV, kLoadTile, kIssueQK, kWaitPV, kEpilogue, kConsumerPhases };
// Phases of the producer's tile.
enum ProducerPhase : int { kPrefetch, kKVLoad, kEntryWait, kQueryAcquire, kQueryCopies, kAdvance, kProducerPhases };

template <int kPhases>
struct PhaseClock {
#ifdef MSA_FWD_PROFILE_PHASES
  long long last = 0;
  long long sum[kPhases] = {};
  int tiles = 0;
  __device__ void start() { last = clock64(); }
  // The cycles since the previous mark go to `phase`.
  __device__ void mark(int phase) {
    const long long now = clock64();
    sum[phase] += now - last;
    last = now;
  }
  // mark(phase) once `value` exists: a load's latency lands in the phase that first uses it.
  __device__ void mark_after(int phase, int value) {
    asm volatile("" ::"r"(value));
    mark(phase);
  }
  __device__ void tile() { ++tiles; }
  __device__ long long per_tile(int phase) const { return phase < kPhases && tiles > 0 ? sum[phase] / tiles : 0; }
  // One line (a single printf, so the roles' lines do not interleave); phases past kPhases print 0.
  __device__ void print(const char* role, bool leader) const {
    static_assert(kPhases <= 7);
    if (!leader || blockIdx.x != 0) return;
    printf("msa_fwd_phases %s tiles %d cycles/tile %lld %lld %lld %lld %lld %lld %lld\n", role, tiles, per_tile(0),
           per_tile(1), per_tile(2), per_tile(3), per_tile(4), per_tile(5), per_tile(6));
  }
#else
  __device__ void start() {}
  __device__ void mark(int) {}
  __device__ void mark_after(int, int) {}
  __device__ void tile() {}
  __device__ void print(const char*, bool) const {}
#endif
};

}  // namespace msa::fwd
