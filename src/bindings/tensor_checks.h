// Checks shared by the op bindings. The Python layer validates every argument first and raises
// ValueError/TypeError; these are the last line of defence before a launch, so a direct call of
// torch.ops.msa_cuda_kernels.* with bad tensors raises instead of faulting on the device.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <string>

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

}  // namespace msa::bindings
