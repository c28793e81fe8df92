// KV-outer block-sparse attention backward (MSA_SPEC s.6), first version: correct on every
// configuration of the forward, WGMMA for all five GEMMs, fp32 atomics for the gradients (or, in
// deterministic mode, 64-bit fixed-point atomics over a sorted plan: see GradAccum).
//
// Math per row i (query token t, head h) and key j of a selected block, with s = softmax_scale:
//   P_ij = exp(s q_i.k_j - lse_i) (0 for masked keys), dP_ij = dO_i.v_j,
//   dS_ij = P_ij (dP_ij - delta_i), delta_i = dO_i.O_i - dlse_i,
//   dq_i += s sum_j dS_ij k_j, dk_j += s sum_i dS_ij q_i, dv_j += sum_i P_ij dO_i.
// The work list is the forward plan's (tiles of 128/G tokens that chose one key block), walked by
// the forward's dynamic scheduler. Warp roles: warpgroup 0 = producer (thread 0 TMA-loads K and V
// when the block changes; all 128 threads gather the tile's Q and dO rows by cp.async and copy
// each row's lse and delta); warpgroups 1-2 = consumers (64 rows each):
//   S = Q K^T, dP = dO V^T (SS) -> P, dS in registers -> P^T to the staging tile -> dV_tile = P^T dO
//   -> dS^T to the staging tile -> dK_tile = dS^T Q (SS) and dQ_rows = dS K (RS) -> atomics.
// Later versions: dK/dV kept in registers across a run of same-block tiles, dQ through partials.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/fast_math.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <math_constants.h>

#include "msa/bwd/bwd_traits.cuh"
#include "msa/common/arch.cuh"
#include "msa/common/gemm.cuh"
#include "msa/common/seqlen.cuh"
#include "msa/fwd/fwd_collective.cuh"
#include "msa/fwd/fwd_common.cuh"
#include "msa/fwd/fwd_scheduler.cuh"

namespace msa::bwd {

using namespace cute;

// Measurement switch (bench/RESULTS.md, "where the time goes"): built with
// -DMSA_BWD_PROFILE_NO_ATOMICS the kernel skips its gradient atomics (wrong results).
#ifdef MSA_BWD_PROFILE_NO_ATOMICS
constexpr bool kProfileNoAtomics = true;
#else
constexpr bool kProfileNoAtomics = false;
#endif

// Where a gradient accumulates: fp32 atomics, or (deterministic mode, kFixedPoint) 64-bit fixed
// point, value x fixed_scale rounded to an integer: integer adds give the same bits in any order.
// A template flag, not a runtime branch: the branch alone raised the consumer's spills 20 -> 52 B.
struct GradAccum {
  float* f32;
  unsigned long long* fixed;
  float fixed_scale;

