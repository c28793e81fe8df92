// Query-outer block-sparse attention forward for short contexts (MSA_SPEC s.5): at most 32 key
// blocks per sequence, which covers every case where a query can select all of its visible
// blocks (Sk <= topk x block_size, topk <= 32).
//
// Math: a tile is (sequence b, group g, 128/G consecutive query tokens); its 128 rows are those
// tokens x the G heads of g, as in the KV-outer kernel. Each token's selection becomes a 32-bit
// mask of its visible selected blocks; the tile walks the union of its tokens' masks in ascending
// order with an online softmax, masking per row the blocks the row's token did not select and the
// keys past its position, so out and lse are final: no partials, no combine. When selections are
// coherent across neighbouring tokens (full coverage above all) the union is what each token
// attends and no work is wasted; the KV-outer kernel serves long contexts, where they are not.
//
// Grid: persistent, tiles taken in a fixed stride (CTA c: tiles c, c + grid, ...), ordered so the
// last query tiles of the sequences (the most key blocks under causal masking) come first.
// Warp roles: warpgroup 0 = producer: per tile the 128 threads build the token masks (thread t:
// token t) and the union, gather the queries (TMA 8-head boxes for G >= 8, cp.async otherwise)
// and thread 0 TMA-loads K and V of each block of the union into the K/V ring. Warpgroups 1-2 =
// consumers, 64 rows each: per block S = Q K^T (SS), mask, online softmax, O += P V (RS); the next
// block's Q K^T is issued right after P V so the two GEMMs overlap; the epilogue normalizes O and
// stores it through the consumed query stage with 16-byte rows.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/fast_math.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <math_constants.h>

#include "msa/common/arch.cuh"
#include "msa/common/gemm.cuh"
#include "msa/common/lse.cuh"
#include "msa/common/seqlen.cuh"
#include "msa/fwd/fwd_collective.cuh"
#include "msa/fwd/fwd_traits.cuh"

namespace msa::fwd {

using namespace cute;

template <class Traits>
struct QueryTileParams {
  using Element = typename Traits::Element;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  cute::TmaDescriptor tma_q;      // q as [total_q * Hq, D], 8 x 64 SW128 boxes (used when G >= 8)
  int32_t total_k;
  const Element* q;               // [total_q, Hq, D]
  const int32_t* block_indices;   // [total_q, Hkv, topk]
  Element* out;                   // [total_q, Hq, D]
  float* lse;                     // padded [B, Hq, Sq] or varlen [Hq, total_q], natural log
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int batch, seqlen_q, seqlen_k;
  int64_t total_q;
  int num_heads, num_heads_kv, group_size, topk;
  int group_shift;                // log2(G)
  int tiles_per_seq;              // ceil(longest query sequence / tokens per tile)
  int num_tiles;                  // tiles_per_seq x batch x Hkv
  cutlass::FastDivmod seq_groups_div, heads_kv_div;  // batch x Hkv, Hkv
  float scale_log2;               // softmax_scale * log2(e)
};

// Tile t -> (sequence, group, first token within the sequence, tokens in the tile); tiles are
// numbered last query tile first. Empty (n_tokens == 0) past a sequence's end.
struct QueryTile {
  int batch_idx, group, first, n_tokens;
  common::SeqInfo seq;
  template <class Params>
  __device__ QueryTile(int t, int tokens_per_tile, Params const& p) : seq(0, nullptr, nullptr, 0, 0) {
    int tile_from_end, bg;
    p.seq_groups_div(tile_from_end, bg, t);
    p.heads_kv_div(batch_idx, group, bg);
    seq = common::SeqInfo(batch_idx, p.cu_seqlens_q, p.cu_seqlens_k, p.seqlen_q, p.seqlen_k);
    first = (p.tiles_per_seq - 1 - tile_from_end) * tokens_per_tile;
    n_tokens = max(0, min(tokens_per_tile, seq.seqlen_q - first));
  }
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
    fwd_query_tile_kernel(CUTE_GRID_CONSTANT QueryTileParams<Traits> const params) {
#if MSA_SM90_ENABLED
  using Element = typename Traits::Element;
  using QPipeline = typename Traits::QPipeline;
  using KVPipeline = typename Traits::KVPipeline;
  using QState = typename QPipeline::PipelineState;
  using KVState = typename KVPipeline::PipelineState;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kThreadsPerWG = common::kThreadsPerWarpGroup;
  constexpr int kRowsPerWG = Traits::kRowsPerWarpGroup;
  constexpr uint32_t kQStageBytes = Traits::kQStageBytes;

  extern __shared__ char smem_buf[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_buf);
  const int warp_group = common::warp_group_idx();
  const int lane = threadIdx.x % 32;
  const int G = params.group_size;
  const int g_shift = params.group_shift;
  const int tokens_per_tile = kBlockM >> g_shift;

  // Query ring: each producer thread arrives twice per stage, once when its cp.async copies land
  // (noinc) and once after its token-mask writes (a release arrival); consumers release a stage
  // once its output has left through it.
  QPipeline q_pipeline =
      make_query_ring<QPipeline>(smem.q_pipeline, warp_group, 2 * kThreadsPerWG, Traits::kNumMmaThreads);
  KVPipeline kv_pipeline =
      make_kv_ring<KVPipeline>(smem.kv_pipeline, warp_group, Traits::kTmaBytesKV, Traits::kNumMmaThreads);
  if (threadIdx.x == 0) {
    if (G >= 8) cute::prefetch_tma_descriptor(&params.tma_q);
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
  }
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutKV{});

