// Decode indexer (MSA_SPEC s.4, s.8): the selection of a decoding step's new tokens, split over
// the sequence so one long request fills the GPU.
//
// Pass 1 (decode_select_split_kernel). Grid (split, m-tile, request); a CTA owns up to 64 packed
// rows r = (new token, index head) of a request and the split-th slice of the candidate blocks of
// its latest token (blocks before the forced recent ones; earlier tokens ignore blocks they may
// not take). Warpgroup 0 = producer (one thread issues TMA: the rows once, then the slice of the
// index-key cache, 64 keys per stage, each 64-key run at its cache row, so paged caches cost
// nothing extra); warpgroup 1 = consumer: S = q_idx k_idx^T per stage (WGMMA m64n64, fp32), per
// row the max over each block (a 128-key block spans two stages), offered to a running top-k in
// registers: the two list owners of a row keep even and odd blocks apart, as in the prefill
// selector; at the end the two are merged into the row's list for the split ([row, split, cap],
// -1 padded), which every CTA writes whatever its slice.
// Candidate blocks are fully visible to every row that may take them, so no key is masked, and no
// index-scale is applied (it does not change the order).
//
// Pass 2 (decode_select_merge_kernel, one CTA per row): the row's lists (one per split, at most
// 256) go to shared memory (16-byte loads, all in flight), then a two-level tournament: each of
// the 8 warps merges its share (at most 32 lists, one per lane) k-way into its best N, and warp 0
// merges the 8 lists of N the same way. A step is two warp reductions (the max score key, then
// the min id among the lanes holding it, so ties go to the lower block id); the winning lane
// moves to its list's next entry, already in registers. The
// row's selection is the forced leading blocks, the winners in ascending order and the forced
// recent blocks, -1 padded. (Merging in every attention CTA instead cost more than the launch it
// saved: the merge sat on each CTA's critical path.)
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
  typename Traits::TmaQ tma_q;
  typename Traits::TmaK tma_k;
  std::conditional_t<Traits::kFp8Keys, typename Traits::TmaScale, int> tma_scale;  // fp8 keys' scales
  CacheGeometry cache;
  int32_t total_q_rows;  // B * S_new * Hkv
  int32_t cache_rows;
  float* part_score;     // [B * rows, num_splits, kTopKCap]
  int32_t* part_id;
  int32_t* row_arrivals; // [B * rows]: zeroed here for the attention's last-CTA count
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

