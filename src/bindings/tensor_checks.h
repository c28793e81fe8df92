// Checks shared by the op bindings. The Python layer validates every argument first and raises
// ValueError/TypeError; these are the last line of defence before a launch, so a direct call of
// torch.ops.msa_cuda_kernels.* with bad tensors raises instead of faulting on the device.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>

#include "msa/params.h"

namespace msa::bindings {

inline DType dtype_of(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kBFloat16) return DType::kBF16;
  if (t.scalar_type() == at::kHalf) return DType::kFP16;
  TORCH_CHECK_TYPE(false, name, " must be bfloat16 or float16, got ", t.scalar_type());
}

inline void check_cuda_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_same_device_as(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.get_device() == q.get_device(), name, " must be on q's device");
}

inline void check_aligned_16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

inline void check_cu_seqlens(const c10::optional<at::Tensor>& t, const char* name, int64_t batch,
                             const at::Tensor& like) {
  if (!t.has_value()) return;
  check_cuda_contiguous(*t, name);
  TORCH_CHECK(t->get_device() == like.get_device(), name, " must be on the same device as the inputs");
  TORCH_CHECK_TYPE(t->scalar_type() == at::kInt, name, " must be int32");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == batch + 1, name, " must have shape [batch + 1]");
}

// SM90 kernels only: refuse any other device before launching (the caller falls back to the
// reference; a wrong-arch launch would trap).
inline void check_sm90(const at::Tensor& t) {
  int major = 0, minor = 0;
  const int device = t.get_device();
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  TORCH_CHECK(major == 9 && minor == 0, "msa_cuda kernels need an SM90 GPU (H100/H200/H800); device ", device,
              " is sm_", major, minor);
}

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// Sizes of an attention call (forward, backward, KL) after check_attn_inputs.
struct AttnShape {
  bool varlen = false;
  int64_t batch = 0, total_q = 0, total_k = 0;
  int64_t hq = 0, hkv = 0, d = 0, topk = 0;
  int seqlen_q = 0, seqlen_k = 0;  // padded batches; 0 for varlen
  int max_seqlen_k = 0;
};

// The checks every attention-shaped op shares: q [B, Sq, Hq, D] / [Tq, Hq, D]; k (and v when
// given) [B, Sk, Hkv, D] / [Tk, Hkv, D]; block_indices [B, Sq, Hkv, topk] / [Tq, Hkv, topk] int32;
// cu_seqlens; supported D, G, topk and block_size; 16-byte alignment; 32-bit index ranges of the
// plan. Value checks of cu_seqlens and max_seqlen_k are the Python layer's (host reads).
// block_indices may be null (the dense KL variant: no selection); topk is then 1.
inline AttnShape check_attn_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                                   const at::Tensor* block_indices_or_null,
                                   const c10::optional<at::Tensor>& cu_seqlens_q,
                                   const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_k,
                                   int64_t block_size) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}}) {
    check_cuda_contiguous(*t, name);
    check_same_device_as(*t, name, q);
  }
  dtype_of(q, "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k must have q's dtype");
  AttnShape s;
  s.varlen = cu_seqlens_q.has_value();
  TORCH_CHECK(s.varlen == cu_seqlens_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  const int rank = s.varlen ? 3 : 4;
  TORCH_CHECK(q.dim() == rank && k.dim() == rank, "q and k must both be ", rank, "-D");
  s.d = q.size(-1);
  s.hq = q.size(-2);
  s.hkv = k.size(-2);
  s.topk = 1;
  if (block_indices_or_null != nullptr) {
    const at::Tensor& block_indices = *block_indices_or_null;
    check_cuda_contiguous(block_indices, "block_indices");
    check_same_device_as(block_indices, "block_indices", q);
    TORCH_CHECK_TYPE(block_indices.scalar_type() == at::kInt, "block_indices must be int32");
    TORCH_CHECK(block_indices.dim() == rank, "block_indices must be ", rank, "-D like q and k");
    TORCH_CHECK(block_indices.size(0) == q.size(0) && (s.varlen || block_indices.size(1) == q.size(1)),
                "block_indices must have q's batch and Sq (varlen: q's token count)");
    s.topk = block_indices.size(-1);
    TORCH_CHECK(block_indices.size(-2) == s.hkv && s.topk >= 1 && s.topk <= 32,
                "block_indices must be [..., Hkv, topk<=32]");
  }
  TORCH_CHECK(s.d == 64 || s.d == 128, "head dim must be 64 or 128, got ", s.d);
  TORCH_CHECK(k.size(-1) == s.d, "k must have q's head dim");
  if (v != nullptr) {
    check_cuda_contiguous(*v, "v");
    check_same_device_as(*v, "v", q);
    TORCH_CHECK_TYPE(v->scalar_type() == q.scalar_type(), "v must have q's dtype");
    TORCH_CHECK(v->sizes() == k.sizes(), "k and v must have the same shape");
  }
  TORCH_CHECK(s.hkv > 0 && s.hq % s.hkv == 0, "Hq must be a multiple of Hkv");
  const int64_t g = s.hq / s.hkv;
  TORCH_CHECK(g == 1 || g == 2 || g == 4 || g == 8 || g == 16, "G = Hq / Hkv must be 1, 2, 4, 8 or 16");
  TORCH_CHECK(block_size == 64 || block_size == 128, "block_size must be 64 or 128");
  s.total_q = q.numel() / (s.hq * s.d);
  s.total_k = k.numel() / (s.hkv * s.d);
  TORCH_CHECK(s.total_q < (int64_t{1} << 31) && s.total_k < (int64_t{1} << 31), "token counts must stay below 2^31");
  TORCH_CHECK(s.total_q * s.hq < (int64_t{1} << 31),
              "total query tokens x Hq must stay below 2^31 (32-bit q row index)");
  check_aligned_16(q, "q");
  check_aligned_16(k, "k");
  if (v != nullptr) check_aligned_16(*v, "v");
  s.batch = s.varlen ? cu_seqlens_q->size(0) - 1 : q.size(0);
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", s.batch, q);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", s.batch, q);
  if (!s.varlen) {
    TORCH_CHECK(k.size(0) == s.batch, "batch must agree between q and k");
    TORCH_CHECK(q.size(1) <= k.size(1), "Sq must not exceed Sk");
    s.seqlen_q = static_cast<int>(q.size(1));
    s.seqlen_k = static_cast<int>(k.size(1));
    s.max_seqlen_k = s.seqlen_k;
  }
  if (s.total_q > 0 && s.batch > 0) {  // an empty call launches nothing
    if (s.varlen) {
      TORCH_CHECK(max_seqlen_k >= 1 && max_seqlen_k < (int64_t{1} << 30), "max_seqlen_k must be in [1, 2^30)");
      s.max_seqlen_k = static_cast<int>(max_seqlen_k);
    }
    TORCH_CHECK(s.max_seqlen_k >= 1, "max_seqlen_k must be >= 1");
    TORCH_CHECK(s.batch * s.hkv * ((int64_t{s.max_seqlen_k} + block_size - 1) / block_size) < (int64_t{1} << 31),
                "batch x Hkv x key blocks must stay below 2^31 (32-bit list ids)");
  }
  check_sm90(q);
  return s;
}