  if (warp_group == 0) {
    // ---------------- producer warpgroup ----------------
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    Tensor mK = params.tma_k.get_tma_tensor(make_shape(params.total_k, Int<kHeadDim>{}, params.num_heads_kv));
    Tensor mV = params.tma_v.get_tma_tensor(make_shape(params.total_k, Int<kHeadDim>{}, params.num_heads_kv));
    // cp.async gather (G < 8): thread tid copies chunk tid % C of rows tid / C + k * kRowStep.
    constexpr int kChunksPerRow = kHeadDim / 8;
    constexpr int kRowStep = kThreadsPerWG / kChunksPerRow;
    static_assert(kRowStep % 8 == 0 && kBlockM / kRowStep == kChunksPerRow);
    const int chunk_col = (tid % kChunksPerRow) * 8;
    const uint32_t q_smem_thread =
        static_cast<uint32_t>(__cvta_generic_to_shared(&sQ(tid / kChunksPerRow, chunk_col, 0)));
    // TMA (G >= 8): lane L of warp 0 copies box L: token L / (G/8 * D/64), rows 8 ((L / (D/64)) %
    // (G/8)), half L % (D/64); 16 tokens x G/8 x D/64 = 16 D/64 boxes per tile.
    constexpr int kHalves = kHeadDim / 64;
    const bool use_tma = G >= 8;
    const int boxes_per_token = use_tma ? (G / 8) * kHalves : 1;
    const int tma_token = lane / boxes_per_token;
    const int tma_rows = use_tma ? 8 * ((lane / kHalves) % (G / 8)) : 0;
    const int tma_half = lane % kHalves;

    QState q_state = cutlass::make_producer_start_state<QPipeline>();
    KVState kv_state = cutlass::make_producer_start_state<KVPipeline>();
    for (int t = blockIdx.x; t < params.num_tiles; t += gridDim.x) {
      const QueryTile tile(t, tokens_per_tile, params);
      if (tile.n_tokens == 0) continue;  // the consumers skip it alike
      const int64_t token0 = tile.seq.q_token_start + tile.first;  // flat token of the tile's first row
      // This thread's token: its visible selected blocks as a bit mask (ids are unique per row;
      // -1, out-of-range ids and blocks past the query's position drop out).
      uint32_t blocks = 0;
      if (tid < tile.n_tokens) {
        const int pos = tile.seq.query_position(tile.first + tid);
        const int visible = min(min(pos / kBlockN + 1, (tile.seq.seqlen_k + kBlockN - 1) / kBlockN),
                                Traits::kMaxBlocks);
        const int32_t* sel = params.block_indices + ((token0 + tid) * params.num_heads_kv + tile.group) * params.topk;
#pragma unroll 4
        for (int s = 0; s < params.topk; ++s) {
          const int blk = sel[s];
          blocks |= (blk >= 0 && blk < visible) ? (1u << blk) : 0u;
        }
      }
      q_pipeline.producer_acquire(q_state);
      const int stage = q_state.index();
      auto* full_barrier = q_pipeline.producer_get_barrier(q_state);
      smem.token_blocks[stage][tid] = blocks;
      const uint32_t warp_union = __reduce_or_sync(0xffffffff, blocks);
      if (lane == 0) smem.union_part[stage][warp] = warp_union;
      if (use_tma) {
        if (tid < 32) {
          if (lane == 0) {
            cutlass::arch::ClusterTransactionBarrier::expect_transaction(
                full_barrier, tile.n_tokens * G * kHeadDim * sizeof(Element));
          }
          __syncwarp();
          if (lane < 16 * kHalves && tma_token < tile.n_tokens) {
            const int q_row = static_cast<int>(token0 + tma_token) * params.num_heads + tile.group * G + tma_rows;
            char* dst = reinterpret_cast<char*>(smem.q.data()) + stage * kQStageBytes + tma_half * (kBlockM * 128) +
                        (tma_token * G + tma_rows) * 128;
            SM90_TMA_LOAD_2D::copy(&params.tma_q, full_barrier, static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL),
                                   dst, tma_half * 64, q_row);
          }
        }
      } else {
        const uint32_t q_smem = q_smem_thread + stage * kQStageBytes;
#pragma unroll
        for (int k = 0; k < kChunksPerRow; ++k) {
          const int row = tid / kChunksPerRow + k * kRowStep;
          const int token = row >> g_shift;
          if (token < tile.n_tokens) {
            const int64_t q_row = (token0 + token) * params.num_heads + tile.group * G + (row & (G - 1));
            cp_async_16(q_smem + k * kRowStep * 128, params.q + q_row * kHeadDim + chunk_col);
          }
        }
      }
      cutlass::arch::cpasync_barrier_arrive_noinc(full_barrier);
      q_pipeline.producer_commit(q_state);  // releases the token_blocks / union_part writes
      ++q_state;
      // Thread 0 loads K/V of the union's blocks; the other threads go on to the next tile.
      cutlass::arch::NamedBarrier::sync(kThreadsPerWG, static_cast<int>(FwdBarrier::ProducerUnion));
      if (tid == 0) {
        uint32_t todo = smem.union_part[stage][0] | smem.union_part[stage][1] | smem.union_part[stage][2] |
                        smem.union_part[stage][3];
        while (todo != 0) {
          const int blk = __ffs(todo) - 1;
          todo &= todo - 1;
          kv_pipeline.producer_acquire(kv_state);
          load_kv_block<Traits>(params.tma_k, params.tma_v, mK, mV, sK, sV, kv_pipeline.producer_get_barrier(kv_state),
                                kv_state.index(), static_cast<int>(tile.seq.k_token_start) + blk * kBlockN,
                                tile.group);
          ++kv_state;
        }
      }
      __syncwarp();
    }
    return;
  }