// fp8 keys: stage `stage` of the e4m3 rows (row-major) widened into wide tile `wide` (SW128,
// fp16) by the consumer warpgroup, 16 keys' bytes per step.
template <class Traits, class TensorK8, class TensorKWide>
__device__ __forceinline__ void widen_key_tile(TensorK8 const& sK8, TensorKWide& sKWide, int stage, int wide,
                                               int thread) {
  using Element = typename Traits::MmaElement;
  constexpr int kPieces = Traits::kHeadDimIdx / 16;  // 16-byte pieces of an e4m3 row
  using Converter = cutlass::NumericArrayConverter<Element, cutlass::float_e4m3_t, 2>;
  for (int idx = thread; idx < Traits::kBlockKV * kPieces; idx += common::kThreadsPerWarpGroup) {
    const int r = idx / kPieces;
    const int c = (idx % kPieces) * 16;
    const uint4 raw = *reinterpret_cast<const uint4*>(&sK8(r, c, stage));
    const auto* in = reinterpret_cast<const cutlass::Array<cutlass::float_e4m3_t, 2>*>(&raw);
    cutlass::Array<Element, 16> out;
    auto* out2 = reinterpret_cast<cutlass::Array<Element, 2>*>(&out);
#pragma unroll
    for (int p = 0; p < 8; ++p) out2[p] = Converter::convert(in[p]);
    const uint4* words = reinterpret_cast<const uint4*>(&out);
    *reinterpret_cast<uint4*>(&sKWide(r, c, wide)) = words[0];
    *reinterpret_cast<uint4*>(&sKWide(r, c + 8, wide)) = words[1];
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, Traits::kCtasPerSm)
    decode_select_split_kernel(CUTE_GRID_CONSTANT DecodeSelectParams<Traits> const params) {
#if MSA_SM90_ENABLED
  using MainloopPipeline = typename Traits::MainloopPipeline;
  using PipelineState = typename Traits::PipelineState;
  constexpr int kBlockQ = Traits::kBlockQ;
  constexpr int kBlockKV = Traits::kBlockKV;
  constexpr int kHeadDimIdx = Traits::kHeadDimIdx;
  constexpr int kTopKCap = Traits::kTopKCap;

  extern __shared__ char smem_buf[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_buf);

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
    smem.barrier_q.init(1);
    cute::prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    if constexpr (Traits::kFp8Keys) cute::prefetch_tma_descriptor(params.tma_scale.get_tma_descriptor());
  }
  MainloopPipeline pipeline_k = fwd::make_kv_ring<MainloopPipeline>(smem.pipeline_k, warp_group, Traits::kTmaBytesK,
                                                                    common::kThreadsPerWarpGroup);
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutK{});

  if (warp_group == 0) {
    // ---------------- producer ----------------
    if (threadIdx.x != 0 || tile_end <= tile_begin) return;
    Tensor mQ = params.tma_q.get_tma_tensor(make_shape(params.total_q_rows, Int<kHeadDimIdx>{}));
    Tensor mK = params.tma_k.get_tma_tensor(make_shape(params.cache_rows, Int<kHeadDimIdx>{}));
    const int q_row0 = b * rows + m_tile * kBlockQ;
    Tensor gQ = local_tile(domain_offset(make_coord(q_row0, _0{}), mQ), Shape<Int<kBlockQ>, Int<kHeadDimIdx>>{},
                           make_coord(_0{}, _0{}));
    auto [tQgQ, tQsQ] = tma_partition(params.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                      group_modes<0, 2>(gQ));
    smem.barrier_q.arrive_and_expect_tx(Traits::kTmaBytesQ);
    copy(params.tma_q.with(reinterpret_cast<uint64_t&>(smem.barrier_q), 0), tQgQ, tQsQ);

    PipelineState write_state = cutlass::make_producer_start_state<MainloopPipeline>();
    for (int n = tile_begin; n < tile_end; ++n) {
      const int key_row = static_cast<int>(params.cache.row(b, n * kBlockKV));
      Tensor gK = local_tile(domain_offset(make_coord(key_row, _0{}), mK), Shape<Int<kBlockKV>, Int<kHeadDimIdx>>{},
                             make_coord(_0{}, _0{}));
      auto [tKgK, tKsK] = tma_partition(params.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                        group_modes<0, 2>(gK));
      pipeline_k.producer_acquire(write_state);
      copy(params.tma_k.with(*pipeline_k.producer_get_barrier(write_state), 0), tKgK, tKsK(_, write_state.index()));
      if constexpr (Traits::kFp8Keys) {
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
  const int mma_thread = threadIdx.x - common::kThreadsPerWarpGroup;  // 0..127
  // Accumulator rows of this thread: 16 warp + lane / 4 (+ 8); the quad's lanes 0-1 keep lists for
  // the first row (even / odd blocks), lanes 2-3 for the second.
  const int quad = lane % 4;
  const int my_half = quad >> 1;
  const int my_parity = quad & 1;
  const int my_row = (mma_thread / 32) * 16 + lane / 4 + 8 * my_half;
  const int row_in_req = m_tile * kBlockQ + my_row;
  const bool row_valid = row_in_req < rows;

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
    auto thr_mma = tiled_mma.get_thread_slice(mma_thread);
    Tensor sQMma = make_tensor(make_smem_ptr(reinterpret_cast<typename Traits::MmaElement*>(smem.q.data())),
                               typename Traits::SmemLayoutQMma{});
    Tensor tSrQ = thr_mma.partition_fragment_A(sQMma);
    Tensor tSrS = partition_fragment_C(tiled_mma, Shape<Int<kBlockQ>, Int<kBlockKV>>{});
    // The WGMMA's key operand: the stages themselves, or (fp8) the two widened tiles.
    Tensor sKOperand = [&] {
      if constexpr (Traits::kFp8Keys) {
        return make_tensor(make_smem_ptr(smem.fp8.k_wide.data()), typename Traits::SmemLayoutKWide{});
      } else {
        return sK;
      }
    }();
    Tensor tSrK = thr_mma.partition_fragment_B(sKOperand);

    smem.barrier_q.wait(0);
    if constexpr (Traits::kFp8Keys && !std::is_same_v<typename Traits::Element, cutlass::half_t>) {
      // bf16 index queries -> fp16 in place (each 16-bit element keeps its slot).
      uint32_t* words = reinterpret_cast<uint32_t*>(smem.q.data());
      for (int w = mma_thread; w < kBlockQ * kHeadDimIdx / 2; w += common::kThreadsPerWarpGroup) {
        const cutlass::Array<cutlass::bfloat16_t, 2> in = reinterpret_cast<const cutlass::Array<cutlass::bfloat16_t, 2>&>(words[w]);
        const cutlass::Array<cutlass::half_t, 2> out =
            cutlass::NumericArrayConverter<cutlass::half_t, cutlass::bfloat16_t, 2>::convert(in);
        words[w] = reinterpret_cast<const uint32_t&>(out);
      }
      cutlass::arch::fence_view_async_shared();
      cutlass::arch::NamedBarrier::sync(common::kThreadsPerWarpGroup, 1);
    }
    if constexpr (Traits::kQInRegisters) {
      cute::copy(thr_mma.partition_A(sQMma), tSrQ);  // the RS WGMMA's query operand, once
      warpgroup_fence_operand(tSrQ);
    }
    PipelineState read_state;
    float pending = -CUDART_INF_F;  // max so far over the current block's earlier stages
    for (int n = tile_begin; n < tile_end; ++n) {
      pipeline_k.consumer_wait(read_state);
      if constexpr (Traits::kFp8Keys) {
        const int stage = read_state.index();
        const int wide = n & 1;
        widen_key_tile<Traits>(sK, sKOperand, stage, wide, mma_thread);
        cutlass::arch::fence_view_async_shared();  // widened tile (generic writes) -> WGMMA reads
        cutlass::arch::NamedBarrier::sync(common::kThreadsPerWarpGroup, 1);
        common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma, tSrQ, tSrK(_, _, _, wide), tSrS);
        // This thread's columns 8 j + 2 quad + c times their keys' scales (read before the stage
        // is released).
        const float* stage_scale = smem.fp8.scale.data() + stage * kBlockKV;
#pragma unroll
        for (int j = 0; j < kBlockKV / 8; ++j) {
          const float2 col_scale = *reinterpret_cast<const float2*>(stage_scale + 8 * j + 2 * quad);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            tSrS(4 * j + 2 * i) *= col_scale.x;
            tSrS(4 * j + 2 * i + 1) *= col_scale.y;
          }
        }
        pipeline_k.consumer_release(read_state);
        ++read_state;
      } else {
        common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma, tSrQ, tSrK(_, _, _, read_state.index()), tSrS);
        pipeline_k.consumer_release(read_state);
        ++read_state;
      }

      const float m0 = fwd::block_row_max<kBlockKV>(tSrS, 0);
      const float m1 = fwd::block_row_max<kBlockKV>(tSrS, 1);
      const float tile_max = my_half ? m1 : m0;
      pending = (n % tiles_per_block == 0) ? tile_max : fmaxf(pending, tile_max);
      if ((n + 1) % tiles_per_block == 0) {
        const int block = n / tiles_per_block;
        if ((block & 1) == my_parity && block >= cand_begin && block < cand_end && pending > top.threshold()) {
          top.insert(pending, block);
        }
      }
    }
  }

  // The merge kernel may launch now (programmatic dependent launch); it waits for this grid to
  // finish before reading the lists.
  asm volatile("griddepcontrol.launch_dependents;");
  // The row's two parity lists -> one: both go to shared memory (the consumed K stages), the
  // even-list lane merges them and writes the row's list for this split.
  float* lists_score = reinterpret_cast<float*>(smem.k.data());  // [kBlockQ][2][kTopKCap]
  int32_t* lists_id = reinterpret_cast<int32_t*>(lists_score + kBlockQ * 2 * kTopKCap);
  {
    float* my_scores = lists_score + (my_row * 2 + my_parity) * kTopKCap;
    int32_t* my_ids = lists_id + (my_row * 2 + my_parity) * kTopKCap;
#pragma unroll
    for (int p = 0; p < kTopKCap; ++p) {
      my_scores[p] = top.score[p];
      my_ids[p] = top.id[p];
    }
  }
  cutlass::arch::NamedBarrier::sync(common::kThreadsPerWarpGroup, 0);
  if (row_valid && my_parity == 0) {
    const float* a_score = lists_score + my_row * 2 * kTopKCap;
    const int32_t* a_id = lists_id + my_row * 2 * kTopKCap;
    const float* b_score = a_score + kTopKCap;
    const int32_t* b_id = a_id + kTopKCap;
    const int64_t list = (static_cast<int64_t>(b) * rows + row_in_req) * params.num_splits + split;
    float* out_score = params.part_score + list * kTopKCap;
    int32_t* out_id = params.part_id + list * kTopKCap;
    int ia = 0, ib = 0;
    for (int p = 0; p < kTopKCap; ++p) {
      const float sa = a_score[min(ia, kTopKCap - 1)], sb = b_score[min(ib, kTopKCap - 1)];
      const int da = ia < kTopKCap ? a_id[ia] : -1, db = ib < kTopKCap ? b_id[ib] : -1;
      const bool take_a = ranks_before(sa, da, sb, db);
      out_score[p] = take_a ? sa : sb;
      out_id[p] = take_a ? da : db;  // -1 once both lists ran out
      ia += take_a;
      ib += !take_a;
    }
  }
