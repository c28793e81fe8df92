// Pieces both forward kernels (KV-outer fwd_kernel, query-outer fwd_query_tile_kernel) are built
// from: copies into the query tile, the K/V block load, the softmax pieces on the S accumulator,
// and the epilogue that stages 64 output rows per warpgroup in shared memory for 16-byte stores.
//
// Accumulator layout (WGMMA m64nN, per thread): rows row_base = 16 warp + lane / 4 and
// row_base + 8 of the warpgroup's 64; value 4 j + 2 i + c is row row_base + 8 i, column
// 8 j + 2 (lane % 4) + c.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/array.h>

#include <math_constants.h>

#include <cstdint>
#include <utility>

#include "msa/common/arch.cuh"

namespace msa::fwd {

using namespace cute;

__device__ __forceinline__ void cp_async_16(uint32_t smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_dst), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem_src));
}

// Packs two fp32 values into one 32-bit register of two Elements (low half = first).
template <class Element>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  cutlass::Array<Element, 2> pair;
  pair[0] = static_cast<Element>(lo);
  pair[1] = static_cast<Element>(hi);
  return reinterpret_cast<uint32_t const&>(pair);
}

// Four 8x8 16-bit matrices from registers to shared memory; lane l gives the row address of row
// l % 8 of matrix l / 8. The WGMMA accumulator layout (row lane / 4, columns 2 (lane % 4) + {0, 1}
// of each 8-column slice) is exactly the stmatrix fragment layout.
__device__ __forceinline__ void stmatrix_x4(uint32_t smem_addr, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3) {
  asm volatile("stmatrix.sync.aligned.x4.m8n8.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_addr), "r"(a0),
               "r"(a1), "r"(a2), "r"(a3));
}

// The query ring of an attention kernel (cutlass::PipelineAsync): the producer warpgroup fills a
// stage (`producer_arrivals` arrivals complete it), every consumer thread releases it.
template <class Pipeline>
__device__ __forceinline__ Pipeline make_query_ring(typename Pipeline::SharedStorage& storage, int warp_group,
                                                    int producer_arrivals, int consumer_threads) {
  typename Pipeline::Params params;
  params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  params.producer_arv_count = producer_arrivals;
  params.consumer_arv_count = consumer_threads;
  return Pipeline(storage, params);
}

// The K/V ring (cutlass::PipelineTmaAsync): thread 0 expects `bytes` of TMA per stage.
template <class Pipeline>
__device__ __forceinline__ Pipeline make_kv_ring(typename Pipeline::SharedStorage& storage, int warp_group,
                                                 uint32_t bytes, int consumer_threads) {
  typename Pipeline::Params params;
  params.transaction_bytes = bytes;
  params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  params.is_leader = threadIdx.x == 0;
  params.num_consumers = consumer_threads;
  params.num_producers = 1;
  return Pipeline(storage, params, Shape<_1, _1, _1>{});
}

// One key block of K or V (rows key_row .. key_row + kBlockN of kv head `group`) into stage
// `stage` of sX by TMA, counted on `barrier`. Called by one thread.
template <class Traits, class TensorMX, class TensorSX>
__device__ __forceinline__ void load_block(typename Traits::TmaKV const& tma, TensorMX const& mX, TensorSX& sX,
                                           uint64_t* barrier, int stage, int key_row, int group) {
  Tensor gX = local_tile(domain_offset(make_coord(key_row, _0{}), mX(_, _, group)),
                         Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>{}, make_coord(_0{}, _0{}));
  auto [tXgX, tXsX] = tma_partition(tma, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sX), group_modes<0, 2>(gX));
  copy(tma.with(*barrier, 0), tXgX, tXsX(_, stage));
}

// K and V of one key block into K/V stage `stage`, both counted on `barrier`.
template <class Traits, class TensorMK, class TensorSK>
__device__ __forceinline__ void load_kv_block(typename Traits::TmaKV const& tma_k, typename Traits::TmaKV const& tma_v,
                                              TensorMK const& mK, TensorMK const& mV, TensorSK& sK, TensorSK& sV,
                                              uint64_t* barrier, int stage, int key_row, int group) {
  load_block<Traits>(tma_k, mK, sK, barrier, stage, key_row, group);
  load_block<Traits>(tma_v, mV, sV, barrier, stage, key_row, group);
}

