// Sparse decode attention (MSA_SPEC s.5, s.8), split over the selected blocks.
//
// Grid (chunk, new token x group, request). A row (token, group) of the selection is split into
// chunks of slots_per_cta consecutive slots, sized on the host so the grid covers the GPU about
// once. A CTA copies the token's G query heads into rows 0..G-1 of a 64-row SW128 tile (zeros
// below), waits for the indexer grid, merges the row's split lists into its selection with both of
// its warpgroups (merge_row_selection; the second warpgroup then exits or waits for the chunk
// merge, so the rest syncs on a named barrier of the first), and walks its chunk's blocks with an
// online softmax: one thread keeps two blocks of K and V in flight (TMA, a barrier each, at the
// block's cache row: contiguous, or inside one page), and per block the warpgroup runs S = Q K^T
// (WGMMA, fp32) as soon as K lands, the causal mask at the token's position, the running max / sum,
// and O += P V (RS WGMMA). The chunks of a row then merge into out and lse, so no combine kernel
// runs. Where the GPU holds every row's chunks as one thread-block cluster at once (the host
// checks), each CTA keeps its normalized O (fp32) and lse (log2 units) in shared memory and the
// cluster merges them through distributed shared memory (combine_cluster_chunks); otherwise they go
// to a global partial, every CTA of the row (empty chunks too) counts itself in, and the last one
// merges the row's chunks (combine_row_chunks, reading the partials through L2). Rows of a block
// past the request's length are stale cache memory: their V rows are zeroed in shared memory
// before P V (a masked score gives P = 0, but 0 x NaN would still poison O).
#pragma once

#include <cooperative_groups.h>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include <math_constants.h>

#include "msa/common/arch.cuh"
#include "msa/common/gemm.cuh"
#include "msa/common/lse.cuh"
#include "msa/decode/decode_cache.cuh"
#include "msa/decode/decode_merge.cuh"
#include "msa/decode/decode_trace.h"
#include "msa/decode/decode_traits.cuh"
#include "msa/fwd/fwd_collective.cuh"

