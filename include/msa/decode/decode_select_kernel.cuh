// Decode indexer (MSA_SPEC s.4, s.8): the selection of a decoding step's new tokens, split over
// the sequence so one long request fills the GPU.
//
// Pass 1 (decode_select_split_kernel). Grid (split, m-tile, request); a CTA owns up to kBlockQ
// packed rows r = (new token, index head) of a request and the split-th slice of the candidate
// blocks of its latest token (blocks before the forced recent ones; earlier tokens ignore blocks
// they may not take). Warpgroup 0 = producer (one thread streams the slice of the index-key cache
// by TMA, 64 keys per stage, each 64-key run at its cache row, so paged caches cost nothing
// extra); warpgroup 1 = consumer: it writes the query rows to shared memory once, then per stage
// S^T = k_idx q_idx^T (WGMMA m64 x kBlockQ, fp32: keys on M), folds each thread's key rows into a
// running max per (block, row) and, when a block ends, reduces that max over the block's keys
// (lane shuffles, then the 4 warps through shared memory). Each row has two list owners in
// different warps, keeping even and odd blocks apart as the prefill selector does; at the end the
// two lists are merged into the row's list for the split ([row, split, cap], -1 padded), which
// every CTA writes whatever its slice.
// Candidate blocks are fully visible to every row that may take them, so no key is masked, and no
// index-scale is applied (it does not change the order).
//
// Pass 2, the merge of a row's lists into its topk blocks, runs in the attention CTAs of the row
// (decode_merge.cuh).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <math_constants.h>

#include <type_traits>

#include "msa/common/arch.cuh"
#include "msa/common/blocks.cuh"
#include "msa/common/gemm.cuh"
#include "msa/common/topk.cuh"
#include "msa/decode/decode_cache.cuh"
#include "msa/decode/decode_trace.h"
#include "msa/decode/decode_traits.cuh"
#include "msa/fwd/fwd_collective.cuh"

