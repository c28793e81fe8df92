// KV-outer block-sparse attention backward (MSA_SPEC s.6): WGMMA for all five GEMMs, dK/dV kept in
// registers across a run of same-block tiles, fp32 atomics for the gradients (or, in deterministic
// mode, 64-bit fixed-point atomics over a sorted plan: see GradAccum).
//
// Math per row i (query token t, head h) and key j of a selected block, with s = softmax_scale:
//   P_ij = exp(s q_i.k_j - lse_i) (0 for masked keys), dP_ij = dO_i.v_j,
//   dS_ij = P_ij (dP_ij - delta_i), delta_i = dO_i.O_i - dlse_i,
//   dq_i += s sum_j dS_ij k_j, dk_j += s sum_i dS_ij q_i, dv_j += sum_i P_ij dO_i.
// The work list is the forward plan's (tiles of 128/G tokens that chose one key block), walked by
// the forward's dynamic scheduler. Warp roles: warpgroup 0 = producer (thread 0 TMA-loads K and V
// when the block changes; all 128 threads gather the tile's Q and dO rows by cp.async into two
// 64-row half stages and copy each row's lse, delta and last visible key); warpgroups 1-2 =
// consumers, keys as M (BwdTraits):
//   per 64-row half (step): S^T = K Q^T, dP^T = V dO^T (SS) -> P^T, dS^T in registers ->
//   dV += P^T dO, dK += dS^T Q (RS) and dS^T to the staging tile;
//   per 64-row half, once both warpgroups staged it: dQ_rows = dS K (SS, from the staging tile)
//   -> atomics, by the warpgroup that owns those rows (the two drift apart: see StagedHalf0);
//   per run of same-block tiles: dK, dV -> atomics.
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

// Measurement switch (bench/RESULTS.md; wrong gradients, timing only; scripts/bwd_dq_cost.sh):
// -DMSA_BWD_PROFILE_DQ=1 skips the dQ atomics but keeps the GEMM live (its atomics sit behind a
// token that never occurs: where atomics simply vanish, ptxas also drops most of the dQ GEMM,
// whose results are dead), =2 drops the whole dQ (GEMM and atomics), =3 stores the dQ rows as
// bf16 instead of reducing them (what per-slot dQ partials would cost).
#ifdef MSA_BWD_PROFILE_DQ
constexpr int kProfileDq = MSA_BWD_PROFILE_DQ;
#else
constexpr int kProfileDq = 0;
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
  GradAccum dq;             // [total_q, Hq, D] addressing; only the chunk's rows exist (bwd_launch.cuh)
  GradAccum dk;             // [total_k, Hkv, D]
  GradAccum dv;             // [total_k, Hkv, D]
  const int32_t* entries;   // pack_entry(token - token_begin, slot) per list entry
  const int4* work;         // (list, first entry, entries, 0) per tile, then the sentinel
  const int32_t* num_work;  // [1]
  int32_t* work_counter;    // [1], zeroed by the plan
  int32_t token_begin;      // first flat query token of the chunk (entries are relative to it)
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
  constexpr uint32_t kQHalfStageBytes = Traits::kQHalfStageBytes;

  extern __shared__ char smem_buf[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_buf);
  const int warp_group = common::warp_group_idx();
  const int G = params.group_size;
  const int g_shift = params.group_shift;

  // Query/dO ring of half tiles: each producer thread arrives twice per stage (cp.async
  // completion, noinc, and a release arrival after its shared-memory writes); every consumer
  // thread that walks the half releases it.
  QPipeline q_pipeline =
      fwd::make_query_ring<QPipeline>(smem.q_pipeline, warp_group, 2 * kThreadsPerWG, Traits::kQConsumers);
  KVPipeline kv_pipeline = fwd::make_kv_ring<KVPipeline>(smem.kv_pipeline, warp_group, Traits::kTmaBytesKV, kMmaThreads);
  if (threadIdx.x == 0) {
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
  }
  __syncthreads();

  const int num_work = *params.num_work;
  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQHalf{});
  Tensor sdO = make_tensor(make_smem_ptr(smem.dout.data()), typename Traits::SmemLayoutQHalf{});
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
    constexpr int kPassesPerHalf = 64 / kRowStep;
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
      // Row tid: its token, lse, delta and last visible key, and its Q and dO rows prefetched into
      // L2, all before waiting for a free stage: with one stage (D 128, block 128) this chain of
      // dependent loads would otherwise stall the consumers on every tile.
      int token = -1;
      if (!last && (tid >> g_shift) < item.z) {
        token = params.token_begin + fwd::entry_token(params.entries[item.y + (tid >> g_shift)]);
      }
      const fwd::TileCoord tc(last ? 0 : item.x, params.num_blocks_max_div, params.num_heads_kv_div);
      const int group = tc.group;
      const int64_t my_row = token >= 0 ? int64_t{token} * params.num_heads + group * G + (tid & (G - 1)) : -1;
      int last_key = -1;
      float lse = 0.f, delta = 0.f;
      if (token >= 0) {
        const common::SeqInfo seq(tc.batch_idx, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q,
                                  params.seqlen_k);
        last_key = seq.query_position(static_cast<int>(token - seq.q_token_start)) - tc.block * kBlockN;
        lse = params.lse_log2[my_row];
        delta = params.delta[my_row];
#pragma unroll
        for (int line = 0; line < kHeadDim * static_cast<int>(sizeof(Element)) / 128; ++line) {
          asm volatile("prefetch.global.L2 [%0];\n" ::"l"(params.q + my_row * kHeadDim + line * 64));
          asm volatile("prefetch.global.L2 [%0];\n" ::"l"(params.dout + my_row * kHeadDim + line * 64));
        }
      }
      // The tile's two half stages; row tid's data goes into half tid / 64.
      const int4 tile = make_int4(item.x, item.y, item.z, scheduler.run_start() ? 1 : 0);