inline AttnShape check_attn_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                                   const at::Tensor& block_indices, const c10::optional<at::Tensor>& cu_seqlens_q,
                                   const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_k,
                                   int64_t block_size) {
  return check_attn_inputs(q, k, v, &block_indices, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, block_size);
}

// The fields every attention-shaped parameter struct (FwdParams, BwdParams, KlParams) shares:
// sequence layout, sizes, dtype and the device's SM count.
template <class Params>
void fill_attn_params(Params& p, const AttnShape& s, const at::Tensor& q, const c10::optional<at::Tensor>& cu_seqlens_q,
                      const c10::optional<at::Tensor>& cu_seqlens_k, int64_t block_size) {
  p.cu_seqlens_q = s.varlen ? cu_seqlens_q->data_ptr<int32_t>() : nullptr;
  p.cu_seqlens_k = s.varlen ? cu_seqlens_k->data_ptr<int32_t>() : nullptr;
  p.dtype = dtype_of(q, "q");
  p.total_q = s.total_q;
  p.total_k = s.total_k;
  p.batch = static_cast<int>(s.batch);
  p.seqlen_q = s.seqlen_q;
  p.seqlen_k = s.seqlen_k;
  p.max_seqlen_k = s.max_seqlen_k;
  p.num_heads = static_cast<int>(s.hq);
  p.num_heads_kv = static_cast<int>(s.hkv);
  p.head_dim = static_cast<int>(s.d);
  p.block_size = static_cast<int>(block_size);
  p.topk = static_cast<int>(s.topk);
  cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, q.get_device());
}

// lse-shaped [B, Hq, Sq] / [Hq, Tq] -> per query row [total_q, Hq] in log2 units (fp32,
// contiguous); rows with lse = -inf (no visible key) become `neg_inf_value`.
inline at::Tensor lse_rows_log2(const at::Tensor& lse, const AttnShape& s, double neg_inf_value) {
  at::Tensor rows = (s.varlen ? lse.t() : lse.permute({0, 2, 1})).reshape({s.total_q, s.hq}).to(at::kFloat);
  return at::where(at::isneginf(rows), at::full_like(rows, neg_inf_value), rows * 1.4426950408889634).contiguous();
}

inline void check_lse_shape(const at::Tensor& lse, const char* name, const AttnShape& s, const at::Tensor& q) {
  check_cuda_contiguous(lse, name);
  check_same_device_as(lse, name, q);
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, name, " must be float32");
  if (s.varlen) {
    TORCH_CHECK(lse.dim() == 2 && lse.size(0) == s.hq && lse.size(1) == s.total_q, name, " must be [Hq, Tq]");
  } else {
    TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.batch && lse.size(1) == s.hq && lse.size(2) == s.seqlen_q, name,
                " must be [B, Hq, Sq]");
  }
}

}  // namespace msa::bindings
