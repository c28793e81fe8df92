// torch op msa_cuda_kernels::block_sparse_attn_fwd -> msa::run_fwd.
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <tuple>
#include <utility>

#include "msa/msa.h"
#include "tensor_checks.h"

namespace msa::bindings {

// MSA_CUDA_FWD_PATH = auto (default) | kv_outer | query_outer picks the forward kernel (for tests
// and benchmarks; both give the same result up to rounding).
static FwdPath fwd_path_from_env() {
  const char* v = std::getenv("MSA_CUDA_FWD_PATH");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return FwdPath::kAuto;
  if (std::strcmp(v, "kv_outer") == 0) return FwdPath::kKVOuter;
  if (std::strcmp(v, "query_outer") == 0) return FwdPath::kQueryOuter;
  TORCH_CHECK(false, "MSA_CUDA_FWD_PATH must be auto, kv_outer or query_outer, got '", v, "'");
}

// q [B, Sq, Hq, D] / [Tq, Hq, D]; k, v [B, Sk, Hkv, D] / [Tk, Hkv, D]; block_indices
// [B, Sq, Hkv, topk] / [Tq, Hkv, topk]; entries that are -1 or name no block of the sequence are
// skipped. cu_seqlens values and max_seqlen_k (>= the longest key sequence) are trusted here: the
// Python layer checks them on the host.
// Returns out (q's shape and dtype) and lse (fp32, [B, Hq, Sq] / [Hq, Tq]).
std::tuple<at::Tensor, at::Tensor> block_sparse_attn_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& block_indices,
    const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_k, int64_t block_size, double softmax_scale) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&block_indices, "block_indices"}}) {
    check_cuda_contiguous(*t, name);
    TORCH_CHECK(t->get_device() == q.get_device(), name, " must be on q's device");
  }
  const DType dtype = dtype_of(q, "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "k and v must have q's dtype");
  TORCH_CHECK_TYPE(block_indices.scalar_type() == at::kInt, "block_indices must be int32");
  const bool varlen = cu_seqlens_q.has_value();
  TORCH_CHECK(varlen == cu_seqlens_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together");
  const int rank = varlen ? 3 : 4;
  TORCH_CHECK(q.dim() == rank && k.dim() == rank && v.dim() == rank && block_indices.dim() == rank,
              "q, k, v, block_indices must all be ", rank, "-D");
  const int64_t d = q.size(-1), hq = q.size(-2), hkv = k.size(-2), topk = block_indices.size(-1);
  TORCH_CHECK(d == 64 || d == 128, "head dim must be 64 or 128, got ", d);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(-1) == d, "k and v must have the same shape and q's head dim");
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "Hq must be a multiple of Hkv");
  const int64_t g = hq / hkv;
  TORCH_CHECK(g == 1 || g == 2 || g == 4 || g == 8 || g == 16, "G = Hq / Hkv must be 1, 2, 4, 8 or 16");
  TORCH_CHECK(block_indices.size(-2) == hkv && topk >= 1 && topk <= 32, "block_indices must be [..., Hkv, topk<=32]");
  TORCH_CHECK(block_size == 64 || block_size == 128, "block_size must be 64 or 128");
  const int64_t total_q = q.numel() / (hq * d), total_k = k.numel() / (hkv * d);
  TORCH_CHECK(total_q < (int64_t{1} << 31) && total_k < (int64_t{1} << 31), "token counts must stay below 2^31");
  TORCH_CHECK(total_q * hq < (int64_t{1} << 31), "total query tokens x Hq must stay below 2^31 (32-bit q row index)");
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
  }
  const int64_t batch = varlen ? cu_seqlens_q->size(0) - 1 : q.size(0);
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", batch, q);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", batch, q);
  if (!varlen) {
    TORCH_CHECK(k.size(0) == batch && block_indices.size(0) == batch && block_indices.size(1) == q.size(1),
                "batch and Sq must agree between q, k and block_indices");
    TORCH_CHECK(q.size(1) <= k.size(1), "Sq must not exceed Sk");
  } else {
    TORCH_CHECK(block_indices.size(0) == q.size(0), "block_indices must have q's token count");
  }
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, "softmax_scale must be finite and > 0");
  check_sm90(q);

  at::Tensor out = at::empty_like(q);
  at::Tensor lse = varlen ? at::empty({hq, total_q}, q.options().dtype(at::kFloat))
                          : at::empty({batch, hq, q.size(1)}, q.options().dtype(at::kFloat));
  if (total_q == 0 || batch == 0) return {out, lse};

  c10::cuda::CUDAGuard guard(q.device());
  FwdParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.block_indices = block_indices.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
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
  p.path = fwd_path_from_env();
  cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, q.get_device());
  at::Tensor workspace = at::empty({static_cast<int64_t>(fwd_workspace_bytes(p))}, q.options().dtype(at::kByte));
  check_launch(run_fwd(p, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "msa_cuda block_sparse_attn forward kernel");
  return {out, lse};
}

}  // namespace msa::bindings

TORCH_LIBRARY_IMPL(msa_cuda_kernels, CUDA, m) {
  m.impl("block_sparse_attn_fwd", &msa::bindings::block_sparse_attn_fwd_cuda);
}
