// Consumer steps shared by the two distillation-loss kernels (kl_kernel.cuh: the selected support,
// kl_dense_kernel.cuh: the dense warm-up). Both hold a 64-token x kBlockN tile per warpgroup in
// the WGMMA accumulator layout: value v is row (v / 2) % 2 of the thread's two rows and key
// 8 (v / 4) + 2 quad + v % 2; a key is visible to row i when key <= last_key[i].
#pragma once

#include <cute/tensor.hpp>

namespace msa::kl {

using namespace cute;

__device__ __forceinline__ int accumulator_key(int v, int quad) { return 8 * (v / 4) + 2 * quad + (v % 2); }

// Teacher: head h's probabilities 2^(S scale - lse) added into P (h = 0 starts P). full_block:
// every row of the warp sees every key, so no per-element mask.
template <class TensorS, class TensorP>
__device__ __forceinline__ void accumulate_teacher_head(TensorS const& tSrS, TensorP& tSrP, int h, bool full_block,
                                                        const int (&last_key)[2], const float (&lse)[2],
                                                        float scale_log2, int quad) {
  if (full_block) {
#pragma unroll
    for (int v = 0; v < size(tSrS); ++v) {
      const float p = exp2f(tSrS(v) * scale_log2 - lse[(v / 2) % 2]);
      tSrP(v) = h == 0 ? p : tSrP(v) + p;
    }
  } else {
#pragma unroll
    for (int v = 0; v < size(tSrS); ++v) {
      const int i = (v / 2) % 2;
      const float p = accumulator_key(v, quad) <= last_key[i] ? exp2f(tSrS(v) * scale_log2 - lse[i]) : 0.f;
      tSrP(v) = h == 0 ? p : tSrP(v) + p;
    }
  }
}

// Student: from its scores s (tIrS) and the teacher's summed P, the loss terms P (log2 P - log2 Q)
// into loss_acc and dS = Q - P (0 where masked) into tDQrdS, log2 Q = s index_scale log2(e) - Z.
// Branch-free (selects): a per-element branch here issued more than the math. P = 0 (masked, or
// underflow) contributes no loss term.
template <class TensorS, class TensorP, class TensorDS>
__device__ __forceinline__ void student_terms(TensorS const& tIrS, TensorP const& tSrP, TensorDS& tDQrdS,
                                              bool full_block, const int (&last_key)[2], const float (&row_logz)[2],
                                              float inv_group, float index_scale_log2, int quad, float& loss_acc) {
  using Element = typename TensorDS::value_type;
  auto terms = [&](auto is_full) {
#pragma unroll
    for (int v = 0; v < size(tIrS); ++v) {
      const int i = (v / 2) % 2;
      const float p = tSrP(v) * inv_group;
      const float s2 = tIrS(v) * index_scale_log2 - row_logz[i];  // log2 Q
      bool visible = true;
      if constexpr (!decltype(is_full)::value) visible = accumulator_key(v, quad) <= last_key[i];
      const float term = p * (__log2f(p) - s2);
      loss_acc += visible && p > 0.f ? term : 0.f;
      tDQrdS(v) = static_cast<Element>(visible ? exp2f(s2) - p : 0.f);
    }
  };
  if (full_block) {
    terms(cute::true_type{});
  } else {
    terms(cute::false_type{});
  }
}

// This thread's two accumulator rows (kCols columns each, values 4 j + 2 i + c) times scale, added
// into the fp32 rows row_ptr(i) + 8 j + c by float2 atomics, for the rows with valid(i).
template <int kCols, class TensorAcc, class Valid, class RowPtr>
__device__ __forceinline__ void atomic_add_rows(TensorAcc const& acc, float scale, Valid&& valid, RowPtr&& row_ptr) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (valid(i)) {
      float* dst = row_ptr(i);
#pragma unroll
      for (int j = 0; j < kCols / 8; ++j) {
        atomicAdd(reinterpret_cast<float2*>(dst + 8 * j),
                  make_float2(acc(4 * j + 2 * i) * scale, acc(4 * j + 2 * i + 1) * scale));
      }
    }
  }
}

// The loss: one double atomic per warp (natural log).
__device__ __forceinline__ void add_warp_loss(float loss_acc, double* loss_sum, int lane) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) loss_acc += __shfl_xor_sync(0xffffffff, loss_acc, offset);
  if (lane == 0 && loss_acc != 0.f) atomicAdd(loss_sum, static_cast<double>(loss_acc) * 0.6931471805599453);
}

}  // namespace msa::kl