namespace msa::decode {

using namespace cute;

// a ranks before b: a real entry with a higher score, or the same score and a lower block id.
__device__ __forceinline__ bool ranks_before(float sa, int ia, float sb, int ib) {
  return ia >= 0 && (ib < 0 || sa > sb || (sa == sb && ia < ib));
}

template <class Traits>
struct DecodeSelectParams {
  typename Traits::TmaK tma_k;
  std::conditional_t<Traits::kFp8Keys, typename Traits::TmaScale, int> tma_scale;  // fp8 keys' scales
  const typename Traits::Element* q_idx;  // [B * S_new * Hkv, Di]
  CacheGeometry cache;
  int32_t cache_rows;
  float* part_score;     // [B * rows, num_splits, kTopKCap]
  int32_t* part_id;
  int32_t* row_arrivals; // [B * rows]: zeroed here for the attention's last-CTA count
  unsigned long long* trace;  // null, or [CTAs][kDecodeTraceSlots] (see DecodeTraceSlot)
  int s_new, num_idx_heads, num_splits;
  int block_size, init_blocks, local_blocks;
};

// The candidate blocks a CTA scans: [blk_begin, blk_end) of request b for rows of m-tile t.
struct SplitRange {
  int blk_begin, blk_end;
  __device__ SplitRange(int length, int s_new, int rows, int num_heads, int m_tile, int block_q, int block_size,
                        int init_blocks, int local_blocks, int split, int num_splits) {
    blk_begin = 0;
    blk_end = 0;
    const int last_row = min(rows, (m_tile + 1) * block_q) - 1;
    const int pos = length - s_new + last_row / num_heads;  // latest token of the tile
    if (pos < 0) return;
    const common::BlockRanges last(pos / block_size, init_blocks, local_blocks);
    const int lo = init_blocks;
    const int n = last.local_begin - lo;
    if (n <= 0) return;
    blk_begin = lo + static_cast<int>(static_cast<int64_t>(split) * n / num_splits);
    blk_end = lo + static_cast<int>(static_cast<int64_t>(split + 1) * n / num_splits);
  }
};

// fp8 keys: the WGMMA's logical k column that carries index-dimension column `physical`. In a
// 16-column k-slice s, thread quad q of the register fragment holds logical columns 2q, 2q+1,
// 2q+8 and 2q+9; they map to the 4 consecutive bytes at column (Di / 4) q + 4 s, so a thread's
// share of a key row is one contiguous run of Di / 4 bytes (whole 16-byte loads). The query
// tile is written in the same order, which leaves every dot product unchanged.
template <int kHeadDimIdx>
__host__ __device__ constexpr int fp8_logical_column(int physical) {
  constexpr int kRun = kHeadDimIdx / 4;
  const int q = physical / kRun;
  const int s = (physical % kRun) / 4;
  const int j = physical % 4;
  return 16 * s + 2 * q + (j % 2) + 8 * (j / 2);
}

template <int kHeadDimIdx>
constexpr bool fp8_columns_are_a_permutation() {
  bool taken[kHeadDimIdx] = {};
  for (int p = 0; p < kHeadDimIdx; ++p) {
    const int k = fp8_logical_column<kHeadDimIdx>(p);
    if (k < 0 || k >= kHeadDimIdx || taken[k]) return false;
    taken[k] = true;
  }
  return true;
}
static_assert(fp8_columns_are_a_permutation<64>() && fp8_columns_are_a_permutation<128>(),
              "the fp8 key column order must be a permutation of the index dimension");

// The CTA's query rows -> sQ (rows past the request's are zero), as the WGMMA's B operand. All of
// a thread's 16-byte loads are issued before any is used.
template <class Traits, class TensorQ>
__device__ __forceinline__ void load_query_rows(const typename Traits::Element* q_idx, int64_t q_row0,
                                                int valid_rows, TensorQ& sQ, int thread) {
  using Element = typename Traits::Element;
  using MmaElement = typename Traits::MmaElement;
  constexpr int kHeadDimIdx = Traits::kHeadDimIdx;
  constexpr int kChunksPerRow = kHeadDimIdx * 2 / 16;
  constexpr int kChunks = Traits::kBlockQ * kChunksPerRow;
  constexpr int kPerThread = (kChunks + common::kThreadsPerWarpGroup - 1) / common::kThreadsPerWarpGroup;
  uint4 raw[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int chunk = thread + i * common::kThreadsPerWarpGroup;
    const int n = chunk / kChunksPerRow;
    raw[i] = make_uint4(0, 0, 0, 0);
    if (chunk < kChunks && n < valid_rows) {
      raw[i] = reinterpret_cast<const uint4*>(q_idx + (q_row0 + n) * kHeadDimIdx)[chunk % kChunksPerRow];
    }
  }
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int chunk = thread + i * common::kThreadsPerWarpGroup;
    if (chunk >= kChunks) continue;
    const int n = chunk / kChunksPerRow;
    const int col0 = (chunk % kChunksPerRow) * 8;
    const Element* e = reinterpret_cast<const Element*>(&raw[i]);
#pragma unroll
    for (int t = 0; t < 8; ++t) {
      if constexpr (Traits::kFp8Keys) {
        sQ(n, fp8_logical_column<kHeadDimIdx>(col0 + t)) = MmaElement(static_cast<float>(e[t]));
      } else {
        sQ(n, col0 + t) = e[t];
      }
    }
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, Traits::kCtasPerSm)
    decode_select_split_kernel(CUTE_GRID_CONSTANT DecodeSelectParams<Traits> const params) {
#if MSA_SM90_ENABLED
  using MainloopPipeline = typename Traits::MainloopPipeline;
  using PipelineState = typename Traits::PipelineState;
  using MmaElement = typename Traits::MmaElement;
  constexpr int kBlockQ = Traits::kBlockQ;
  constexpr int kBlockKV = Traits::kBlockKV;
  constexpr int kHeadDimIdx = Traits::kHeadDimIdx;
  constexpr int kTopKCap = Traits::kTopKCap;
  constexpr int kConsumerThreads = common::kThreadsPerWarpGroup;

  extern __shared__ char smem_buf[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_buf);

  // Launched early (programmatic dependent launch). When the previous grid is the append (a plain
  // launch, so everything before it is complete), all but the appended rows of the index-key cache
  // are final and the producer waits for the append only before a tile that holds one of them:
  // the first key loads and the query rows overlap the append. Otherwise the previous grid is the
  // caller's (it may be writing q_idx): wait now.
  unsigned long long* trace = cta_trace_row(params.trace);
  if (trace != nullptr && threadIdx.x == 0) trace[kTraceStart] = global_timer_ns();
  const bool prior_grid_is_append = params.cache.appended_tokens > 0;
  if (!prior_grid_is_append) asm volatile("griddepcontrol.wait;" ::: "memory");
  if (trace != nullptr && threadIdx.x == 0 && !prior_grid_is_append) trace[kTraceWaited] = global_timer_ns();
  const int split = blockIdx.x;
  const int m_tile = blockIdx.y;
  const int b = blockIdx.z;
  const int rows = params.s_new * params.num_idx_heads;  // packed rows of one request
  const int length = params.cache.length(b);
  const SplitRange range(length, params.s_new, rows, params.num_idx_heads, m_tile, kBlockQ, params.block_size,
                         params.init_blocks, params.local_blocks, split, params.num_splits);
  const int tiles_per_block = params.block_size / kBlockKV;
  const int tile_begin = range.blk_begin * tiles_per_block;
  const int tile_end = range.blk_end * tiles_per_block;

  const int warp_group = common::warp_group_idx();
  const int lane = threadIdx.x % 32;
  if (split == 0 && threadIdx.x < kBlockQ && m_tile * kBlockQ + static_cast<int>(threadIdx.x) < rows) {
    // The previous step's attention has finished (stream order); this step's starts after us.
    params.row_arrivals[static_cast<int64_t>(b) * rows + m_tile * kBlockQ + threadIdx.x] = 0;
  }

  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    if constexpr (Traits::kFp8Keys) cute::prefetch_tma_descriptor(params.tma_scale.get_tma_descriptor());
  }
  MainloopPipeline pipeline_k =
      fwd::make_kv_ring<MainloopPipeline>(smem.pipeline_k, warp_group, Traits::kTmaBytesK, kConsumerThreads);
  __syncthreads();

  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutK{});

  if (warp_group == 0) {
    // ---------------- producer ----------------
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x != 0 || tile_end <= tile_begin) return;
    Tensor mK = params.tma_k.get_tma_tensor(make_shape(params.cache_rows, Int<kHeadDimIdx>{}));
    PipelineState write_state = cutlass::make_producer_start_state<MainloopPipeline>();
    const int old_length = length - params.cache.appended_tokens;  // rows below it are not appended
    bool append_done = !prior_grid_is_append;
    for (int n = tile_begin; n < tile_end; ++n) {
      if (!append_done && (n + 1) * kBlockKV > old_length) {
        asm volatile("griddepcontrol.wait;" ::: "memory");
        append_done = true;
      }
      const int key_row = static_cast<int>(params.cache.row(b, n * kBlockKV));
      Tensor gK = local_tile(domain_offset(make_coord(key_row, _0{}), mK), Shape<Int<kBlockKV>, Int<kHeadDimIdx>>{},
                             make_coord(_0{}, _0{}));
      auto [tKgK, tKsK] = tma_partition(params.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                        group_modes<0, 2>(gK));
      pipeline_k.producer_acquire(write_state);
      copy(params.tma_k.with(*pipeline_k.producer_get_barrier(write_state), 0), tKgK, tKsK(_, write_state.index()));
      if (trace != nullptr && n == tile_begin) trace[kTraceFirstIssue] = global_timer_ns();
      if constexpr (Traits::kFp8Keys && !Traits::kProfileNoScales) {
        Tensor mS = params.tma_scale.get_tma_tensor(make_shape(params.cache_rows));
        Tensor sS = make_tensor(make_smem_ptr(smem.fp8.scale.data()), typename Traits::SmemLayoutScale{});
        Tensor gS = local_tile(domain_offset(make_coord(key_row), mS), Shape<Int<kBlockKV>>{}, make_coord(_0{}));
        auto [tSgS, tSsS] = tma_partition(params.tma_scale, Int<0>{}, Layout<_1>{}, group_modes<0, 1>(sS),
                                          group_modes<0, 1>(gS));
        copy(params.tma_scale.with(*pipeline_k.producer_get_barrier(write_state), 0), tSgS,
             tSsS(_, write_state.index()));
      }
      ++write_state;
    }
    pipeline_k.producer_tail(write_state);
    return;
  }

  // ---------------- consumer ----------------
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int thread = threadIdx.x - common::kThreadsPerWarpGroup;
  const int warp = thread / 32;
  const int quad = lane % 4;
  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
  load_query_rows<Traits>(params.q_idx, static_cast<int64_t>(b) * rows + m_tile * kBlockQ, rows - m_tile * kBlockQ,
                          sQ, thread);
  cutlass::arch::fence_view_async_shared();  // the query rows (generic writes) -> WGMMA reads
  cutlass::arch::NamedBarrier::sync(kConsumerThreads, 1);

  // List owners: row own_row keeps the blocks of parity own_parity (the two owners of a row sit
  // in different warps, so a block's inserts are spread over the warpgroup).
  const int own_row = thread % 64;
  const int own_parity = thread / 64;
  const int row_in_req = m_tile * kBlockQ + own_row;
  const bool owner = own_row < kBlockQ;
  const bool row_valid = owner && row_in_req < rows;
  int cand_begin = 0, cand_end = 0;
  if (row_valid) {
    const int pos = length - params.s_new + row_in_req / params.num_idx_heads;
    if (pos >= 0) {
      const common::BlockRanges ranges(pos / params.block_size, params.init_blocks, params.local_blocks);
      cand_begin = ranges.init_end;
      cand_end = ranges.local_begin;
    }
  }

  common::RunningTopK<kTopKCap> top;
  top.clear();

  if (tile_end > tile_begin) {
    typename Traits::TiledMma tiled_mma;
    auto thr_mma = tiled_mma.get_thread_slice(thread);
    Tensor tSrQ = thr_mma.partition_fragment_B(sQ);
    Tensor tSrS = partition_fragment_C(tiled_mma, Shape<Int<kBlockKV>, Int<kBlockQ>>{});
    // Accumulator element 4 j + 2 h + c: key row 16 warp + lane / 4 + 8 h, query row 8 j + 2 quad + c.
    constexpr int kRowsPerThread = kBlockQ / 4;
    float pending[kRowsPerThread];  // per query row: max over this thread's keys of the current block
    auto tSrK = [&] {
      if constexpr (Traits::kFp8Keys) {
        return thr_mma.partition_fragment_A(sK(_, _, 0));  // fp16 registers, filled per stage
      } else {
        return thr_mma.partition_fragment_A(sK);  // descriptors of every stage
      }
    }();
    const int key_row = warp * 16 + lane / 4;
    // fp8: shared addresses of this thread's 16-byte pieces of its two key rows in stage 0. The
    // swizzle permutes address bits below a stage's size only, so stage s adds s x kStageBytes.
    constexpr int kRunBytes = kHeadDimIdx / 4;
    constexpr int kLoads = kRunBytes / 16;
    constexpr uint32_t kStageBytes = kBlockKV * kHeadDimIdx * sizeof(typename Traits::KeyElement);
    uint32_t key_addr[2][kLoads];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int c = 0; c < kLoads; ++c) {
        key_addr[h][c] = cute::cast_smem_ptr_to_uint(&sK(key_row + 8 * h, kRunBytes * quad + 16 * c, 0));
      }
    }
    // Trace points: the stages at 1/4, 1/2 and 3/4 of the slice (measurement aid).
    const int num_tiles = tile_end - tile_begin;
    int trace_mark = 0;  // quarter marks stamped
    int trace_next = tile_begin + num_tiles / 4;
    PipelineState read_state;
    int tile_in_block = 0;  // stage n's place in its block, and the block (no division per stage)
    int block = range.blk_begin;
    for (int n = tile_begin; n < tile_end; ++n) {
      pipeline_k.consumer_wait(read_state);
      if (trace != nullptr && thread == 0) {
        if (n == tile_begin) trace[kTraceFirstStage] = global_timer_ns();
        for (; trace_mark < 3 && n >= trace_next; ++trace_mark) {
          trace[kTraceQuarter + trace_mark] = global_timer_ns();
          trace_next = tile_begin + (trace_mark + 2) * num_tiles / 4;
        }
      }
      const int stage = read_state.index();
      if constexpr (Traits::kFp8Keys) {
        // This thread's bytes of its two key rows, then the stage is free again.
        uint4 raw[2][kLoads];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int c = 0; c < kLoads; ++c) {
            asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(raw[h][c].x), "=r"(raw[h][c].y), "=r"(raw[h][c].z), "=r"(raw[h][c].w)
                         : "r"(key_addr[h][c] + stage * kStageBytes)
                         : "memory");
          }
        }
        const float scale0 = Traits::kProfileNoScales ? 1.f : smem.fp8.scale[stage * kBlockKV + key_row];
        const float scale1 = Traits::kProfileNoScales ? 1.f : smem.fp8.scale[stage * kBlockKV + key_row + 8];
        pipeline_k.consumer_release(read_state);
        ++read_state;
        // Bytes 4 s .. 4 s + 3 of a row are k-slice s's columns 2q, 2q+1 (low half) and 2q+8,
        // 2q+9 (high half); fragment values: (row, 2q..2q+1), (row + 8, ..), (row, 2q+8..), (row + 8, ..).
        using Converter = cutlass::NumericArrayConverter<MmaElement, cutlass::float_e4m3_t, 2>;
        using Pair8 = cutlass::Array<cutlass::float_e4m3_t, 2>;
        const uint32_t* words0 = reinterpret_cast<const uint32_t*>(raw[0]);
        const uint32_t* words1 = reinterpret_cast<const uint32_t*>(raw[1]);
