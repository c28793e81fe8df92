// torch op msa_cuda_kernels::indexer_kl -> msa::run_kl.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "msa/msa.h"
#include "tensor_checks.h"

namespace msa::bindings {

// q [B, Sq, Hq, D] / [Tq, Hq, D]; k [B, Sk, Hkv, D] / [Tk, Hkv, D]; q_idx [B, Sq, Hkv, Di] /
// [Tq, Hkv, Di]; k_idx [B, Sk, Di] / [Tk, Di]; block_indices as in the forward (the Python
// layer checks for repeated ids unless validate=False; a repeat only counts its block twice, and
// out-of-range ids are skipped by the plan); lse (fp32) [B, Hq, Sq] / [Hq, Tq], the main branch's on the
// same support. Returns the loss (fp32 scalar, mean over (token, group) pairs of KL(P || Q)) and
// its gradients for q_idx and k_idx (fp32, q_idx's / k_idx's shape): the loss is a scalar, so the
// caller multiplies them by the incoming gradient.
namespace {

// The index tensors' checks both variants share.
int64_t check_index_inputs(const at::Tensor& q, const at::Tensor& q_idx, const at::Tensor& k_idx,
                           const AttnShape& shape, const at::Tensor& k) {
  for (auto [t, name] : {std::pair{&q_idx, "q_idx"}, {&k_idx, "k_idx"}}) {
    check_cuda_contiguous(*t, name);
    check_same_device_as(*t, name, q);
    check_aligned_16(*t, name);
  }
  dtype_of(q_idx, "q_idx");
  TORCH_CHECK_TYPE(q_idx.scalar_type() == q.scalar_type() && k_idx.scalar_type() == q.scalar_type(),
                   "q_idx and k_idx must have q's dtype");
  const int64_t di = q_idx.size(-1);
  TORCH_CHECK(di == 64 || di == 128, "index head dim must be 64 or 128, got ", di);
  TORCH_CHECK(q_idx.dim() == q.dim() && q_idx.size(-2) == shape.hkv && q_idx.numel() == shape.total_q * shape.hkv * di,
              "q_idx must be [..., Hkv, Di] with q's tokens");
  TORCH_CHECK(k_idx.dim() == k.dim() - 1 && k_idx.size(-1) == di && k_idx.numel() == shape.total_k * di,
              "k_idx must be [..., Di] with k's tokens and q_idx's Di");
  return di;
}

void check_scales(double softmax_scale, double index_scale) {
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, "softmax_scale must be finite and > 0");
  TORCH_CHECK(std::isfinite(index_scale) && index_scale > 0, "index_scale must be finite and > 0");
}

// Outputs, parameters and the launch, after the checks: the selected support when block_indices
// is given, else the dense warm-up support.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_kl_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_idx, const at::Tensor& k_idx,
    const at::Tensor* block_indices, const at::Tensor& lse, const AttnShape& shape, int64_t di,
    const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t block_size, double softmax_scale, double index_scale) {
  c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq_idx = at::zeros(q_idx.sizes(), f32);
  at::Tensor dk_idx = at::zeros(k_idx.sizes(), f32);
  at::Tensor loss_sum = at::zeros({}, q.options().dtype(at::kDouble));
  if (shape.total_q > 0 && shape.batch > 0 && shape.total_k > 0) {
    // The teacher's per-head lse in log2 units; +inf where lse = -inf makes its P exactly 0.
    const at::Tensor lse_log2 = lse_rows_log2(lse, shape, INFINITY);
    KlParams p;
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.q_idx = q_idx.data_ptr();
    p.k_idx = k_idx.data_ptr();
    p.block_indices = block_indices != nullptr ? block_indices->data_ptr<int32_t>() : nullptr;
    p.lse_log2 = lse_log2.data_ptr<float>();
    p.dq_idx_accum = dq_idx.data_ptr<float>();
    p.dk_idx_accum = dk_idx.data_ptr<float>();
    p.loss_sum = loss_sum.data_ptr<double>();
    fill_attn_params(p, shape, q, cu_seqlens_q, cu_seqlens_k, block_size);
    p.max_seqlen_q = shape.varlen ? static_cast<int>(max_seqlen_q) : shape.seqlen_q;
    p.head_dim_idx = static_cast<int>(di);
    p.softmax_scale = static_cast<float>(softmax_scale);
    p.index_scale = static_cast<float>(index_scale);
    const bool dense = block_indices == nullptr;
    const size_t bytes = dense ? kl_dense_workspace_bytes(p) : kl_workspace_bytes(p);
    at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    check_launch(dense ? run_kl_dense(p, workspace.data_ptr(), stream) : run_kl(p, workspace.data_ptr(), stream),
                 dense ? "msa_cuda indexer_kl_loss (dense) kernel" : "msa_cuda indexer_kl_loss kernel");
  }
  const double pairs = static_cast<double>(std::max<int64_t>(shape.total_q * shape.hkv, 1));
  return {(loss_sum / pairs).to(at::kFloat), dq_idx, dk_idx};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_kl_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_idx, const at::Tensor& k_idx,
    const at::Tensor& block_indices, const at::Tensor& lse, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_k, int64_t block_size, double softmax_scale,
    double index_scale) {
  const AttnShape shape =
      check_attn_inputs(q, k, nullptr, block_indices, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, block_size);
  const auto [total_q, hkv, topk] = std::tuple{shape.total_q, shape.hkv, shape.topk};
  const int64_t di = check_index_inputs(q, q_idx, k_idx, shape, k);
  check_lse_shape(lse, "lse", shape, q);
  TORCH_CHECK(total_q < (int64_t{1} << 26), "the KL kernels support fewer than 2^26 query tokens per call");
  TORCH_CHECK(total_q * hkv * topk < (int64_t{1} << 31), "query tokens x Hkv x topk must stay below 2^31");
  check_scales(softmax_scale, index_scale);
  return run_kl_op(q, k, q_idx, k_idx, &block_indices, lse, shape, di, cu_seqlens_q, cu_seqlens_k, 0, block_size,
                   softmax_scale, index_scale);
}

// The dense warm-up variant: the support is every causally visible key (no selection); lse is the
// main branch's dense causal lse. Same outputs as indexer_kl_cuda.
std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_kl_dense_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_idx, const at::Tensor& k_idx, const at::Tensor& lse,
    const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t block_size, double softmax_scale, double index_scale) {
  const AttnShape shape =
      check_attn_inputs(q, k, nullptr, nullptr, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, block_size);
  const int64_t di = check_index_inputs(q, q_idx, k_idx, shape, k);
  check_lse_shape(lse, "lse", shape, q);
  check_scales(softmax_scale, index_scale);
  if (shape.varlen && shape.total_q > 0) {
    TORCH_CHECK(max_seqlen_q >= 1 && max_seqlen_q < (int64_t{1} << 30), "max_seqlen_q must be in [1, 2^30)");
  }
  return run_kl_op(q, k, q_idx, k_idx, nullptr, lse, shape, di, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                   block_size, softmax_scale, index_scale);
}

}  // namespace msa::bindings

TORCH_LIBRARY_IMPL(msa_cuda_kernels, CUDA, m) {
  m.impl("indexer_kl", &msa::bindings::indexer_kl_cuda);
  m.impl("indexer_kl_dense", &msa::bindings::indexer_kl_dense_cuda);
}
