// Measurement aid of the decode indexer (DecodeParams::select_trace, MSA_DECODE_TRACE_FILE): the
// per-CTA trace slots. Light on purpose: the host dispatch includes it.
#pragma once

namespace msa::decode {

// What each of a CTA's trace slots holds. Times are %globaltimer nanoseconds; the host subtracts
// the step's earliest start.
enum DecodeTraceSlot : int {
  kTraceStart = 0,       // thread 0 enters the kernel
  kTraceWaited,          // thread 0 past the first griddepcontrol.wait (0 when it loads first)
  kTraceFirstIssue,      // the producer issues its first key stage
  kTraceFirstStage,      // the consumer has its first key stage
  kTraceLoopEnd,         // the consumer has scored its last stage
  kTraceListWritten,     // the consumer's row 0 list is written
  kTraceSm,              // %smid
  kTraceStages,          // key stages the CTA streamed
  kDecodeTraceSlots
};

#ifdef __CUDACC__
__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
#endif

}  // namespace msa::decode