  // Adds (a, b) at elements offset, offset + 1.
  template <bool kFixedPoint>
  __device__ __forceinline__ void add_pair(int64_t offset, float a, float b) const {
    if constexpr (kProfileNoAtomics) return;
    if constexpr (kFixedPoint) {
      atomicAdd(fixed + offset, static_cast<unsigned long long>(__float2ll_rn(a * fixed_scale)));
      atomicAdd(fixed + offset + 1, static_cast<unsigned long long>(__float2ll_rn(b * fixed_scale)));
    } else {
      atomicAdd(reinterpret_cast<float2*>(f32 + offset), make_float2(a, b));
    }
  }
};

template <class Traits>
struct BwdKernelParams {
  using Element = typename Traits::Element;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  int32_t total_k;
  const Element* q;         // [total_q, Hq, D]
  const Element* dout;      // [total_q, Hq, D]
  const float* lse_log2;    // [total_q, Hq]
  const float* delta;       // [total_q, Hq]
  GradAccum dq;             // [total_q, Hq, D]
  GradAccum dk;             // [total_k, Hkv, D]
  GradAccum dv;             // [total_k, Hkv, D]
  const int32_t* entries;   // pack_entry(token, slot) per list entry (one chunk: all tokens)
  const int4* work;         // (list, first entry, entries, 0) per tile, then the sentinel
  const int32_t* num_work;  // [1]
  int32_t* work_counter;    // [1], zeroed by the plan
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int seqlen_q, seqlen_k;
  int num_heads, num_heads_kv, group_size, group_shift;
  cutlass::FastDivmod num_blocks_max_div, num_heads_kv_div;
  float scale;       // softmax_scale
  float scale_log2;  // softmax_scale * log2(e)
};

template <class Traits, bool kFixedPoint>
__global__ void __launch_bounds__(Traits::kNumThreads, 1)
    bwd_kernel(CUTE_GRID_CONSTANT BwdKernelParams<Traits> const params) {
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
  constexpr int kMmaThreads = Traits::kNumMmaThreads;
  constexpr uint32_t kQStageBytes = Traits::kQStageBytes;

  extern __shared__ char smem_buf[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_buf);
  const int warp_group = common::warp_group_idx();
  const int G = params.group_size;
  const int g_shift = params.group_shift;

  // Query/dO ring: each producer thread arrives twice per stage (cp.async completion, noinc, and a
  // release arrival after its shared-memory writes); every consumer thread releases it per tile.
  QPipeline q_pipeline =
      fwd::make_query_ring<QPipeline>(smem.q_pipeline, warp_group, 2 * kThreadsPerWG, kMmaThreads);
  KVPipeline kv_pipeline = fwd::make_kv_ring<KVPipeline>(smem.kv_pipeline, warp_group, Traits::kTmaBytesKV, kMmaThreads);
  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
  }
  __syncthreads();

  const int num_work = *params.num_work;
  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(smem.dout.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutKV{});