#pragma unroll 1
      for (int half = 0; half < 2; ++half) {
        q_pipeline.producer_acquire(q_state);
        const int stage = q_state.index();
        auto* full_barrier = q_pipeline.producer_get_barrier(q_state);
        if (tid == 0) smem.tile[stage] = tile;
        if ((tid >> 6) == half) {
          smem.row_token[stage][tid & 63] = token;
          smem.row_last_key[stage][tid & 63] = last_key;
          smem.row_lse[stage][tid & 63] = lse;
          smem.row_delta[stage][tid & 63] = delta;
        }
        cutlass::arch::NamedBarrier::sync(kThreadsPerWG, static_cast<int>(BwdBarrier::ProducerRows));
        // Q and dO rows: thread tid copies chunk tid % C of rows tid / C + k * kRowStep. A row's head
        // is (64 half + row) mod G = row mod G (G divides 64).
#pragma unroll
        for (int k = 0; k < kPassesPerHalf; ++k) {
          const int row = tid / kChunksPerRow + k * kRowStep;
          const int row_tok = smem.row_token[stage][row];
          const uint32_t q_dst = q_smem_thread + stage * kQHalfStageBytes + k * kRowStep * 128;
          const uint32_t do_dst = do_smem_thread + stage * kQHalfStageBytes + k * kRowStep * 128;
          if (row_tok >= 0) {
            const int64_t src =
                (int64_t{row_tok} * params.num_heads + group * G + (row & (G - 1))) * kHeadDim + chunk_col;
            fwd::cp_async_16(q_dst, params.q + src);
            fwd::cp_async_16(do_dst, params.dout + src);
          } else {
            // Padding rows must be finite: they meet dS = 0 and P = 0 in dK = dS^T Q and
            // dV = P^T dO, and 0 x NaN (stale bits) would poison whole key rows.
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(q_dst), "r"(0));
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(do_dst), "r"(0));
          }
        }
        cutlass::arch::cpasync_barrier_arrive_noinc(full_barrier);
        q_pipeline.producer_commit(q_state);  // releases this thread's shared-memory writes
        ++q_state;
      }
      // K/V of a new block after the tile's queries: with one K/V stage the consumers free the old
      // block's stage only once they see this tile, so acquiring it first would deadlock.
      if (!last && item.x != loaded_list) {
        if (tid == 0) {
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
  constexpr int kSteps = Traits::kStepsPerTile;
  constexpr uint32_t kHalfBytes = 128 * 128;  // one 64-row half of the staging tile (fwd::stage_rows_stmatrix)
  const int mma_thread = threadIdx.x - kThreadsPerWG;
  const int mma_wg = mma_thread / kThreadsPerWG;
  const int wg_thread = mma_thread % kThreadsPerWG;
  // The 64-key half of the block this warpgroup owns (block 128), or the whole 64-key block.
  const int key_half = kSteps == 2 ? mma_wg : 0;
  Tensor sQt = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQHalfT{});
  Tensor sdOt = make_tensor(make_smem_ptr(smem.dout.data()), typename Traits::SmemLayoutQHalfT{});
  Tensor sKt = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutVt{});

  typename Traits::TiledMmaSdPt tiled_mma_sdp;  // S^T = K Q^T and dP^T = V dO^T
  typename Traits::TiledMmaDKV tiled_mma_dkv;   // dV += P^T dO, dK += dS^T Q (P^T, dS^T from registers)
  typename Traits::TiledMmaDQ tiled_mma_dq;     // dQ = dS K
  auto thr_sdp = tiled_mma_sdp.get_thread_slice(wg_thread);
  auto thr_dkv = tiled_mma_dkv.get_thread_slice(wg_thread);
  auto thr_dq = tiled_mma_dq.get_thread_slice(wg_thread);
  using KeyTile = Shape<_64, Int<kHeadDim>>;
  Tensor tSrK = thr_sdp.partition_fragment_A(local_tile(sK(_, _, 0), KeyTile{}, make_coord(key_half, _0{})));
  Tensor tSrV = thr_sdp.partition_fragment_A(local_tile(sV(_, _, 0), KeyTile{}, make_coord(key_half, _0{})));
  // dS as the A operand of dQ = dS K, this warpgroup's 64 rows, per staging buffer.
  auto dq_operand_ds = [&](int buffer) {
    Tensor sdS = make_tensor(make_smem_ptr(smem.ds.data() + buffer * Traits::kStagingBufferElems),
                             typename Traits::SmemLayoutdS{});
    return thr_dq.partition_fragment_A(local_tile(sdS, Shape<_64, Int<kBlockN>>{}, make_coord(mma_wg, _0{})));
  };
  Tensor tDQrK = thr_dq.partition_fragment_B(sKt(_, _, 0));
  Tensor tSrS = partition_fragment_C(tiled_mma_sdp, Shape<_64, _64>{});
  Tensor tSrdP = partition_fragment_C(tiled_mma_sdp, Shape<_64, _64>{});
  Tensor tdVrdV = partition_fragment_C(tiled_mma_dkv, Shape<_64, Int<kHeadDim>>{});
  Tensor tdKrdK = partition_fragment_C(tiled_mma_dkv, Shape<_64, Int<kHeadDim>>{});
  Tensor tdQrdQ = partition_fragment_C(tiled_mma_dq, Shape<_64, Int<kHeadDim>>{});
  // P^T and dS^T as the A operands of the dK/dV GEMMs: the S^T accumulator's register order is the
  // A fragment's (as P for O = P V in the forward).
  Tensor tDKVrPt = make_tensor<Element>(common::AccumulatorAsOperandA<64>{});
  Tensor tDKVrdSt = make_tensor<Element>(common::AccumulatorAsOperandA<64>{});
  static_assert(decltype(size(tSrS))::value == decltype(size(tDKVrPt))::value);
  // Accumulator layout (m64nN): this thread holds rows row_base + 8 i of the 64, columns
  // 8 j + 2 quad + c, as value 4 j + 2 i + c. In S^T, dP^T, dK and dV the rows are the keys
  // key_row + 8 i of the block; in S^T and dP^T the columns are the tile rows of the step.
  const int lane = threadIdx.x % 32;
  const int quad = lane % 4;
  const int warp_in_wg = wg_thread / 32;
  const int row_base = warp_in_wg * 16 + lane / 4;
  const int key_row = key_half * 64 + row_base;
  const uint32_t staging_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem.ds.data()));

  // dK and dV of a finished run to the fp32 (or fixed-point) accumulators.
  auto flush_key_grads = [&](int list) {
    const fwd::TileCoord tc(list, params.num_blocks_max_div, params.num_heads_kv_div);
    const common::SeqInfo seq(tc.batch_idx, params.cu_seqlens_q, params.cu_seqlens_k, params.seqlen_q,
                              params.seqlen_k);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int key = tc.block * kBlockN + key_row + 8 * i;
      if (key < seq.seqlen_k) {
        const int64_t dst = ((seq.k_token_start + key) * params.num_heads_kv + tc.group) * kHeadDim + 2 * quad;
#pragma unroll
        for (int j = 0; j < kHeadDim / 8; ++j) {
          params.dv.template add_pair<kFixedPoint>(dst + 8 * j, tdVrdV(4 * j + 2 * i), tdVrdV(4 * j + 2 * i + 1));
          params.dk.template add_pair<kFixedPoint>(dst + 8 * j, tdKrdK(4 * j + 2 * i) * params.scale,
                                                   tdKrdK(4 * j + 2 * i + 1) * params.scale);
        }
      }
    }
  };
  // dQ rows = scale dS K over the whole block for this warpgroup's 64 rows, straight to atomics.
  auto dq_rows = [&](int buffer, int group, const int (&dq_token)[2]) {
    if constexpr (kProfileDq == 2) return;
    common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_dq, dq_operand_ds(buffer), tDQrK, tdQrdQ);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      // (Profiling, kProfileDq 1: a token that never occurs, so the GEMM's result stays live.)
      if (dq_token[i] >= 0 && (kProfileDq != 1 || dq_token[i] == 0x7fffffff)) {
        const int row = mma_wg * 64 + row_base + 8 * i;
        const int64_t dst =
            (int64_t{dq_token[i]} * params.num_heads + group * G + (row & (G - 1))) * kHeadDim + 2 * quad;
#pragma unroll
        for (int j = 0; j < kHeadDim / 8; ++j) {
          const float a = tdQrdQ(4 * j + 2 * i) * params.scale, b = tdQrdQ(4 * j + 2 * i + 1) * params.scale;
          if constexpr (kProfileDq == 3) {
            // (Profiling: a bf16 store instead of the fp32 reduction, into the chunk's dq accumulator.)
            reinterpret_cast<__nv_bfloat162*>(params.dq.f32)[(dst + 8 * j) / 2] = __floats2bfloat162_rn(a, b);
          } else {
            params.dq.template add_pair<kFixedPoint>(dst + 8 * j, a, b);
          }
        }
      }
    }
  };

  QState q_state;
  KVState kv_state;
  int current_list = -1;
  int buffer = 0;  // staging buffer of this tile
  for (;;) {
    // Block 64: warpgroup w walks only half stage w of each tile.
    if (kSteps == 1 && mma_wg == 1) ++q_state;
    q_pipeline.consumer_wait(q_state);
    int stage = q_state.index();
    cutlass::arch::fence_view_async_shared();  // cp.async (generic proxy) writes -> WGMMA reads
    const int4 item = smem.tile[stage];
    const bool end = item.x < 0;
    // A new run (the scheduler's runs are fixed, so deterministic mode sums the same tiles in
    // registers every time) or a new block: the previous run's dK, dV leave.
    if (end || item.x != current_list || item.w != 0) {
      if (current_list >= 0) {
        if (item.x != current_list) {
          kv_pipeline.consumer_release(kv_state);  // the producer may load the next block meanwhile
          ++kv_state;
        }
        flush_key_grads(current_list);
      }
      if (end) break;
      if (item.x != current_list) {
        kv_pipeline.consumer_wait(kv_state);
        current_list = item.x;
      }
      clear(tdVrdV);
      clear(tdKrdK);
    }
    const int group = fwd::TileCoord(item.x, params.num_blocks_max_div, params.num_heads_kv_div).group;
    // Tokens of this warpgroup's dQ rows (its 64-row half), read while their half stage is held.
    int dq_token[2];

#pragma unroll 1
    for (int step = 0; step < kSteps; ++step) {
      const int half = kSteps == 2 ? step : mma_wg;  // the tile's 64-row half this step walks
      if (step > 0) {
        q_pipeline.consumer_wait(q_state);
        stage = q_state.index();
        cutlass::arch::fence_view_async_shared();
      }
      if (half == mma_wg) {
#pragma unroll
        for (int i = 0; i < 2; ++i) dq_token[i] = smem.row_token[stage][row_base + 8 * i];
      }
      Tensor tSrQ = thr_sdp.partition_fragment_B(sQ(_, _, stage));
      Tensor tSrdO = thr_sdp.partition_fragment_B(sdO(_, _, stage));
      Tensor tDKVrQ = thr_dkv.partition_fragment_B(sQt(_, _, stage));
      Tensor tDKVrdO = thr_dkv.partition_fragment_B(sdOt(_, _, stage));
      common::warpgroup_gemm</*kZeroInit=*/true, /*kWait=*/false>(tiled_mma_sdp, tSrK, tSrQ, tSrS);
      common::warpgroup_gemm</*kZeroInit=*/true, /*kWait=*/false>(tiled_mma_sdp, tSrV, tSrdO, tSrdP);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      warpgroup_fence_operand(tSrdP);
      // P^T = exp(s S^T - lse) and dS^T = P^T (dP^T - delta), 0 where the row may not see the key;
      // branch-free (exp2(-inf) = 0). Columns are rows 8 j + 2 quad + c of the half tile.
      const int row0 = 2 * quad;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float2 lse = *reinterpret_cast<const float2*>(&smem.row_lse[stage][row0 + 8 * j]);
        const float2 delta = *reinterpret_cast<const float2*>(&smem.row_delta[stage][row0 + 8 * j]);
        const int2 last_key = *reinterpret_cast<const int2*>(&smem.row_last_key[stage][row0 + 8 * j]);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int v = 4 * j + 2 * i + c;
            const bool visible = key_row + 8 * i <= (c ? last_key.y : last_key.x);
            const float p =
                exp2f(visible ? tSrS(v) * params.scale_log2 - (c ? lse.y : lse.x) : -CUDART_INF_F);
            tDKVrPt(v) = static_cast<Element>(p);
            tDKVrdSt(v) = static_cast<Element>(p * (tSrdP(v) - (c ? delta.y : delta.x)));
          }
        }
      }
      warpgroup_fence_operand(tDKVrPt);
      warpgroup_fence_operand(tDKVrdSt);
      common::warpgroup_gemm</*kZeroInit=*/false, /*kWait=*/false>(tiled_mma_dkv, tDKVrPt, tDKVrdO, tdVrdV);
      common::warpgroup_gemm</*kZeroInit=*/false, /*kWait=*/false>(tiled_mma_dkv, tDKVrdSt, tDKVrQ, tdKrdK);
      // dS^T to the staging tile while the GEMMs run (they only read these registers).
      fwd::stage_fragment_rows<64>(
          tDKVrdSt, staging_base + (buffer * Traits::kStagingBufferElems) * sizeof(Element) + half * kHalfBytes,
          key_half, warp_in_wg, lane);
      cutlass::arch::fence_view_async_shared();  // stmatrix (generic proxy) -> WGMMA reads
      warpgroup_wait<0>();
      warpgroup_fence_operand(tdVrdV);
      warpgroup_fence_operand(tdKrdK);
      warpgroup_fence_operand(tDKVrPt);
      warpgroup_fence_operand(tDKVrdSt);
      // Nothing reads this half stage (Q, dO, row data) any more: the producer may refill it.
      q_pipeline.consumer_release(q_state);
      ++q_state;
      // Row half `half` is staged once both warpgroups (block 64: this one) are here. The warpgroup
      // whose dQ rows these are waits and computes them now; the other only arrives, so the two
      // drift apart and one's softmax overlaps the other's GEMMs. With two buffers, the next
      // write to this one comes a tile later, after the barriers of the tile in between.
      const int barrier_id = static_cast<int>(half == 0 ? BwdBarrier::StagedHalf0 : BwdBarrier::StagedHalf1);
      if (kSteps == 1) {
        cutlass::arch::NamedBarrier::sync(kThreadsPerWG, barrier_id);
        dq_rows(buffer, group, dq_token);
      } else if (half == mma_wg) {
        cutlass::arch::NamedBarrier::sync(kMmaThreads, barrier_id);
        dq_rows(buffer, group, dq_token);
      } else {
        cutlass::arch::NamedBarrier::arrive(kMmaThreads, barrier_id);
      }
    }
    if (kSteps == 1 && mma_wg == 0) ++q_state;
    buffer ^= 1;
  }
#endif
}

}  // namespace msa::bwd