// Masks the keys of a block a row may not see: column c of row i stays when c <= last_col[i]
// (last_col < 0 masks the whole row). Warp-uniform skip when no row of the warp needs it.
template <int kBlockN, class TensorS>
__device__ __forceinline__ void mask_block_columns(TensorS& tSrS, const int (&last_col)[2], int quad) {
  if (__any_sync(0xffffffff, min(last_col[0], last_col[1]) < kBlockN - 1)) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float& s = tSrS(4 * j + 2 * i + c);
          s = 8 * j + 2 * quad + c <= last_col[i] ? s : -CUDART_INF_F;
        }
      }
    }
  }
}

// Max of accumulator row i over the block (raw scores), over 4 independent chains (two consumer
// warps per scheduler leave little to hide a 32-deep dependent chain behind), then the quad.
template <int kBlockN, class TensorS>
__device__ __forceinline__ float block_row_max(TensorS const& tSrS, int i) {
  float mp[4] = {-CUDART_INF_F, -CUDART_INF_F, -CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      mp[(2 * j + c) % 4] = fmaxf(mp[(2 * j + c) % 4], tSrS(4 * j + 2 * i + c));
    }
  }
  float m = fmaxf(fmaxf(mp[0], mp[1]), fmaxf(mp[2], mp[3]));
  m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
  return fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
}

// S -> P = 2^(S * scale_log2 - max_scaled) in place for row i; returns the row's sum of P.
template <int kBlockN, class TensorS>
__device__ __forceinline__ float exp2_row_sum(TensorS& tSrS, int i, float scale_log2, float max_scaled) {
  float lp[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float& s = tSrS(4 * j + 2 * i + c);
      s = exp2f(s * scale_log2 - max_scaled);
      lp[(2 * j + c) % 4] += s;
    }
  }
  float l = (lp[0] + lp[1]) + (lp[2] + lp[3]);
  l += __shfl_xor_sync(0xffffffff, l, 1);
  return l + __shfl_xor_sync(0xffffffff, l, 2);
}

// One key block of an online softmax over rows held as (row_max, row_sum) in log2 units of the
// scaled scores: updates both rows of the thread, turns S into P = exp2(S * scale_log2 - max) in
// place and returns in alpha the factor exp2(old max - new max) earlier sums are rescaled by. A
// row with no visible key so far keeps max = -inf and gets P = 0.
template <int kBlockN, class TensorS>
__device__ __forceinline__ void online_softmax_rows(TensorS& tSrS, float (&row_max)[2], float (&row_sum)[2],
                                                    float scale_log2, float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float m = block_row_max<kBlockN>(tSrS, i);
    const float new_max = m == -CUDART_INF_F ? row_max[i] : fmaxf(row_max[i], m * scale_log2);
    const float base = new_max == -CUDART_INF_F ? 0.f : new_max;  // no visible key yet: P = 0
    alpha[i] = exp2f(row_max[i] - base);
    row_sum[i] = row_sum[i] * alpha[i] + exp2_row_sum<kBlockN>(tSrS, i, scale_log2, base);
    row_max[i] = new_max;
  }
}

// online_softmax_rows, and O rescaled by alpha.
template <int kBlockN, class TensorS, class TensorO>
__device__ __forceinline__ void online_softmax_block(TensorS& tSrS, TensorO& tOrO, float (&row_max)[2],
                                                     float (&row_sum)[2], float scale_log2) {
  float alpha[2];
  online_softmax_rows<kBlockN>(tSrS, row_max, row_sum, scale_log2, alpha);
#pragma unroll
  for (int v = 0; v < size(tOrO); ++v) tOrO(v) *= alpha[(v / 2) % 2];
}