  if (warp_group == 0) {
    // ---------------- producer warpgroup ----------------
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    const int tid = threadIdx.x;
    Tensor mK = params.tma_k.get_tma_tensor(make_shape(params.total_k, Int<kHeadDim>{}, params.num_heads_kv));
    Tensor mV = params.tma_v.get_tma_tensor(make_shape(params.total_k, Int<kHeadDim>{}, params.num_heads_kv));
    constexpr int kChunksPerRow = kHeadDim / 8;
    constexpr int kRowStep = kThreadsPerWG / kChunksPerRow;
    static_assert(kRowStep % 8 == 0 && kBlockM / kRowStep == kChunksPerRow);
    const int chunk_col = (tid % kChunksPerRow) * 8;
    const uint32_t q_smem_thread =
        static_cast<uint32_t>(__cvta_generic_to_shared(&sQ(tid / kChunksPerRow, chunk_col, 0)));
    const uint32_t do_smem_thread =
        static_cast<uint32_t>(__cvta_generic_to_shared(&sdO(tid / kChunksPerRow, chunk_col, 0)));

    QState q_state = cutlass::make_producer_start_state<QPipeline>();
    KVState kv_state = cutlass::make_producer_start_state<KVPipeline>();
    int loaded_list = -1;
    fwd::DynamicTileScheduler scheduler(params.work_counter, num_work, &smem.grab_slot,
                                        static_cast<int>(BwdBarrier::ProducerGrab));
    for (;;) {
      const int4 item = params.work[scheduler.tile()];  // the plan's sentinel (list -1) at the end
      const bool last = scheduler.done();
      q_pipeline.producer_acquire(q_state);
      const int stage = q_state.index();
      auto* full_barrier = q_pipeline.producer_get_barrier(q_state);
      // Row tid: its token, lse and delta.
      int token = -1;
      if (!last && (tid >> g_shift) < item.z) {
        token = fwd::entry_token(params.entries[item.y + (tid >> g_shift)]);
      }
      const int group = last ? 0 : fwd::TileCoord(item.x, params.num_blocks_max_div, params.num_heads_kv_div).group;
      const int64_t my_row = token >= 0 ? int64_t{token} * params.num_heads + group * G + (tid & (G - 1)) : -1;
      if (tid == 0) smem.tile[stage] = item;
      smem.row_token[stage][tid] = token;
      smem.row_lse[stage][tid] = my_row >= 0 ? params.lse_log2[my_row] : 0.f;
      smem.row_delta[stage][tid] = my_row >= 0 ? params.delta[my_row] : 0.f;
      cutlass::arch::NamedBarrier::sync(kThreadsPerWG, static_cast<int>(BwdBarrier::ProducerRows));
      // Q and dO rows: thread tid copies chunk tid % C of rows tid / C + k * kRowStep.
#pragma unroll
      for (int k = 0; k < kChunksPerRow; ++k) {
        const int row = tid / kChunksPerRow + k * kRowStep;
        const int row_tok = smem.row_token[stage][row];
        const uint32_t q_dst = q_smem_thread + stage * kQStageBytes + k * kRowStep * 128;
        const uint32_t do_dst = do_smem_thread + stage * kQStageBytes + k * kRowStep * 128;
        if (row_tok >= 0) {
          const int64_t src = (int64_t{row_tok} * params.num_heads + group * G + (row & (G - 1))) * kHeadDim + chunk_col;
          fwd::cp_async_16(q_dst, params.q + src);
          fwd::cp_async_16(do_dst, params.dout + src);
        } else {
          // Padding rows must be finite: they meet dS = 0 and P = 0 in dK = dS^T Q and dV = P^T dO,
          // and 0 x NaN (stale bits) would poison whole key rows.
          asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(q_dst), "r"(0));
          asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(do_dst), "r"(0));
        }
      }
      cutlass::arch::cpasync_barrier_arrive_noinc(full_barrier);
      q_pipeline.producer_commit(q_state);  // releases this thread's shared-memory writes
      ++q_state;
      // K/V of a new block after the tile's queries: with one K/V stage the consumers free the old
      // block's stage only once they see this tile, so acquiring it first would deadlock.
      if (!last && item.x != loaded_list) {
        if (tid == 0) {
          const fwd::TileCoord tc(item.x, params.num_blocks_max_div, params.num_heads_kv_div);
          const common::SeqInfo seq(tc.batch_idx, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q,
                                    params.seqlen_k);
          kv_pipeline.producer_acquire(kv_state);
          fwd::load_kv_block<Traits>(params.tma_k, params.tma_v, mK, mV, sK, sV,
                                     kv_pipeline.producer_get_barrier(kv_state), kv_state.index(),
                                     static_cast<int>(seq.k_token_start) + tc.block * kBlockN, tc.group);
        }
        ++kv_state;
        loaded_list = item.x;
      }
      __syncwarp();  // thread 0 may have branched off for the K/V load; bar.sync needs the warp
      if (last) break;
      scheduler.advance();
    }
    return;
  }

  // ---------------- consumers ----------------
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int mma_thread = threadIdx.x - kThreadsPerWG;
  Tensor sQt = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(smem.dout.data()), typename Traits::SmemLayoutQt{});
  Tensor sKt = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutVt{});
  Tensor sPt = make_tensor(make_smem_ptr(smem.pt.data()), typename Traits::SmemLayoutPt{});

  typename Traits::TiledMmaQK tiled_mma_sdp;   // S = Q K^T and dP = dO V^T
  typename Traits::TiledMmaPV tiled_mma_dq;    // dQ = dS K (dS from registers)
  typename Traits::TiledMmaDKV tiled_mma_dkv;  // dV = P^T dO, dK = dS^T Q
  auto thr_sdp = tiled_mma_sdp.get_thread_slice(mma_thread);
  auto thr_dq = tiled_mma_dq.get_thread_slice(mma_thread);
  auto thr_dkv = tiled_mma_dkv.get_thread_slice(mma_thread);
  Tensor tSrQ = thr_sdp.partition_fragment_A(sQ);
  Tensor tSrdO = thr_sdp.partition_fragment_A(sdO);
  Tensor tSrK = thr_sdp.partition_fragment_B(sK);
  Tensor tSrV = thr_sdp.partition_fragment_B(sV);
  Tensor tDQrK = thr_dq.partition_fragment_B(sKt);
  Tensor tDKVrPt = thr_dkv.partition_fragment_A(sPt);
  Tensor tDKVrdO = thr_dkv.partition_fragment_B(sdOt);
  Tensor tDKVrQ = thr_dkv.partition_fragment_B(sQt);
  Tensor tSrS = partition_fragment_C(tiled_mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tSrdP = partition_fragment_C(tiled_mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tDQrDQ = partition_fragment_C(tiled_mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor tDKVrAcc = partition_fragment_C(tiled_mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  // dS as the A operand of dQ = dS K: the S accumulator's register order is the A fragment's
  // (as P for O = P V in the forward).
  Tensor tDQrdS = make_tensor<Element>(
      Layout<Shape<Shape<_2, _2, _2>, _1, Int<kBlockN / 16>>, Stride<Stride<_1, _2, _4>, _0, _8>>{});
  static_assert(decltype(size(tSrS))::value == decltype(size(tDQrdS))::value);
  // Accumulator layout (m64nN per warpgroup): this thread holds rows row_base + 8 i of its
  // warpgroup's 64, columns 8 j + 2 quad + c, as value 4 j + 2 i + c. All per-element addresses
  // below are a per-row base plus a constant, so nothing per element stays live across the loop.
  const int lane = threadIdx.x % 32;
  const int quad = lane % 4;
  const int mma_wg = mma_thread / kThreadsPerWG;
  const int warp_in_wg = (mma_thread % kThreadsPerWG) / 32;
  const int row_base = warp_in_wg * 16 + lane / 4;
  const uint32_t staging_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem.pt.data()));
  // dK/dV tile rows (keys) and column offset of this thread: the warpgroups split the keys of a
  // 128-key block, the columns of a 64-key block.
  const int dkv_key_base = (Traits::kSplitKeys ? mma_wg * 64 : 0) + row_base;
  const int dkv_col_base = (Traits::kSplitKeys ? 0 : mma_wg * (kHeadDim / 2)) + 2 * quad;
  constexpr int kDKVCols = Traits::kSplitKeys ? kHeadDim : kHeadDim / 2;
  static_assert(decltype(size(tDKVrAcc))::value == kDKVCols / 2);

  QState q_state;
  KVState kv_state;
  int current_list = -1;
  auto barrier_all_consumers = [&](BwdBarrier id) {
    cutlass::arch::NamedBarrier::sync(kMmaThreads, static_cast<int>(id));
  };

  for (;;) {
    q_pipeline.consumer_wait(q_state);
    const int stage = q_state.index();
    cutlass::arch::fence_view_async_shared();  // cp.async (generic proxy) writes -> WGMMA reads
    const int4 item = smem.tile[stage];
    if (item.x < 0) break;
    const fwd::TileCoord tc(item.x, params.num_blocks_max_div, params.num_heads_kv_div);
    const common::SeqInfo seq(tc.batch_idx, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q,
                              params.seqlen_k);
    if (item.x != current_list) {
      if (current_list >= 0) {
        kv_pipeline.consumer_release(kv_state);
        ++kv_state;
      }
      kv_pipeline.consumer_wait(kv_state);
      current_list = item.x;
    }
    const int kv_stage = kv_state.index();

    // S = Q K^T and dP = dO V^T.
    common::warpgroup_gemm</*kZeroInit=*/true, /*kWait=*/false>(tiled_mma_sdp, tSrQ(_, _, _, stage),
                                                                 tSrK(_, _, _, kv_stage), tSrS);
    common::warpgroup_gemm</*kZeroInit=*/true, /*kWait=*/false>(tiled_mma_sdp, tSrdO(_, _, _, stage),
                                                                 tSrV(_, _, _, kv_stage), tSrdP);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    warpgroup_fence_operand(tSrdP);

    // This thread's two rows: token (-1: padding row), lse, delta, last visible key of the block.
    const int block_start = tc.block * kBlockN;
    int row_token[2], last_key[2];
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = mma_wg * 64 + row_base + 8 * i;
      row_token[i] = smem.row_token[stage][row];
      row_lse[i] = smem.row_lse[stage][row];
      row_delta[i] = smem.row_delta[stage][row];
      last_key[i] = row_token[i] >= 0
                        ? seq.query_position(static_cast<int>(row_token[i] - seq.q_token_start)) - block_start
                        : -1;
    }
    // P = exp(s S - lse) in place of S, dS = P (dP - delta) in place of dP; masked keys give 0.
#pragma unroll
    for (int v = 0; v < size(tSrS); ++v) {
      const int i = (v / 2) % 2;
      const int key = 8 * (v / 4) + 2 * quad + (v % 2);
      const bool visible = key <= last_key[i];
      const float p = visible ? exp2f(tSrS(v) * params.scale_log2 - row_lse[i]) : 0.f;
      tSrS(v) = p;
      tDQrdS(v) = static_cast<Element>(visible ? p * (tSrdP(v) - row_delta[i]) : 0.f);
    }
    // P to the staging tile; dV_tile = P^T dO.
    fwd::stage_rows_stmatrix<kBlockN>(
        [&](int v) { return fwd::pack_pair<Element>(tSrS(v), tSrS(v + 1)); }, staging_base, mma_wg, warp_in_wg,
        lane);
    cutlass::arch::fence_view_async_shared();  // generic-proxy writes -> WGMMA reads
    barrier_all_consumers(BwdBarrier::StagingWritten);
    common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_dkv, tDKVrPt, tDKVrdO(_, _, _, stage), tDKVrAcc);
    auto add_key_tile = [&](GradAccum const& accum, float scale) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int key = dkv_key_base + 8 * i;
        if (block_start + key < seq.seqlen_k) {
          const int64_t dst =
              ((seq.k_token_start + block_start + key) * params.num_heads_kv + tc.group) * kHeadDim + dkv_col_base;
#pragma unroll
          for (int j = 0; j < kDKVCols / 8; ++j) {
            accum.template add_pair<kFixedPoint>(dst + 8 * j, tDKVrAcc(4 * j + 2 * i) * scale, tDKVrAcc(4 * j + 2 * i + 1) * scale);
          }
        }
      }
    };
    barrier_all_consumers(BwdBarrier::StagingRead);  // both warpgroups' dV GEMMs have read P
    add_key_tile(params.dv, 1.f);

    // dK_tile = scale dS^T Q through the staging tile; dQ_rows = scale dS K from registers.
    fwd::stage_fragment_rows<kBlockN>(tDQrdS, staging_base, mma_wg, warp_in_wg, lane);
    cutlass::arch::fence_view_async_shared();
    barrier_all_consumers(BwdBarrier::StagingWritten);
    // One accumulator at a time (dK, then dQ) keeps the consumer within its registers.
    common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_dkv, tDKVrPt, tDKVrQ(_, _, _, stage), tDKVrAcc);
    // Both warpgroups' dK GEMMs are done: the staging tile is free for the next tile, and nothing
    // reads this stage (Q, dO, row data) any more, so the producer may refill it during the dK
    // atomics and the dQ GEMM (which reads K and registers only).
    barrier_all_consumers(BwdBarrier::StagingRead);
    q_pipeline.consumer_release(q_state);
    ++q_state;
    add_key_tile(params.dk, params.scale);
    warpgroup_fence_operand(tDQrdS);
    common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_dq, tDQrdS, tDQrK(_, _, _, kv_stage), tDQrDQ);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (row_token[i] >= 0) {
        const int row = mma_wg * 64 + row_base + 8 * i;
        const int64_t dst =
            (int64_t{row_token[i]} * params.num_heads + tc.group * G + (row & (G - 1))) * kHeadDim + 2 * quad;
#pragma unroll
        for (int j = 0; j < kHeadDim / 8; ++j) {
          params.dq.template add_pair<kFixedPoint>(dst + 8 * j, tDQrDQ(4 * j + 2 * i) * params.scale,
                             tDQrDQ(4 * j + 2 * i + 1) * params.scale);
        }
      }
    }
  }
  if (current_list >= 0) kv_pipeline.consumer_release(kv_state);
#endif
}

}  // namespace msa::bwd
