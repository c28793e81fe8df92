// Measurement aid of the decoding kernels (DecodeParams::select_trace, MSA_DECODE_TRACE_FILE): the
// per-CTA trace slots of the split indexer and of the sparse attention. Light on purpose: the host
// dispatch includes it.
#pragma once

namespace msa::decode {

// The trace buffer holds kTraceMaxCtas rows of kDecodeTraceSlots for the indexer's CTAs, then as
// many for the attention's.
constexpr int kTraceMaxCtas = 1 << 14;

// What each of an indexer CTA's trace slots holds. Times are %globaltimer nanoseconds; the host
// subtracts the step's earliest indexer start.
enum DecodeTraceSlot : int {
  kTraceStart = 0,       // thread 0 enters the kernel
  kTraceWaited,          // thread 0 past the first griddepcontrol.wait (0 when it loads first)
  kTraceFirstIssue,      // the producer issues its first key stage
  kTraceFirstStage,      // the consumer has its first key stage
  kTraceLoopEnd,         // the consumer has scored its last stage
  kTraceListWritten,     // the consumer's row 0 list is written
  kTraceSm,              // %smid
  kTraceStages,          // key stages the CTA streamed
  kTraceQuarter,         // the consumer has its stage at 1/4 of its slice
  kTraceHalf,            // ... at 1/2
  kTraceThreeQuarters,   // ... at 3/4
  kTraceEpilogueSynced,  // the consumer warpgroup is past the epilogue's first barrier
  kDecodeTraceSlots
};

// The attention CTA's slots (same row width).
enum DecodeAttnTraceSlot : int {
  kAttnTraceStart = 0,   // thread 0 enters the kernel
  kAttnTraceWaited,      // past griddepcontrol.wait: the indexer grid is complete
  kAttnTraceSelected,    // the row's selection is in shared memory
  kAttnTraceFirstBlock,  // the first K block has landed (0: empty chunk)
  kAttnTraceLoopEnd,     // the chunk's blocks are attended
  kAttnTraceDone,        // the row's chunks are merged (or this CTA left after counting in)
  kAttnTraceSm,          // %smid
  kAttnTraceBlocks,      // blocks the chunk attended
  kAttnTraceSlotsUsed
};
static_assert(static_cast<int>(kAttnTraceSlotsUsed) <= static_cast<int>(kDecodeTraceSlots), "attention trace row");

#ifdef __CUDACC__
__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ unsigned long long sm_id() {
  unsigned sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  return sm;
}

// This CTA's row of a kernel's half of the trace buffer; null when tracing is off or the calling
// thread does not stamp.
__device__ __forceinline__ unsigned long long* cta_trace_row(unsigned long long* trace, bool stamps = true) {
  return trace == nullptr || !stamps
             ? nullptr
             : trace + ((static_cast<long long>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) *
                           kDecodeTraceSlots;
}
#endif

}  // namespace msa::decode