#pragma unroll
        for (int s = 0; s < kHeadDimIdx / 16; ++s) {
          const uint32_t w[2] = {words0[s], words1[s]};
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint16_t lo = static_cast<uint16_t>(w[h] & 0xffffu);
            const uint16_t hi = static_cast<uint16_t>(w[h] >> 16);
            const auto lo2 = Converter::convert(reinterpret_cast<const Pair8&>(lo));
            const auto hi2 = Converter::convert(reinterpret_cast<const Pair8&>(hi));
            tSrK(2 * h, 0, s) = lo2[0];
            tSrK(2 * h + 1, 0, s) = lo2[1];
            tSrK(4 + 2 * h, 0, s) = hi2[0];
            tSrK(4 + 2 * h + 1, 0, s) = hi2[1];
          }
        }
        warpgroup_fence_operand(tSrK);
        common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma, tSrK, tSrQ, tSrS);
        warpgroup_fence_operand(tSrK);
#pragma unroll
        for (int j = 0; j < kBlockQ / 8; ++j) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            tSrS(4 * j + c) *= scale0;
            tSrS(4 * j + 2 + c) *= scale1;
          }
        }
      } else {
        common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma, tSrK(_, _, _, stage), tSrQ, tSrS);
        pipeline_k.consumer_release(read_state);
        ++read_state;
      }

      const bool block_start = tile_in_block == 0;