// Epilogue, step 1: a warpgroup's 64 rows of an accumulator-ordered fragment into its own rows of
// a 128-row tile at tile_base (shared address) in the query tile's SW128 layout (conflict free for
// the stmatrix writes and the 16-byte row reads): 16-byte chunk c of row r sits in 64-column half
// c / 8, at r * 128 + ((c % 8) ^ (r % 8)) * 16, halves 128 rows apart. pair(v) gives values v and
// v + 1 (v even) packed in one register. Per thread only one base address is live: the XOR
// touches address bits 4-6 only, the row and stage parts never do.
template <int kCols, class PairFn>
__device__ __forceinline__ void stage_rows_stmatrix(PairFn&& pair, uint32_t tile_base, int mma_wg, int warp_in_wg,
                                                    int lane) {
  constexpr int kHalfBytes = 128 * 128;  // one 64-column half of a 128-row tile
  // Matrix m of each x4 store: rows 16 warp + 8 (m % 2) + (lane % 8), 16-byte chunk j + m / 2
  // (two 8-column slices per store); for even j, ((j % 8) | m/2) ^ (row % 8) = (j % 8) ^ (m/2 ^ row % 8).
  const int m = lane / 8;
  const int st_row = mma_wg * 64 + warp_in_wg * 16 + 8 * (m % 2) + lane % 8;
  const uint32_t st_base = tile_base + st_row * 128 + (((m / 2) ^ (st_row % 8)) * 16);
#pragma unroll
  for (int j = 0; j < kCols / 8; j += 2) {
    stmatrix_x4((st_base ^ ((j % 8) * 16)) + (j / 8) * kHalfBytes, pair(4 * j), pair(4 * j + 2), pair(4 * j + 4),
                pair(4 * j + 6));
  }
}

// A warpgroup's 64 rows of a 16-bit fragment in the accumulator's register order (dS in the
// backward and the distillation loss), staged as above.
template <int kCols, class TensorFrag>
__device__ __forceinline__ void stage_fragment_rows(TensorFrag const& frag, uint32_t tile_base, int mma_wg,
                                                    int warp_in_wg, int lane) {
  using Element = typename TensorFrag::value_type;
  static_assert(sizeof(Element) == 2, "a 16-bit fragment");
  stage_rows_stmatrix<kCols>(
      [&](int v) {
        cutlass::Array<Element, 2> pair;
        pair[0] = frag(v);
        pair[1] = frag(v + 1);
        return reinterpret_cast<uint32_t const&>(pair);
      },
      tile_base, mma_wg, warp_in_wg, lane);
}

// The output rows O (fp32) times out_scale per row, staged as above.
template <class Traits, class TensorO>
__device__ __forceinline__ void stage_output_rows(TensorO const& tOrO, const float (&out_scale)[2], uint32_t stage_base,
                                                  int mma_wg, int warp_in_wg, int lane) {
  using Element = typename Traits::Element;
  static_assert(Traits::kBlockM == 128 && Traits::kRowsPerWarpGroup == 64);
  // Value v is row (v / 2) % 2 of the thread's two rows.
  stage_rows_stmatrix<Traits::kHeadDim>(
      [&](int v) {
        const float scale = out_scale[(v / 2) % 2];
        return pack_pair<Element>(tOrO(v) * scale, tOrO(v + 1) * scale);
      },
      stage_base, mma_wg, warp_in_wg, lane);
}

// Epilogue, step 2 (after the warpgroup's barrier): the staged rows out with 16-byte stores.
// Thread t copies chunk t % C of rows t / C + k * (128 / C) (rows 8 apart keep the XOR pattern);
// row_dst(row in warpgroup) gives the row's destination in global memory, or null to skip it.
template <class Traits, class RowDst>
__device__ __forceinline__ void store_staged_rows(uint32_t stage_base, int mma_wg, int wg_thread, RowDst&& row_dst) {
  using Element = typename Traits::Element;
  constexpr int kHalfBytes = Traits::kBlockM * 128;
  constexpr int kChunksPerRow = Traits::kHeadDim / 8;
  constexpr int kReadRowStep = common::kThreadsPerWarpGroup / kChunksPerRow;
  static_assert(kReadRowStep % 8 == 0);
  const int rd_row = wg_thread / kChunksPerRow;
  const int chunk = wg_thread % kChunksPerRow;
  const int rd_row_abs = mma_wg * Traits::kRowsPerWarpGroup + rd_row;
  const uint32_t rd_base =
      stage_base + (chunk / 8) * kHalfBytes + rd_row_abs * 128 + (((chunk % 8) ^ (rd_row_abs % 8)) * 16);
#pragma unroll
  for (int k = 0; k < Traits::kRowsPerWarpGroup / kReadRowStep; ++k) {
    Element* dst = row_dst(rd_row + k * kReadRowStep);
    if (dst != nullptr) {
      uint4 v;
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                   : "r"(rd_base + k * kReadRowStep * 128));
      *reinterpret_cast<uint4*>(dst + chunk * 8) = v;
    }
  }
}

