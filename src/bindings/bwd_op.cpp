// torch op msa_cuda_kernels::block_sparse_attn_bwd -> msa::run_bwd.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <utility>

#include "msa/msa.h"
#include "tensor_checks.h"

namespace msa::bindings {

namespace {

// lse-shaped [B, Hq, Sq] / [Hq, Tq] -> per q row [total_q, Hq] (fp32, contiguous).
at::Tensor per_row(const at::Tensor& t, bool varlen, int64_t total_q, int64_t hq) {
  at::Tensor rows = varlen ? t.t() : t.permute({0, 2, 1});
  return rows.reshape({total_q, hq}).to(at::kFloat).contiguous();
}

}  // namespace

// dout, q, out [B, Sq, Hq, D] / [Tq, Hq, D]; k, v [B, Sk, Hkv, D] / [Tk, Hkv, D]; block_indices
// as in the forward; lse (fp32) and the optional dlse [B, Hq, Sq] / [Hq, Tq]. cu_seqlens values and
// max_seqlen_k are trusted (checked in Python). Returns dq, dk, dv in the inputs' dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attn_bwd_cuda(
    const at::Tensor& dout, const c10::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& block_indices, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_k, int64_t block_size, double softmax_scale) {
  for (auto [t, name] : {std::pair{&dout, "dout"}, {&q, "q"}, {&k, "k"}, {&v, "v"},
                         {&block_indices, "block_indices"}, {&out, "out"}, {&lse, "lse"}}) {
    check_cuda_contiguous(*t, name);
    TORCH_CHECK(t->get_device() == q.get_device(), name, " must be on q's device");
  }
  const DType dtype = dtype_of(q, "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                       dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                   "k, v, out and dout must have q's dtype");
  TORCH_CHECK_TYPE(block_indices.scalar_type() == at::kInt, "block_indices must be int32");
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse must be float32");
  const bool varlen = cu_seqlens_q.has_value();
  TORCH_CHECK(varlen == cu_seqlens_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  const int rank = varlen ? 3 : 4;
  TORCH_CHECK(q.dim() == rank && k.dim() == rank && v.dim() == rank && block_indices.dim() == rank,
              "q, k, v, block_indices must all be ", rank, "-D");
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "dout and out must have q's shape");
  const int64_t d = q.size(-1), hq = q.size(-2), hkv = k.size(-2), topk = block_indices.size(-1);
  TORCH_CHECK(d == 64 || d == 128, "head dim must be 64 or 128, got ", d);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(-1) == d, "k and v must have the same shape and q's head dim");
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "Hq must be a multiple of Hkv");
  const int64_t g = hq / hkv;
  TORCH_CHECK(g == 1 || g == 2 || g == 4 || g == 8 || g == 16, "G = Hq / Hkv must be 1, 2, 4, 8 or 16");
  TORCH_CHECK(block_indices.size(-2) == hkv && topk >= 1 && topk <= 32, "block_indices must be [..., Hkv, topk<=32]");
  TORCH_CHECK(block_size == 64 || block_size == 128, "block_size must be 64 or 128");
  const int64_t total_q = q.numel() / (hq * d), total_k = k.numel() / (hkv * d);
  TORCH_CHECK(total_q < (int64_t{1} << 26), "the backward supports fewer than 2^26 query tokens per call");
  TORCH_CHECK(total_k < (int64_t{1} << 31), "key tokens must stay below 2^31");
  TORCH_CHECK(total_q * hkv * topk < (int64_t{1} << 31), "query tokens x Hkv x topk must stay below 2^31");
  const int64_t batch = varlen ? cu_seqlens_q->size(0) - 1 : q.size(0);
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", batch, q);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", batch, q);
  if (!varlen) {
    TORCH_CHECK(k.size(0) == batch && block_indices.size(0) == batch && block_indices.size(1) == q.size(1),
                "batch and Sq must agree between q, k and block_indices");
    TORCH_CHECK(q.size(1) <= k.size(1), "Sq must not exceed Sk");
    TORCH_CHECK(lse.dim() == 3 && lse.size(0) == batch && lse.size(1) == hq && lse.size(2) == q.size(1),
                "lse must be [B, Hq, Sq]");
  } else {
    TORCH_CHECK(block_indices.size(0) == q.size(0), "block_indices must have q's token count");
    TORCH_CHECK(lse.dim() == 2 && lse.size(0) == hq && lse.size(1) == total_q, "lse must be [Hq, Tq]");
  }
  if (dlse.has_value()) {
    TORCH_CHECK(dlse->sizes() == lse.sizes() && dlse->get_device() == q.get_device(), "dlse must have lse's shape");
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&q, "q"}, {&k, "k"}, {&v, "v"},
                                {&dout, "dout"}}) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
  }
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, "softmax_scale must be finite and > 0");
  check_sm90(q);

  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq_accum = at::zeros({total_q, hq, d}, q.options().dtype(at::kFloat));
  at::Tensor dk_accum = at::zeros({total_k, hkv, d}, q.options().dtype(at::kFloat));
  at::Tensor dv_accum = at::zeros({total_k, hkv, d}, q.options().dtype(at::kFloat));
  if (total_q > 0 && batch > 0 && total_k > 0) {
    // Per-row preprocessing (memory bound, on the caller's stream): lse in log2 units (0 where a row
    // has no visible key: its P is 0 anyway) and delta = rowsum(dout * out) - dlse.
    const at::Tensor lse_rows = per_row(lse, varlen, total_q, hq);
    const at::Tensor lse_log2 =
        at::where(at::isneginf(lse_rows), at::zeros_like(lse_rows), lse_rows * 1.4426950408889634).contiguous();
    // In token chunks: fp32 copies of whole dout/out would take 3 x 4 x Tq x Hq x D bytes (100 GB at
    // 1M tokens of the M3 shape).
    at::Tensor delta = at::empty({total_q, hq}, q.options().dtype(at::kFloat));
    const at::Tensor dout_rows = dout.reshape({total_q, hq, d}), out_rows = out.reshape({total_q, hq, d});
    constexpr int64_t kDeltaChunk = 16384;
    for (int64_t t0 = 0; t0 < total_q; t0 += kDeltaChunk) {
      const int64_t n = std::min(kDeltaChunk, total_q - t0);
      delta.narrow(0, t0, n).copy_(
          (dout_rows.narrow(0, t0, n).to(at::kFloat) * out_rows.narrow(0, t0, n).to(at::kFloat)).sum(-1));
    }
    if (dlse.has_value()) delta.sub_(per_row(*dlse, varlen, total_q, hq));

    BwdParams p;
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.dout = dout.data_ptr();
    p.block_indices = block_indices.data_ptr<int32_t>();
    p.lse_log2 = lse_log2.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    p.dq_accum = dq_accum.data_ptr<float>();
    p.dk_accum = dk_accum.data_ptr<float>();
    p.dv_accum = dv_accum.data_ptr<float>();
    p.cu_seqlens_q = varlen ? cu_seqlens_q->data_ptr<int32_t>() : nullptr;
    p.cu_seqlens_k = varlen ? cu_seqlens_k->data_ptr<int32_t>() : nullptr;
    p.dtype = dtype;
    p.total_q = total_q;
    p.total_k = total_k;
    p.batch = static_cast<int>(batch);
    p.seqlen_q = varlen ? 0 : static_cast<int>(q.size(1));
    p.seqlen_k = varlen ? 0 : static_cast<int>(k.size(1));
    TORCH_CHECK(!varlen || (max_seqlen_k >= 1 && max_seqlen_k < (int64_t{1} << 30)),
                "max_seqlen_k must be in [1, 2^30)");
    p.max_seqlen_k = varlen ? static_cast<int>(max_seqlen_k) : p.seqlen_k;
    TORCH_CHECK(p.max_seqlen_k >= 1, "max_seqlen_k must be >= 1");
    TORCH_CHECK(batch * hkv * ((int64_t{p.max_seqlen_k} + block_size - 1) / block_size) < (int64_t{1} << 31),
                "batch x Hkv x key blocks must stay below 2^31 (32-bit list ids)");
    p.num_heads = static_cast<int>(hq);
    p.num_heads_kv = static_cast<int>(hkv);
    p.head_dim = static_cast<int>(d);
    p.block_size = static_cast<int>(block_size);
    p.topk = static_cast<int>(topk);
    p.softmax_scale = static_cast<float>(softmax_scale);
    cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, q.get_device());
    at::Tensor workspace = at::empty({static_cast<int64_t>(bwd_workspace_bytes(p))}, q.options().dtype(at::kByte));
    check_launch(run_bwd(p, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()),
                 "msa_cuda block_sparse_attn backward kernel");
  }
  return {dq_accum.to(q.scalar_type()).view(q.sizes()), dk_accum.to(k.scalar_type()).view(k.sizes()),
          dv_accum.to(v.scalar_type()).view(v.sizes())};
}

}  // namespace msa::bindings

TORCH_LIBRARY_IMPL(msa_cuda_kernels, CUDA, m) {
  m.impl("block_sparse_attn_bwd", &msa::bindings::block_sparse_attn_bwd_cuda);
}
