// Where a forward main kernel's loop spends its cycles (a measurement build only).
//
// Built with -DMSA_FWD_PROFILE_PHASES (scripts/fwd_phases.sh sets it), each role of CTA 0 sums
// clock64 deltas between the marks it passes and saves its cycles per tile at the end of the
// kernel; a one-thread kernel launched after it prints them: one line for producer thread 0, one
// for the first thread of each consumer warpgroup. (printf in the main kernel itself would make
// ptxas serialize its WGMMAs.) Without the define every mark compiles to nothing and the kernel is
// unchanged.
#pragma once

#include <cstdio>

#include <cuda_runtime.h>

namespace msa::fwd {

#ifdef MSA_FWD_PROFILE_PHASES
namespace {  // one copy per translation unit, like the kernels that use it
// Per role (producer, consumer 0, consumer 1): tiles, then cycles per tile of each phase.
__device__ long long g_phase_cycles[3][8];
__global__ void print_phase_cycles_kernel() {
  const char* roles[3] = {"producer", "consumer0", "consumer1"};
  for (int r = 0; r < 3; ++r) {
    const long long* v = g_phase_cycles[r];
    printf("msa_fwd_phases %s tiles %lld cycles/tile %lld %lld %lld %lld %lld %lld %lld\n", roles[r], v[0], v[1], v[2],
           v[3], v[4], v[5], v[6], v[7]);
  }
}
}  // namespace
#endif

// Host, after a main kernel: prints what CTA 0's roles saved (nothing without the define).
inline void print_phase_cycles(cudaStream_t stream) {
#ifdef MSA_FWD_PROFILE_PHASES
  print_phase_cycles_kernel<<<1, 1, 0, stream>>>();
#else
  (void)stream;
#endif
}

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
  // Role 0 = producer, 1 and 2 = consumer warpgroups; phases past kPhases read 0.
  __device__ void save(int role, bool leader) const {
    static_assert(kPhases <= 7);
    if (!leader || blockIdx.x != 0) return;
    g_phase_cycles[role][0] = tiles;
#pragma unroll
    for (int i = 0; i < 7; ++i) g_phase_cycles[role][i + 1] = i < kPhases && tiles > 0 ? sum[i] / tiles : 0;
  }
#else
  __device__ void start() {}
  __device__ void mark(int) {}
  __device__ void mark_after(int, int) {}
  __device__ void tile() {}
  __device__ void save(int, bool) const {}
#endif
};

}  // namespace msa::fwd