// 16 bytes to global memory, evict-first in L2 (st.global.cs): the forward's partials are read
// back only by the combine, after the whole chunk, so they should not push the query rows, which
// later tiles gather again, out of L2.
__device__ __forceinline__ void store_16_streaming(void* dst, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

// Epilogue without shared memory: a thread's two accumulator rows of O (fp32) times out_scale per
// row, straight to global memory (row_dst[i]: the row's first element, null to skip) in 16-byte
// evict-first stores. A quad holds the 8 columns of each 8-column slice j, two per lane; for each
// group of four slices, a 4x4 transpose of those 32-bit pairs within the quad (two xor-shuffle
// rounds, each swapping one bit of the lane index with the same bit of the slot index) leaves
// lane q holding all of slice 4 g + q. A warp's store then covers 64 contiguous bytes of 8 rows.
template <class Element, int kCols, class TensorO>
__device__ __forceinline__ void store_output_rows_direct(TensorO const& tOrO, const float (&out_scale)[2],
                                                         Element* const (&row_dst)[2], int quad) {
  static_assert(kCols % 32 == 0);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int g = 0; g < kCols / 32; ++g) {
      uint32_t r[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int v = 4 * (4 * g + k) + 2 * i;  // value of row i, columns 8 (4 g + k) + 2 quad + {0, 1}
        r[k] = pack_pair<Element>(tOrO(v) * out_scale[i], tOrO(v + 1) * out_scale[i]);
      }
#pragma unroll
      for (int bit = 1; bit <= 2; bit <<= 1) {
        const bool upper = quad & bit;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (k & bit) continue;
          // Slots k and k + bit: the lower lane keeps slot k and receives the partner's slot k
          // into k + bit; the upper lane keeps k + bit and receives into k.
          const uint32_t sent = upper ? r[k] : r[k + bit];
          const uint32_t got = __shfl_xor_sync(0xffffffff, sent, bit);
          if (upper) r[k] = got; else r[k + bit] = got;
        }
      }
      if (row_dst[i] != nullptr) store_16_streaming(row_dst[i] + (4 * g + quad) * 8, r[0], r[1], r[2], r[3]);
    }
  }
}

// Host: TMA copies of K and V ([total_k, Hkv, D] as (token, d, head)) into Traits' K/V tiles.
template <class Traits, class P>
std::pair<typename Traits::TmaKV, typename Traits::TmaKV> make_kv_tmas(const P& p) {
  using Element = typename Traits::Element;
  constexpr int kHeadDim = Traits::kHeadDim;
  const int32_t total_k = static_cast<int32_t>(p.total_k);
  const auto kv_stride = make_stride(static_cast<int64_t>(p.num_heads_kv) * kHeadDim, _1{}, Int<kHeadDim>{});
  auto gK = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.k)),
                        make_shape(total_k, Int<kHeadDim>{}, p.num_heads_kv), kv_stride);
  auto gV = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.v)),
                        make_shape(total_k, Int<kHeadDim>{}, p.num_heads_kv), kv_stride);
  auto smem_tile = take<0, 2>(typename Traits::SmemLayoutKV{});
  return {make_tma_copy(SM90_TMA_LOAD{}, gK, smem_tile), make_tma_copy(SM90_TMA_LOAD{}, gV, smem_tile)};
}

}  // namespace msa::fwd
