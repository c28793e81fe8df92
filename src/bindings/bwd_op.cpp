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
// deterministic: bitwise-reproducible gradients (sorted plan, 64-bit fixed-point accumulation with
// per-call power-of-two scales from bounds on each gradient; the bounds read max |x| of dout, q, k,
// v and delta on the host, in one copy: one sync).
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attn_bwd_cuda(
    const at::Tensor& dout, const c10::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& block_indices, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_k, int64_t block_size, double softmax_scale, bool deterministic) {
  const AttnShape shape =
      check_attn_inputs(q, k, &v, block_indices, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, block_size);
  const auto [varlen, batch, total_q, total_k] = std::tuple{shape.varlen, shape.batch, shape.total_q, shape.total_k};
  const auto [hq, hkv, d, topk] = std::tuple{shape.hq, shape.hkv, shape.d, shape.topk};
  for (auto [t, name] : {std::pair{&dout, "dout"}, {&out, "out"}}) {
    check_cuda_contiguous(*t, name);
    check_same_device_as(*t, name, q);
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), name, " must have q's dtype");
    TORCH_CHECK(t->sizes() == q.sizes(), name, " must have q's shape");
  }
  check_aligned_16(dout, "dout");
  check_aligned_16(out, "out");
  check_lse_shape(lse, "lse", shape, q);
  if (dlse.has_value()) {
    TORCH_CHECK(dlse->sizes() == lse.sizes() && dlse->get_device() == q.get_device(), "dlse must have lse's shape");
  }
  TORCH_CHECK(total_q < (int64_t{1} << 26), "the backward supports fewer than 2^26 query tokens per call");
  TORCH_CHECK(total_q * hkv * topk < (int64_t{1} << 31), "query tokens x Hkv x topk must stay below 2^31");
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0, "softmax_scale must be finite and > 0");

  c10::cuda::CUDAGuard guard(q.device());
  const auto accum_options = q.options().dtype(deterministic ? at::kLong : at::kFloat);
  const bool run = total_q > 0 && batch > 0 && total_k > 0;
  // dq is written chunk by chunk from an accumulator in the workspace; dk and dv (Hkv heads, a
  // small share of the bytes) accumulate whole, here.
  at::Tensor dq = run ? at::empty_like(q) : at::zeros_like(q);
  at::Tensor dk_accum = at::zeros({total_k, hkv, d}, accum_options);
  at::Tensor dv_accum = at::zeros({total_k, hkv, d}, accum_options);
  int fixed_exp_q = 0, fixed_exp_k = 0, fixed_exp_v = 0;
  if (run) {
    // Per-row preprocessing (memory bound, on the caller's stream): lse in log2 units (0 where a row
    // has no visible key: its P is 0 anyway) and delta = rowsum(dout * out) - dlse (one kernel).
    const at::Tensor lse_log2 = lse_rows_log2(lse, shape, 0.0);
    at::Tensor delta = at::empty({total_q, hq}, q.options().dtype(at::kFloat));
    const at::Tensor dlse_rows = dlse.has_value() ? per_row(*dlse, varlen, total_q, hq) : at::Tensor();
    check_launch(run_bwd_delta(dtype_of(q, "q"), static_cast<int>(d), dout.data_ptr(), out.data_ptr(),
                               dlse.has_value() ? dlse_rows.data_ptr<float>() : nullptr, delta.data_ptr<float>(),
                               total_q * hq, c10::cuda::getCurrentCUDAStream()),
                 "msa_cuda block_sparse_attn backward preprocessing kernel");

    BwdParams p;
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.dout = dout.data_ptr();
    p.dq = dq.data_ptr();
    p.block_indices = block_indices.data_ptr<int32_t>();
    p.lse_log2 = lse_log2.data_ptr<float>();
    p.delta = delta.data_ptr<float>();
    if (deterministic) {
      // Bounds on |dq|, |dk|, |dv| (and on every partial sum): |dS| <= |dP| + |delta| with
      // |dP| <= D max|dO| max|v|; a key block is chosen by at most total_q x G rows, a row chooses
      // at most topk x block_size keys. Each scale puts its bound just below 2^61, so int64 holds
      // every sum; even bounds 10^6x loose leave ~40 bits of resolution below the largest value.
      // max |x| of dout, q, k, v, delta: one pass each (aminmax, no temporary), one copy to the host.
      auto max_abs = [](const at::Tensor& t) {
        const auto [lo, hi] = at::aminmax(t);
        return at::maximum(lo.abs(), hi.abs()).to(at::kDouble);
      };
      const at::Tensor bounds =
          at::stack({max_abs(dout), max_abs(q), max_abs(k), max_abs(v), max_abs(delta)}).to(at::kCPU);
      const double* m = bounds.data_ptr<double>();
      const double m_do = m[0], m_q = m[1], m_k = m[2], m_v = m[3], m_delta = m[4];
      const double b_ds = static_cast<double>(d) * m_do * m_v + m_delta;
      const double rows = static_cast<double>(total_q) * (hq / hkv);
      auto exponent = [](double bound) {
        if (!(bound > 0) || !std::isfinite(bound)) return 0;
        return static_cast<int>(std::clamp(61.0 - std::ceil(std::log2(bound)), -120.0, 120.0));
      };
      fixed_exp_q = exponent(softmax_scale * static_cast<double>(topk) * block_size * b_ds * m_k);
      fixed_exp_k = exponent(softmax_scale * rows * b_ds * m_q);
      fixed_exp_v = exponent(rows * m_do);
      p.deterministic = true;
      p.dk_fixed = reinterpret_cast<unsigned long long*>(dk_accum.data_ptr<int64_t>());
      p.dv_fixed = reinterpret_cast<unsigned long long*>(dv_accum.data_ptr<int64_t>());
      p.fixed_scale_q = std::ldexp(1.f, fixed_exp_q);
      p.fixed_scale_k = std::ldexp(1.f, fixed_exp_k);
      p.fixed_scale_v = std::ldexp(1.f, fixed_exp_v);
    } else {
      p.dk_accum = dk_accum.data_ptr<float>();
      p.dv_accum = dv_accum.data_ptr<float>();
    }
    fill_attn_params(p, shape, q, cu_seqlens_q, cu_seqlens_k, block_size);
    p.softmax_scale = static_cast<float>(softmax_scale);
    at::Tensor workspace = at::empty({static_cast<int64_t>(bwd_workspace_bytes(p))}, q.options().dtype(at::kByte));
    check_launch(run_bwd(p, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()),
                 "msa_cuda block_sparse_attn backward kernel");
  }
  auto finish = [&](const at::Tensor& accum, int fixed_exp, const at::Tensor& like) {
    at::Tensor grad = deterministic ? accum.to(at::kDouble).mul_(std::ldexp(1.0, -fixed_exp)) : accum;
    return grad.to(like.scalar_type()).view(like.sizes());
  };
  return {dq, finish(dk_accum, fixed_exp_k, k), finish(dv_accum, fixed_exp_v, v)};
}

}  // namespace msa::bindings

TORCH_LIBRARY_IMPL(msa_cuda_kernels, CUDA, m) {
  m.impl("block_sparse_attn_bwd", &msa::bindings::block_sparse_attn_bwd_cuda);
}