  // ---------------- consumers ----------------
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int mma_thread = threadIdx.x - kThreadsPerWG;
  const int mma_wg = warp_group - 1;  // rows [64 mma_wg, 64 mma_wg + 64) of each tile
  const int wg_thread = mma_thread % kThreadsPerWG;
  Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutVt{});
  typename Traits::TiledMmaQK tiled_mma_qk;
  typename Traits::TiledMmaPV tiled_mma_pv;
  auto thr_mma_qk = tiled_mma_qk.get_thread_slice(mma_thread);
  auto thr_mma_pv = tiled_mma_pv.get_thread_slice(mma_thread);
  Tensor tSrQ = thr_mma_qk.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma_qk.partition_fragment_B(sK);
  Tensor tOrVt = thr_mma_pv.partition_fragment_B(sVt);
  Tensor tSrS = partition_fragment_C(tiled_mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tOrO = partition_fragment_C(tiled_mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  // P as the A operand of O = P V: value 8s + v of S is value v of k-slice s (see fwd_kernel).
  Tensor tOrP = make_tensor<Element>(common::AccumulatorAsOperandA<kBlockN>{});
  static_assert(decltype(size(tSrS))::value == kBlockN / 2 && decltype(size(tOrP))::value == kBlockN / 2);
  static_assert(decltype(size(tOrO))::value == kHeadDim / 2);

  const int epilogue_barrier = static_cast<int>(mma_wg == 0 ? FwdBarrier::Epilogue0 : FwdBarrier::Epilogue1);
  const uint32_t q_smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem.q.data()));
  const int quad = lane % 4;
  const int warp_in_wg = wg_thread / 32;
  const int row_base = warp_in_wg * 16 + lane / 4;  // this thread's rows: row_base, row_base + 8
  QState q_state;
  KVState kv_state;

  for (int t = blockIdx.x; t < params.num_tiles; t += gridDim.x) {
    const QueryTile tile(t, tokens_per_tile, params);
    if (tile.n_tokens == 0) continue;
    q_pipeline.consumer_wait(q_state);
    const int q_stage = q_state.index();
    cutlass::arch::fence_view_async_shared();  // cp.async (generic proxy) writes -> WGMMA reads
    uint32_t todo = smem.union_part[q_stage][0] | smem.union_part[q_stage][1] | smem.union_part[q_stage][2] |
                    smem.union_part[q_stage][3];
    uint32_t row_blocks[2];
    int row_pos[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int token = (mma_wg * kRowsPerWG + row_base + 8 * i) >> g_shift;
      const bool valid = token < tile.n_tokens;
      row_blocks[i] = valid ? smem.token_blocks[q_stage][token] : 0u;
      row_pos[i] = valid ? tile.seq.query_position(tile.first + token) : -1;
    }

    // Online softmax state per row, in log2 units of the scaled scores.
    float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F}, row_sum[2] = {0.f, 0.f};
    clear(tOrO);
    warpgroup_fence_operand(tOrO);
    // Every WGMMA sits on straight-line code inside the one branch: a WGMMA under a condition of
    // its own makes ptxas serialize them all. The next block's Q K^T is issued behind P V.
    if (todo != 0) {
      KVState prev_kv_state;
      bool have_prev = false;
      kv_pipeline.consumer_wait(kv_state);
      common::warpgroup_gemm</*kZeroInit=*/true, /*kWait=*/false>(tiled_mma_qk, tSrQ(_, _, _, q_stage),
                                                                   tSrK(_, _, _, kv_state.index()), tSrS);
      for (;;) {
        const int blk = __ffs(todo) - 1;
        todo &= todo - 1;
        warpgroup_wait<0>();  // S of this block; P V of the previous one
        warpgroup_fence_operand(tSrS);
        warpgroup_fence_operand(tOrO);
        if (have_prev) kv_pipeline.consumer_release(prev_kv_state);

        int last_col[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) last_col[i] = (row_blocks[i] >> blk) & 1u ? row_pos[i] - blk * kBlockN : -1;
        mask_block_columns<kBlockN>(tSrS, last_col, quad);
        online_softmax_block<kBlockN>(tSrS, tOrO, row_max, row_sum, params.scale_log2);
#pragma unroll
        for (int v = 0; v < size(tSrS); ++v) tOrP(v) = static_cast<Element>(tSrS(v));

        warpgroup_fence_operand(tOrP);
        common::warpgroup_gemm</*kZeroInit=*/false, /*kWait=*/false>(tiled_mma_pv, tOrP,
                                                                      tOrVt(_, _, _, kv_state.index()), tOrO);
        prev_kv_state = kv_state;
        have_prev = true;
        ++kv_state;
        if (todo == 0) break;
        kv_pipeline.consumer_wait(kv_state);
        common::warpgroup_gemm</*kZeroInit=*/true, /*kWait=*/false>(tiled_mma_qk, tSrQ(_, _, _, q_stage),
                                                                     tSrK(_, _, _, kv_state.index()), tSrS);
      }
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      kv_pipeline.consumer_release(prev_kv_state);
    }

    // Epilogue: O / sum into this warpgroup's rows of the consumed query stage, then 16-byte rows
    // to out; lse per row (natural log; -inf and out = 0 for a row with no visible key).
    float out_scale[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      out_scale[i] = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
      const int row = mma_wg * kRowsPerWG + row_base + 8 * i;
      const int token = row >> g_shift;
      if (quad == 0 && token < tile.n_tokens) {
        const int head = tile.group * G + (row & (G - 1));
        const int64_t idx = params.cu_seqlens_q != nullptr
                                ? head * params.total_q + tile.seq.q_token_start + tile.first + token
                                : (static_cast<int64_t>(tile.batch_idx) * params.num_heads + head) * params.seqlen_q +
                                      tile.first + token;
        params.lse[idx] = common::natural_lse(row_max[i], row_sum[i]);
      }
    }
    const uint32_t stage_base = q_smem_base + q_stage * kQStageBytes;
    stage_output_rows<Traits>(tOrO, out_scale, stage_base, mma_wg, warp_in_wg, lane);
    cutlass::arch::NamedBarrier::sync(kThreadsPerWG, epilogue_barrier);
    const int64_t token0 = tile.seq.q_token_start + tile.first;
    store_staged_rows<Traits>(stage_base, mma_wg, wg_thread, [&](int row_in_wg) -> Element* {
      const int row = mma_wg * kRowsPerWG + row_in_wg;
      const int token = row >> g_shift;
      if (token >= tile.n_tokens) return nullptr;
      return params.out + ((token0 + token) * params.num_heads + tile.group * G + (row & (G - 1))) * kHeadDim;
    });
    // The producer may refill this stage by TMA (async proxy): order the staging accesses first.
    cutlass::arch::fence_view_async_shared();
    q_pipeline.consumer_release(q_state);
    ++q_state;
  }
#endif
}

}  // namespace msa::fwd