#endif
}

struct DecodeMergeParams {
  CacheGeometry cache;
  const float* part_score;  // [B * rows, num_splits, cap]
  const int32_t* part_id;
  int32_t* block_indices;   // [B * rows, topk]
  int s_new, num_idx_heads, num_splits;
  int block_size, topk, init_blocks, local_blocks;
};

constexpr int kMergeThreads = 256;
constexpr int kMergeWarps = kMergeThreads / 32;
constexpr int kMaxSplits = 32 * kMergeWarps;  // one list per lane in the first merge level

// Shared-memory bytes of the merge kernel: the lists, plus each warp's best kTopKCap.
template <int kTopKCap>
constexpr int merge_smem_bytes(int num_splits) {
  return num_splits * kTopKCap * 8 + kMergeWarps * kTopKCap * 8;
}

// Order-preserving map of a finite score to a key > 0 (0 = nothing).
__device__ __forceinline__ uint32_t score_key(float s) {
  const uint32_t bits = __float_as_uint(s);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float key_score(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// k-way merge of at most 32 sorted (descending) lists by one warp, lane l owning list l: lists of
// `stride` entries (scores, ids; id < 0 ends a list). Takes up to `count` winners; lane k gets
// the k-th (its key and id). Returns how many were taken.
__device__ __forceinline__ int warp_kway_merge(const float* scores, const int32_t* ids, int num_lists, int stride,
                                               int count, int lane, uint32_t& won_key, int& won_id) {
  const float* my_scores = scores + lane * stride;
  const int32_t* my_ids = ids + lane * stride;
  const bool owner = lane < num_lists;
  auto entry = [&](int h, uint32_t& key, int& id) {
    id = owner && h < stride ? my_ids[h] : -1;
    key = id >= 0 ? score_key(my_scores[h]) : 0u;
  };
  uint32_t key, next_key;
  int id, next_id, head = 0;
  entry(0, key, id);
  entry(1, next_key, next_id);
  won_key = 0;
  won_id = -1;
  int taken = 0;
  for (; taken < count; ++taken) {
    const uint32_t top = __reduce_max_sync(0xffffffff, key);
    if (top == 0) break;  // every list ran out
    const int top_id = __reduce_min_sync(0xffffffff, key == top ? id : 0x7fffffff);
    if (lane == taken) {
      won_key = top;
      won_id = top_id;
    }
    if (key == top && id == top_id) {  // ids are unique: one lane owns the winner
      key = next_key;
      id = next_id;
      ++head;
      entry(head + 1, next_key, next_id);
    }
  }
  return taken;
}

template <int kTopKCap>
__global__ void __launch_bounds__(kMergeThreads) decode_select_merge_kernel(const DecodeMergeParams p) {
  extern __shared__ char smem_buf[];
  const int num_lists = p.num_splits;  // one per split
  const int entries = num_lists * kTopKCap;
  float* s_score = reinterpret_cast<float*>(smem_buf);
  int32_t* s_id = reinterpret_cast<int32_t*>(s_score + entries);
  float* w_score = reinterpret_cast<float*>(s_id + entries);  // [warps, kTopKCap]
  int32_t* w_id = reinterpret_cast<int32_t*>(w_score + kMergeWarps * kTopKCap);

  const int rows = p.s_new * p.num_idx_heads;
  const int64_t row = blockIdx.x;  // b * rows + r
  const int b = static_cast<int>(row / rows);
  const int r = static_cast<int>(row % rows);
  const int pos = p.cache.length(b) - p.s_new + r / p.num_idx_heads;
  int32_t* out = p.block_indices + row * p.topk;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  // The indexer (the previous grid) must be complete before its lists are read; the attention
  // kernel may launch meanwhile (it waits for this grid in turn).
  asm volatile("griddepcontrol.launch_dependents;");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (pos < 0) {  // a request shorter than its new tokens: this token sees nothing
    for (int s = threadIdx.x; s < p.topk; s += blockDim.x) out[s] = -1;
    return;
  }
  const common::BlockRanges ranges(pos / p.block_size, p.init_blocks, p.local_blocks);
  const int num_selected = max(0, min(p.topk - ranges.num_forced(), ranges.num_candidates()));

  int taken = 0;
  uint32_t won_key = 0;
  int won_id = -1;
  if (num_selected > 0) {
    const float4* src_score = reinterpret_cast<const float4*>(p.part_score + row * entries);
    const int4* src_id = reinterpret_cast<const int4*>(p.part_id + row * entries);
    const int n4 = entries / 4;
    for (int base = threadIdx.x; base < n4; base += 4 * kMergeThreads) {
      float4 sc[4];
      int4 id[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int e = base + u * kMergeThreads;
        if (e < n4) {
          sc[u] = src_score[e];
          id[u] = src_id[e];
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int e = base + u * kMergeThreads;
        if (e < n4) {
          reinterpret_cast<float4*>(s_score)[e] = sc[u];
          reinterpret_cast<int4*>(s_id)[e] = id[u];
        }
      }
    }
    __syncthreads();
    // Level 1: warp w merges lists [w * share, (w + 1) * share) into its best num_selected.
    const int share = (num_lists + kMergeWarps - 1) / kMergeWarps;
    const int first = min(num_lists, warp * share);
    const int mine = min(num_lists, first + share) - first;
    uint32_t key;
    int id;
    const int got = warp_kway_merge(s_score + first * kTopKCap, s_id + first * kTopKCap, mine, kTopKCap,
                                    num_selected, lane, key, id);
    if (lane < kTopKCap) {
      w_score[warp * kTopKCap + lane] = lane < got ? key_score(key) : 0.f;
      w_id[warp * kTopKCap + lane] = lane < got ? id : -1;
    }
    __syncthreads();
    if (warp != 0) return;
    // Level 2: warp 0 merges the warps' lists.
    taken = warp_kway_merge(w_score, w_id, kMergeWarps, kTopKCap, num_selected, lane, won_key, won_id);
  } else if (warp != 0) {
    return;
  }
  // Winners in ascending order: lane k's rank among them is its slot after the leading blocks.
  int rank = 0;
  for (int k = 0; k < taken; ++k) rank += __shfl_sync(0xffffffff, won_id, k) < won_id;
  if (lane < taken) out[ranges.init_end + rank] = won_id;
  const int recent_begin = ranges.init_end + taken;
  const int num_recent = ranges.local - ranges.local_begin + 1;
  for (int slot = lane; slot < p.topk; slot += 32) {
    if (slot < ranges.init_end) {
      out[slot] = slot;
    } else if (slot >= recent_begin && slot < recent_begin + num_recent) {
      out[slot] = ranges.local_begin + (slot - recent_begin);
    } else if (slot >= recent_begin + num_recent) {
      out[slot] = -1;
    }
  }
}

}  // namespace msa::decode
