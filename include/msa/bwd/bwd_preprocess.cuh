// The backward's elementwise kernels around the main one: per-row preprocessing (MSA_SPEC s.6),
// delta_i = dO_i . O_i - dlse_i in fp32, in one pass over dout and out (done with ATen ops it took
// fp32 copies of both and a product: about 30 GB of traffic at 128K tokens of the M3 shape by
// estimate, against 4.3 GB read here); and the finish of a query chunk's dq accumulator.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include <cutlass/array.h>
#include <cutlass/numeric_types.h>

namespace msa::bwd {

// Rows of D elements; kHeadDim / 8 threads per row, one 16-byte chunk of each tensor each, their
// products summed by a shuffle tree inside the row's segment of the warp.
template <class Element, int kHeadDim>
__global__ void __launch_bounds__(256) delta_kernel(const Element* __restrict__ dout, const Element* __restrict__ out,
                                                   const float* __restrict__ dlse, float* __restrict__ delta,
                                                   int64_t rows) {
  constexpr int kThreadsPerRow = kHeadDim / 8;
  const int64_t row = (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / kThreadsPerRow;
  const int chunk = threadIdx.x % kThreadsPerRow;
  using Chunk = cutlass::AlignedArray<Element, 8>;  // 16-byte loads (dout and out are 16-byte aligned)
  float acc = 0.f;
  if (row < rows) {
    const Chunk a = reinterpret_cast<const Chunk*>(dout + row * kHeadDim)[chunk];
    const Chunk b = reinterpret_cast<const Chunk*>(out + row * kHeadDim)[chunk];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  }
#pragma unroll
  for (int o = kThreadsPerRow / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o, kThreadsPerRow);
  if (row < rows && chunk == 0) delta[row] = dlse != nullptr ? acc - dlse[row] : acc;
}

template <class Element, int kHeadDim>
cudaError_t launch_delta(const void* dout, const void* out, const float* dlse, float* delta, int64_t rows,
                         cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = (rows * (kHeadDim / 8) + kThreads - 1) / kThreads;
  if (blocks == 0) return cudaSuccess;
  delta_kernel<Element, kHeadDim><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const Element*>(dout), static_cast<const Element*>(out), dlse, delta, rows);
  return cudaGetLastError();
}

// One query chunk's dq: accumulator (fp32, or int64 fixed point x 2^exp in deterministic mode) ->
// dq rows in the inputs' dtype, and the accumulator zeroed again for the next chunk, in one pass.
template <class Element, class Accum>
__global__ void __launch_bounds__(256) dq_finish_kernel(Accum* __restrict__ accum, Element* __restrict__ dq,
                                                       int64_t chunks, double inv_fixed_scale) {
  using Out = cutlass::AlignedArray<Element, 8>;
  using In = cutlass::AlignedArray<Accum, 8>;  // 32 or 64 bytes: two or four 16-byte loads
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; c < chunks; c += stride) {
    const In a = reinterpret_cast<const In*>(accum)[c];
    Out o;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if constexpr (sizeof(Accum) == 8) {
        o[i] = static_cast<Element>(static_cast<float>(static_cast<double>(static_cast<long long>(a[i])) *
                                                       inv_fixed_scale));
      } else {
        o[i] = static_cast<Element>(a[i]);
      }
    }
    reinterpret_cast<Out*>(dq)[c] = o;
    reinterpret_cast<In*>(accum)[c] = In{};
  }
}

template <class Element, class Accum>
cudaError_t launch_dq_finish(Accum* accum, void* dq, int64_t elements, double inv_fixed_scale, int max_ctas,
                             cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t chunks = elements / 8;  // rows of D = 64 or 128 elements
  const int64_t blocks = std::min<int64_t>((chunks + kThreads - 1) / kThreads, max_ctas);  // grid-stride past it
  if (blocks == 0) return cudaSuccess;
  dq_finish_kernel<Element, Accum><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      accum, static_cast<Element*>(dq), chunks, inv_fixed_scale);
  return cudaGetLastError();
}

}  // namespace msa::bwd
