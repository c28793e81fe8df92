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
  const AttnShape shape =
      check_attn_inputs(q, k, &v, block_indices, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, block_size);
  const auto [varlen, batch, total_q, hq] = std::tuple{shape.varlen, shape.batch, shape.total_q, shape.hq};
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, "softmax_scale must be finite and > 0");

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
  fill_attn_params(p, shape, q, cu_seqlens_q, cu_seqlens_k, block_size);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.path = fwd_path_from_env();
  at::Tensor workspace = at::empty({static_cast<int64_t>(fwd_workspace_bytes(p))}, q.options().dtype(at::kByte));
  check_launch(run_fwd(p, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "msa_cuda block_sparse_attn forward kernel");
  return {out, lse};
}

}  // namespace msa::bindings

TORCH_LIBRARY_IMPL(msa_cuda_kernels, CUDA, m) {
  m.impl("block_sparse_attn_fwd", &msa::bindings::block_sparse_attn_fwd_cuda);
}