namespace msa::decode {

using namespace cute;

template <class Traits>
struct DecodeAttnParams {
  using Element = typename Traits::Element;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  CacheGeometry cache;
  int32_t cache_rows;
  const Element* q;               // [B, S_new, Hq, D]
  int32_t* block_indices;         // [B, S_new, Hkv, topk]: the selection (written by chunk 0's CTA)
  const float* part_score;        // the indexer's lists [B * S_new * Hkv, num_splits, list_cap]
  const int32_t* part_id;
  Element* part_o;                // [B * S_new, Hq, num_chunks, D], normalized
  float2* part_stats;             // [B * S_new, Hq, num_chunks]: (lse, lse), log2 units
  int32_t* row_arrivals;          // [B * S_new * Hkv], zeroed by the indexer
  unsigned long long* trace;      // null, or [CTAs][kDecodeTraceSlots] (see DecodeAttnTraceSlot)
  Element* out;                   // [B, S_new, Hq, D]
  float* lse;                     // [B, Hq, S_new], natural log
  int s_new, num_heads, num_heads_kv, group_size, topk, num_blocks_max;
  int slots_per_cta, num_chunks;
  int cluster_combine;            // 1: the row's chunks are one cluster and merge through DSMEM
  int num_splits, list_cap, block_size, init_blocks, local_blocks;
  float scale_log2;
};

// Barrier of the attention's warpgroup (the merge-only warpgroup has exited by then).
template <class Traits>
__device__ __forceinline__ void attn_sync() {
  cutlass::arch::NamedBarrier::sync(Traits::kNumThreads, 1);
}

// The row's last CTA merges the G heads' chunk partials in three short phases, every partial row
// load issued first: (1) thread p keeps the rows of its (head, 16-byte column chunk) pairs in
// registers while the slots' lse go to shared memory; (2) 8 threads per head reduce its max and
// sum (3 shuffles each) and turn the lse into weights in place; (3) each pair sums weight x row.
// Its serial chains are short: a warp per head (the prefill's combine_slots) spent about 0.8 us
// per head on dependent shuffles and loads, 4 heads in series per warp (2.8 vs 4.4 us at
// 128K x 8).
template <class Traits, class Params>
__device__ __forceinline__ void combine_row_chunks(const Params& params, int64_t token, int group, int b,
                                                   int token_in_req, float* s_w) {
  using Element = typename Traits::Element;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kThreads = Traits::kNumThreads;
  constexpr int kColChunks = kHeadDim / 8;
  constexpr int kPairsPerThread = 16 * kColChunks / kThreads;  // G <= 16
  constexpr int kBatch = 16;                                     // slots per load batch
  constexpr int kMaxStats = 16 * 32 / kThreads;                  // G <= 16, chunks <= topk <= 32
  static_assert(16 * kColChunks % kThreads == 0 && kThreads >= 16 * 8, "thread layout");
  const int G = params.group_size;
  const int nc = params.num_chunks;
  const int64_t pair0 = token * params.num_heads + group * G;
  const float2* stats = params.part_stats + pair0 * nc;
  const uint4* part = reinterpret_cast<const uint4*>(params.part_o + pair0 * nc * kHeadDim);
  const int pairs = G * kColChunks;
  uint4 rows[kPairsPerThread][kBatch];
  auto issue = [&](int s0) {
#pragma unroll
    for (int i = 0; i < kPairsPerThread; ++i) {
      const int pr = threadIdx.x + i * kThreads;
      const uint4* src = part + (pr / kColChunks) * nc * kColChunks + pr % kColChunks;
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        rows[i][j] = pr < pairs && s0 + j < nc ? __ldcg(src + (s0 + j) * kColChunks) : make_uint4(0, 0, 0, 0);
      }
    }
  };
  issue(0);
  float lse_reg[kMaxStats];
#pragma unroll
  for (int k = 0; k < kMaxStats; ++k) {
    const int i = threadIdx.x + k * kThreads;
    lse_reg[k] = i < G * nc ? __ldcg(&stats[i].y) : 0.f;
  }
#pragma unroll
  for (int k = 0; k < kMaxStats; ++k) {
    const int i = threadIdx.x + k * kThreads;
    if (i < G * nc) s_w[i] = lse_reg[k];
  }
  attn_sync<Traits>();
  // (2) Weights: head h = t / 8; its 8 threads take slots t % 8, + 8, ...
  {
    const int h = threadIdx.x / 8;
    const int sub = threadIdx.x % 8;
    float m = -CUDART_INF_F;
    if (h < G) {
      for (int s = sub; s < nc; s += 8) m = fmaxf(m, s_w[h * nc + s]);
    }
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    float e[4];
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int s = sub + 8 * k;
      const float l = h < G && s < nc ? s_w[h * nc + s] : -CUDART_INF_F;
      e[k] = l == -CUDART_INF_F ? 0.f : exp2f(l - m);
      total += e[k];
    }
#pragma unroll
    for (int o = 1; o < 8; o <<= 1) total += __shfl_xor_sync(0xffffffff, total, o);
    const float inv_total = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int s = sub + 8 * k;
      if (h < G && s < nc) s_w[h * nc + s] = e[k] * inv_total;
    }
    if (h < G && sub == 0) {
      params.lse[(static_cast<int64_t>(b) * params.num_heads + group * G + h) * params.s_new + token_in_req] =
          common::natural_lse(m, total);
    }
  }
  attn_sync<Traits>();
  // (3) out = sum of weight x row.
  float acc[kPairsPerThread][8] = {};
  for (int s0 = 0; s0 < nc; s0 += kBatch) {
    if (s0 > 0) issue(s0);
#pragma unroll
    for (int i = 0; i < kPairsPerThread; ++i) {
      const int pr = threadIdx.x + i * kThreads;
      const float* w = s_w + min(pr / kColChunks, G - 1) * nc;
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const float wj = s0 + j < nc ? w[s0 + j] : 0.f;
        const Element* v = reinterpret_cast<const Element*>(&rows[i][j]);
#pragma unroll
        for (int d = 0; d < 8; ++d) acc[i][d] += wj * static_cast<float>(v[d]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPairsPerThread; ++i) {
    const int pr = threadIdx.x + i * kThreads;
    if (pr >= pairs) continue;
    cutlass::Array<Element, 8> res;
#pragma unroll
    for (int d = 0; d < 8; ++d) res[d] = static_cast<Element>(acc[i][d]);
    *reinterpret_cast<cutlass::Array<Element, 8>*>(params.out + (pair0 + pr / kColChunks) * kHeadDim +
                                                   (pr % kColChunks) * 8) = res;
  }
}

// Cluster path: the row's num_chunks CTAs are one thread-block cluster; each left its normalized
// partial (fp32 [G][D]) and lse (log2) in its own shared memory, and the caller has passed a
// cluster barrier. CTA `rank` merges heads rank, rank + num_chunks, ... reading every chunk's rows
// through distributed shared memory: no partial goes to global memory, no arrival count, no
// read-back through L2 (the global path's store, count and combine took ~3 us of the 1M x 2 tail).
// All kCtaThreads threads take part; each owns a (head, 4-column) piece.
template <class Traits, class Params>
__device__ __forceinline__ void combine_cluster_chunks(const Params& params, int64_t token, int group, int b,
                                                       int token_in_req, float* s_o, float* s_lse) {
  using Element = typename Traits::Element;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kPieces = kHeadDim / 4;
  constexpr int kMaxChunks = kMaxClusterChunks;
  static_assert(Traits::kMaxGroup * (kHeadDim + 1) * sizeof(float) <= sizeof(Traits::SharedStorage::k),
                "the cluster merge's partial rows live in the K stages");
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int nc = params.num_chunks;
  const int G = params.group_size;
  const int heads_mine = G > rank ? (G - rank + nc - 1) / nc : 0;
  for (int item = threadIdx.x; item < heads_mine * kPieces; item += Traits::kCtaThreads) {
    const int h = rank + (item / kPieces) * nc;
    const int col = (item % kPieces) * 4;
    float l[kMaxChunks];
    float4 o[kMaxChunks];
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {  // every load in flight before any use
      const int peer = c < nc ? c : 0;
      const float* peer_lse = cluster.map_shared_rank(s_lse, peer);
      const float* peer_o = cluster.map_shared_rank(s_o, peer);
      l[c] = c < nc ? peer_lse[h] : -CUDART_INF_F;
      o[c] = c < nc ? *reinterpret_cast<const float4*>(peer_o + h * kHeadDim + col) : make_float4(0, 0, 0, 0);
    }
    float m = -CUDART_INF_F;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) m = fmaxf(m, l[c]);
    float total = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const float e = l[c] == -CUDART_INF_F ? 0.f : exp2f(l[c] - m);
      total += e;
      acc.x += e * o[c].x;
      acc.y += e * o[c].y;
      acc.z += e * o[c].z;
      acc.w += e * o[c].w;
    }
    const float inv_total = total > 0.f ? 1.f / total : 0.f;
    cutlass::Array<Element, 4> res;
    res[0] = static_cast<Element>(acc.x * inv_total);
    res[1] = static_cast<Element>(acc.y * inv_total);
    res[2] = static_cast<Element>(acc.z * inv_total);
    res[3] = static_cast<Element>(acc.w * inv_total);
    const int64_t pair = token * params.num_heads + group * G + h;
    *reinterpret_cast<cutlass::Array<Element, 4>*>(params.out + pair * kHeadDim + col) = res;
    if (col == 0) {
      params.lse[(static_cast<int64_t>(b) * params.num_heads + group * G + h) * params.s_new + token_in_req] =
          common::natural_lse(m, total);
    }
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kCtaThreads, 1)
    decode_attn_kernel(CUTE_GRID_CONSTANT DecodeAttnParams<Traits> const params) {
#if MSA_SM90_ENABLED
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte pieces of a row

  extern __shared__ char smem_buf[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_buf);

  const int chunk = blockIdx.x;
  const int token_in_req = blockIdx.y / params.num_heads_kv;
  const int group = blockIdx.y % params.num_heads_kv;
  const int b = blockIdx.z;
  const int64_t token = static_cast<int64_t>(b) * params.s_new + token_in_req;
  const int64_t row = token * params.num_heads_kv + group;  // the indexer's packed row
  const int length = params.cache.length(b);
  const int query_pos = length - params.s_new + token_in_req;
  const int G = params.group_size;
  const int lane = threadIdx.x % 32;
  unsigned long long* trace = cta_trace_row(params.trace, threadIdx.x == 0);
  if (trace != nullptr) trace[kAttnTraceStart] = global_timer_ns();

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutVt{});

  // The token's G query rows (contiguous in q) into rows 0..G-1 of the tile, zeros below: q is
  // not written by the kernels before this one, so this runs before waiting for them.
  // All of a thread's loads are issued before any store (one memory round trip, not one per piece).
  const Element* q_rows = params.q + (token * params.num_heads + group * G) * kHeadDim;
  constexpr int kPiecesPerThread = kBlockM * kChunksPerRow / Traits::kNumThreads;
  static_assert(kBlockM * kChunksPerRow % Traits::kNumThreads == 0, "whole pieces per thread");
  if (threadIdx.x < Traits::kNumThreads) {
    uint4 q_piece[kPiecesPerThread];
#pragma unroll
    for (int i = 0; i < kPiecesPerThread; ++i) {
      const int idx = threadIdx.x + i * Traits::kNumThreads;
      const int r = idx / kChunksPerRow;
      q_piece[i] = make_uint4(0, 0, 0, 0);
      if (r < G) q_piece[i] = *reinterpret_cast<const uint4*>(q_rows + r * kHeadDim + (idx % kChunksPerRow) * 8);
    }
#pragma unroll
    for (int i = 0; i < kPiecesPerThread; ++i) {
      const int idx = threadIdx.x + i * Traits::kNumThreads;
      *reinterpret_cast<uint4*>(&sQ(idx / kChunksPerRow, (idx % kChunksPerRow) * 8)) = q_piece[i];
    }
  }
  cutlass::arch::fence_view_async_shared();  // generic-proxy writes -> WGMMA reads
  if (threadIdx.x == 0) {
#pragma unroll
    for (int st = 0; st < Traits::kStages; ++st) {
      smem.barrier_k[st].init(1);
      smem.barrier_v[st].init(1);
    }
    cutlass::arch::fence_barrier_init();
  }

  if (threadIdx.x == 0) {  // fetched while the kernels before this one run
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
  }
  // Launched early (programmatic dependent launch): the indexer's lists are complete past this
  // point. Both warpgroups merge them into the row's selection; then the second one leaves.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  if (trace != nullptr) trace[kAttnTraceWaited] = global_timer_ns();
  const int64_t list0 = row * params.num_splits * params.list_cap;  // the row's first list entry
  merge_row_selection<Traits::kCtaThreads>(params.part_score + list0, params.part_id + list0, params.num_splits,
                                           params.list_cap, query_pos, params.block_size, params.topk,
                                           params.init_blocks, params.local_blocks,
                                           reinterpret_cast<char*>(smem.k.data()), smem.merge, smem.selection);
  if (trace != nullptr) trace[kAttnTraceSelected] = global_timer_ns();
  // Cluster path: the chunk's partial stays in this CTA's shared memory (the K stages, free once
  // every block is consumed): normalized O in fp32 [G][D], then its lse (log2 units).
  float* s_o = reinterpret_cast<float*>(smem.k.data());
  float* s_lse = s_o + Traits::kMaxGroup * kHeadDim;
  // Release this CTA's partial to the cluster and acquire the others'; merge; then wait until
  // every peer has read this CTA's shared memory before leaving. Both warpgroups take part.
  auto merge_in_cluster = [&] {
    cute::cluster_arrive();
    cute::cluster_wait();
    combine_cluster_chunks<Traits>(params, token, group, b, token_in_req, s_o, s_lse);
    cute::cluster_arrive_relaxed();
    cute::cluster_wait();
  };
  if (threadIdx.x >= Traits::kNumThreads) {  // the second warpgroup leaves or waits to merge
    if (params.cluster_combine) merge_in_cluster();
    return;
  }
  if (chunk == 0 && threadIdx.x < params.topk) {  // the step's block_indices output
    params.block_indices[row * params.topk + threadIdx.x] = smem.selection[threadIdx.x];
  }
  if (threadIdx.x == 0) {
    // The chunk's blocks the slot combine below will count: ids naming a block of the cache.
    const int slot_end = min(params.topk, (chunk + 1) * params.slots_per_cta);
    int n = 0;
    for (int s = chunk * params.slots_per_cta; s < slot_end; ++s) {
      const int blk = smem.selection[s];
      if (blk >= 0 && blk < params.num_blocks_max) smem.blocks[n++] = blk;
    }
    smem.num_blocks = n;
  }
  attn_sync<Traits>();
  const int num_blocks = smem.num_blocks;

  Tensor mK = params.tma_k.get_tma_tensor(make_shape(params.cache_rows, Int<kHeadDim>{}, params.num_heads_kv));
  Tensor mV = params.tma_v.get_tma_tensor(make_shape(params.cache_rows, Int<kHeadDim>{}, params.num_heads_kv));
  auto issue = [&](int n) {  // block n of the chunk into stage n % kStages; thread 0 only
    const int st = n % Traits::kStages;
    const int key_row = static_cast<int>(params.cache.row(b, smem.blocks[n] * kBlockN));
    smem.barrier_k[st].arrive_and_expect_tx(Traits::kTmaBytesBlock);
    fwd::load_block<Traits>(params.tma_k, mK, sK, reinterpret_cast<uint64_t*>(&smem.barrier_k[st]), st, key_row, group);
    smem.barrier_v[st].arrive_and_expect_tx(Traits::kTmaBytesBlock);
    fwd::load_block<Traits>(params.tma_v, mV, sV, reinterpret_cast<uint64_t*>(&smem.barrier_v[st]), st, key_row, group);
  };
  if (threadIdx.x == 0) {
    for (int n = 0; n < min(num_blocks, Traits::kStages); ++n) issue(n);
  }

  typename Traits::TiledMmaQK tiled_mma_qk;
  typename Traits::TiledMmaPV tiled_mma_pv;
  auto thr_mma_qk = tiled_mma_qk.get_thread_slice(threadIdx.x);
  auto thr_mma_pv = tiled_mma_pv.get_thread_slice(threadIdx.x);
  Tensor tSrQ = thr_mma_qk.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma_qk.partition_fragment_B(sK);
  Tensor tOrVt = thr_mma_pv.partition_fragment_B(sVt);
  Tensor tSrS = partition_fragment_C(tiled_mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tOrO = partition_fragment_C(tiled_mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  // P as the A operand of O = P V: value 8s + v of S is value v of k-slice s.
  Tensor tOrP = make_tensor<Element>(common::AccumulatorAsOperandA<kBlockN>{});
  const int quad = lane % 4;

  // Online softmax state per row (log2 units of the scaled scores).
  float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F}, row_sum[2] = {0.f, 0.f};
  clear(tOrO);
  for (int n = 0; n < num_blocks; ++n) {
    const int st = n % Traits::kStages;
    const uint32_t phase = (n / Traits::kStages) & 1;
    const int block_start = smem.blocks[n] * kBlockN;
    smem.barrier_k[st].wait(phase);
    if (trace != nullptr && n == 0) trace[kAttnTraceFirstBlock] = global_timer_ns();
    common::warpgroup_gemm</*kZeroInit=*/true>(tiled_mma_qk, tSrQ, tSrK(_, _, _, st), tSrS);
    const int cols[2] = {query_pos - block_start, query_pos - block_start};  // visible: [0, cols]
    fwd::mask_block_columns<kBlockN>(tSrS, cols, quad);
    fwd::online_softmax_block<kBlockN>(tSrS, tOrO, row_max, row_sum, params.scale_log2);
#pragma unroll
    for (int v = 0; v < size(tSrS); ++v) tOrP(v) = static_cast<Element>(tSrS(v));
    warpgroup_fence_operand(tOrP);

    smem.barrier_v[st].wait(phase);
    const int valid_rows = min(kBlockN, length - block_start);  // rows holding written tokens
    if (valid_rows < kBlockN) {
      // Zero the V rows past the request's end: row r is the 128-byte line r of each 64-column
      // half (the 128-byte swizzle permutes chunks within a line only).
      constexpr int kHalves = kHeadDim / 64;
      char* v_bytes = reinterpret_cast<char*>(&sV(0, 0, st));
      for (int idx = threadIdx.x; idx < kBlockN * kHalves * 8; idx += Traits::kNumThreads) {
        const int r = idx / (kHalves * 8);
        const int rest = idx % (kHalves * 8);
        if (r >= valid_rows) {
          *reinterpret_cast<uint4*>(v_bytes + (rest / 8) * (kBlockN * 128) + r * 128 + (rest % 8) * 16) =
              make_uint4(0, 0, 0, 0);
        }
      }
      cutlass::arch::fence_view_async_shared();
      attn_sync<Traits>();
    }
    common::warpgroup_gemm</*kZeroInit=*/false>(tiled_mma_pv, tOrP, tOrVt(_, _, _, st), tOrO);
    // Every thread is done with this stage: refill it.
    attn_sync<Traits>();
    if (threadIdx.x == 0 && n + Traits::kStages < num_blocks) issue(n + Traits::kStages);
  }

  if (trace != nullptr) {
    trace[kAttnTraceLoopEnd] = global_timer_ns();
    trace[kAttnTraceSm] = sm_id();
    trace[kAttnTraceBlocks] = static_cast<unsigned long long>(num_blocks);
  }
  // The chunk's partial (an empty chunk writes O = 0, lse = -inf).
  const int row_base = (threadIdx.x / 32) * 16 + lane / 4;  // rows row_base, row_base + 8
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row_base + 8 * i;
    if (r >= G) continue;
    const int64_t pair = token * params.num_heads + group * G + r;
    const float scale = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
    const float lse2 = row_sum[i] > 0.f ? row_max[i] + __log2f(row_sum[i]) : -CUDART_INF_F;
    if (params.cluster_combine) {
#pragma unroll
      for (int j = 0; j < kHeadDim / 8; ++j) {
        *reinterpret_cast<float2*>(s_o + r * kHeadDim + 8 * j + 2 * quad) =
            make_float2(tOrO(4 * j + 2 * i) * scale, tOrO(4 * j + 2 * i + 1) * scale);
      }
      if (quad == 0) s_lse[r] = lse2;
      continue;
    }
    uint32_t* dst = reinterpret_cast<uint32_t*>(params.part_o + (pair * params.num_chunks + chunk) * kHeadDim);
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
      dst[4 * j + quad] = fwd::pack_pair<Element>(tOrO(4 * j + 2 * i) * scale, tOrO(4 * j + 2 * i + 1) * scale);
    }
    if (quad == 0) params.part_stats[pair * params.num_chunks + chunk] = make_float2(lse2, lse2);
  }
  if (params.cluster_combine) {
    merge_in_cluster();
    if (trace != nullptr) trace[kAttnTraceDone] = global_timer_ns();
    return;
  }
  // Every CTA of the row counts itself in; the last merges the row's chunks. The count is an
  // acq_rel atomic after the CTA barrier: its release publishes the whole CTA's partial (the
  // barrier orders the other threads' stores before it), its acquire in the last CTA makes the
  // others' partials visible to the reads below (no membar.gl by every thread, ~0.5 us each).
  attn_sync<Traits>();
  if (threadIdx.x == 0) {
    int arrived;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;"
                 : "=r"(arrived)
                 : "l"(params.row_arrivals + row)
                 : "memory");
    smem.is_last = arrived == params.num_chunks - 1;
  }
  attn_sync<Traits>();
  if (!smem.is_last) {
    if (trace != nullptr) trace[kAttnTraceDone] = global_timer_ns();
    return;
  }
  // The K stages are free (every block was consumed): the weights' scratch.
  combine_row_chunks<Traits>(params, token, group, b, token_in_req, reinterpret_cast<float*>(smem.k.data()));
  if (trace != nullptr) trace[kAttnTraceDone] = global_timer_ns();
#endif
}

}  // namespace msa::decode