#pragma unroll
      for (int j = 0; j < kBlockQ / 8; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float v = fmaxf(tSrS(4 * j + c), tSrS(4 * j + 2 + c));
          pending[2 * j + c] = block_start ? v : fmaxf(pending[2 * j + c], v);
        }
      }
      if (++tile_in_block == tiles_per_block) {
        // Block done: its max per query row over all 64 x tiles_per_block keys.
        tile_in_block = 0;
        float(&block_max)[4][kBlockQ] = smem.block_max[block & 1];  // double-buffered: see below
#pragma unroll
        for (int i = 0; i < kRowsPerThread; ++i) {
          float m = pending[i];
          m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 4));
          m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 8));
          m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 16));
          pending[i] = m;
        }
        if (lane < 4) {
#pragma unroll
          for (int j = 0; j < kBlockQ / 8; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) block_max[warp][8 * j + 2 * quad + c] = pending[2 * j + c];
          }
        }
        // Written, then read after this barrier; the next write to this buffer (two blocks on)
        // comes after the next block's barrier, which every reader passes after reading.
        cutlass::arch::NamedBarrier::sync(kConsumerThreads, 2);
        if (row_valid && (block & 1) == own_parity && block >= cand_begin && block < cand_end) {
          const float score = fmaxf(fmaxf(block_max[0][own_row], block_max[1][own_row]),
                                    fmaxf(block_max[2][own_row], block_max[3][own_row]));
          if (score > top.threshold()) top.insert(score, block);
        }
        ++block;
      }
    }
  }

  if (trace != nullptr && thread == 0) {
    trace[kTraceLoopEnd] = global_timer_ns();
    trace[kTraceSm] = sm_id();
    trace[kTraceStages] = static_cast<unsigned long long>(max(0, tile_end - tile_begin));
  }
  // Every CTA waits for the append before it finishes, so this grid's completion, which the
  // attention kernel waits for, implies the append's (the attention reads the appended K/V rows).
  asm volatile("griddepcontrol.wait;" ::: "memory");
  // The attention kernel may launch now (programmatic dependent launch); it waits for this grid
  // to finish before reading the lists.
  asm volatile("griddepcontrol.launch_dependents;");
  // The row's two lists -> one: both go to shared memory (the consumed key stages; every stage
  // has been waited for and read once all threads pass this barrier), the even-parity owner
  // merges them and writes the row's list for this split.
  cutlass::arch::NamedBarrier::sync(kConsumerThreads, 1);
  if (trace != nullptr && thread == 0) trace[kTraceEpilogueSynced] = global_timer_ns();
  float* lists_score = reinterpret_cast<float*>(smem.k.data());  // [kBlockQ][2][kTopKCap]
  int32_t* lists_id = reinterpret_cast<int32_t*>(lists_score + kBlockQ * 2 * kTopKCap);
  if (owner) {
    float* my_scores = lists_score + (own_row * 2 + own_parity) * kTopKCap;
    int32_t* my_ids = lists_id + (own_row * 2 + own_parity) * kTopKCap;
#pragma unroll
    for (int p = 0; p < kTopKCap; ++p) {
      my_scores[p] = top.score[p];
      my_ids[p] = top.id[p];
    }
  }
  cutlass::arch::NamedBarrier::sync(kConsumerThreads, 1);
  if (row_valid && own_parity == 0) {
    const float* row_scores = lists_score + own_row * 2 * kTopKCap;
    const int32_t* row_ids = lists_id + own_row * 2 * kTopKCap;
    const int64_t list = (static_cast<int64_t>(b) * rows + row_in_req) * params.num_splits + split;
    float* out_score = params.part_score + list * kTopKCap;
    int32_t* out_id = params.part_id + list * kTopKCap;
    int head0 = 0, head1 = 0;
    for (int p = 0; p < kTopKCap; ++p) {
      const float s0 = row_scores[min(head0, kTopKCap - 1)];
      const int id0 = head0 < kTopKCap ? row_ids[min(head0, kTopKCap - 1)] : -1;
      const float s1 = row_scores[kTopKCap + min(head1, kTopKCap - 1)];
      const int id1 = head1 < kTopKCap ? row_ids[kTopKCap + min(head1, kTopKCap - 1)] : -1;
      const bool take0 = ranks_before(s0, id0, s1, id1) || id1 < 0;
      out_score[p] = take0 ? s0 : s1;
      out_id[p] = take0 ? id0 : id1;  // -1 once both lists ran out
      head0 += take0 && id0 >= 0;
      head1 += !take0 && id1 >= 0;
    }
  }
  if (trace != nullptr && thread == 0) trace[kTraceListWritten] = global_timer_ns();
#endif
}

}  // namespace msa::decode
