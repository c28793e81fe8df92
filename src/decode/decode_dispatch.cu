// A decoding step on the device: append -> split indexer -> split attention (whose CTAs first merge
// the indexer's lists into the row's selection, and whose chunks of a row merge in a thread-block
// cluster or in the row's last CTA).
// Runtime dispatch over (dtype, Di) and (dtype, D); the instantiations live in one file each so
// they compile in parallel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cutlass/numeric_types.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "msa/decode/decode_cache.cuh"
#include "msa/decode/decode_trace.h"
#include "msa/msa.h"

namespace msa {
namespace decode {
using BF = cutlass::bfloat16_t;
using FP = cutlass::half_t;

template <class Element, int kHeadDimIdx, bool kFp8Keys>
cudaError_t launch_decode_select(const DecodeParams& p, const DecodeWorkspace& ws, int num_splits,
                                 cudaStream_t stream);
template <class Element, int kHeadDim>
cudaError_t launch_decode_attn(const DecodeParams& p, const DecodeWorkspace& ws, cudaStream_t stream);

namespace {

__global__ void __launch_bounds__(128) decode_append_kernel(const AppendParams p) {
  // The indexer may launch now (programmatic dependent launch). It reads nothing this grid writes
  // before waiting for it (it only loads key rows below the old length early).
  asm volatile("griddepcontrol.launch_dependents;");
  const int b = blockIdx.x / p.s_new;
  const int i = blockIdx.x % p.s_new;
  const int64_t pos = static_cast<int64_t>(p.cache.cache_seqlens[b]) + i;
  if (pos < 0 || pos >= p.cache.capacity) return;
  const int64_t dst = p.cache.row(b, static_cast<int>(pos));
  const int64_t src = blockIdx.x;
  for (int c = threadIdx.x; c < p.kv_row_chunks; c += blockDim.x) {
    p.k_cache[dst * p.kv_row_chunks + c] = p.k_new[src * p.kv_row_chunks + c];
    p.v_cache[dst * p.kv_row_chunks + c] = p.v_new[src * p.kv_row_chunks + c];
  }
  if (p.k_idx_scale == nullptr) {
    for (int c = threadIdx.x; c < p.idx_row_chunks; c += blockDim.x) {
      p.k_idx_cache[dst * p.idx_row_chunks + c] = p.k_idx_new[src * p.idx_row_chunks + c];
    }
    return;
  }
  // e4m3 index keys: scale = max |x| x (1 / 448) (1 for a zero row), stored x / scale rounded to
  // nearest (IEEE operations, as the reference's quantize_index_keys).
  __shared__ float warp_max[4];
  const int di = p.idx_row_chunks * 8;  // 16-bit elements per row
  const uint16_t* row = reinterpret_cast<const uint16_t*>(p.k_idx_new + src * p.idx_row_chunks);
  auto value = [&](int e) {
    const uint16_t bits = row[e];
    return p.keys_bf16 ? __bfloat162float(__ushort_as_bfloat16(bits)) : __half2float(__ushort_as_half(bits));
  };
  float amax = 0.f;
  for (int e = threadIdx.x; e < di; e += blockDim.x) amax = fmaxf(amax, fabsf(value(e)));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, o));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = fmaxf(fmaxf(warp_max[0], warp_max[1]), fmaxf(warp_max[2], warp_max[3]));
  const float scale = amax > 0.f ? __fmul_rn(amax, 1.f / 448.f) : 1.f;
  uint8_t* out = reinterpret_cast<uint8_t*>(p.k_idx_cache) + dst * di;
  for (int e = threadIdx.x; e < di; e += blockDim.x) {
    out[e] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(__fdiv_rn(value(e), scale), __NV_SATFINITE, __NV_E4M3));
  }
  if (threadIdx.x == 0) p.k_idx_scale[dst] = scale;
}

constexpr int kTopKListCap = 32;  // workspace sized for the longest list

size_t align_up(size_t x) { return (x + 255) / 256 * 256; }

// Carves the step's scratch from `base` (null: only sizes it); returns the bytes used.
size_t carve(const DecodeParams& p, void* base, DecodeWorkspace& w) {
  const size_t rows = static_cast<size_t>(p.batch) * p.s_new * p.num_heads_kv;
  const size_t list_entries = rows * decode_select_splits(p) * kTopKListCap;
  const size_t pairs = static_cast<size_t>(p.batch) * p.s_new * p.num_heads * p.topk;
  char* ptr = static_cast<char*>(base);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    void* at = ptr + off;
    off += align_up(bytes);
    return at;
  };
  w.part_score = static_cast<float*>(take(list_entries * sizeof(float)));
  w.part_id = static_cast<int32_t*>(take(list_entries * sizeof(int32_t)));
  w.part_o = take(pairs * p.head_dim * 2);
  w.part_stats = static_cast<float2*>(take(pairs * sizeof(float2)));
  w.row_arrivals = static_cast<int32_t*>(take(rows * sizeof(int32_t)));
  return off;
}

}  // namespace
}  // namespace decode

bool decode_is_supported(const DecodeParams& p) {
  const int g = p.num_heads_kv > 0 ? p.num_heads / p.num_heads_kv : 0;
  return (p.head_dim == 64 || p.head_dim == 128) && (p.head_dim_idx == 64 || p.head_dim_idx == 128) &&
         (p.block_size == 64 || p.block_size == 128) && p.topk >= 1 && p.topk <= 32 && g >= 1 && g <= 16 &&
         (g & (g - 1)) == 0 && p.num_heads == g * p.num_heads_kv && p.s_new >= 1 && p.s_new <= 16 &&
         (p.page_size == 0 || p.page_size % p.block_size == 0);
}

size_t decode_workspace_bytes(const DecodeParams& p) {
  decode::DecodeWorkspace w;
  return decode::carve(p, nullptr, w);
}

namespace decode {
namespace {

// Measurement aid: with MSA_DECODE_TRACE_FILE set, each step's indexer and attention CTAs stamp
// their trace slots (decode_trace.h) into a device buffer, and the host appends them to that file
// after the step (a synchronizing copy: eager steps only, never under graph capture). Per step: a
// line "step splits m_tiles batch fp8", one line per indexer CTA (x fastest) of kDecodeTraceSlots
// values, a line "attn", then one line per attention CTA that ran: its linear CTA index and its
// kDecodeTraceSlots values. Times are relative to the step's earliest indexer CTA start.
constexpr size_t kTraceHalf = static_cast<size_t>(kTraceMaxCtas) * kDecodeTraceSlots;
unsigned long long* trace_buffer(const char* path) {
  static unsigned long long* buffer = nullptr;
  if (path == nullptr) return nullptr;
  if (buffer == nullptr && cudaMalloc(&buffer, sizeof(unsigned long long) * 2 * kTraceHalf) != cudaSuccess) {
    cudaGetLastError();
    buffer = nullptr;
  }
  return buffer;
}

void write_trace_row(FILE* f, const unsigned long long* row, unsigned long long t0, int sm_slot, int count_slot) {
  for (int k = 0; k < kDecodeTraceSlots; ++k) {
    const bool time = k != sm_slot && k != count_slot;
    std::fprintf(f, k ? " %lld" : "%lld", static_cast<long long>(time ? (row[k] ? row[k] - t0 : 0) : row[k]));
  }
  std::fputc('\n', f);
}

void write_trace(const char* path, const unsigned long long* device, int splits, int m_tiles, int batch, bool fp8,
                 cudaStream_t stream) {
  const int ctas = splits * m_tiles * batch;
  if (ctas > kTraceMaxCtas) return;
  std::vector<unsigned long long> host(2 * kTraceHalf);
  if (cudaStreamSynchronize(stream) != cudaSuccess ||
      cudaMemcpy(host.data(), device, host.size() * sizeof(unsigned long long), cudaMemcpyDeviceToHost) != cudaSuccess) {
    return;
  }
  unsigned long long t0 = ~0ull;
  for (int c = 0; c < ctas; ++c) t0 = std::min(t0, host[static_cast<size_t>(c) * kDecodeTraceSlots + kTraceStart]);
  FILE* f = std::fopen(path, "a");
  if (f == nullptr) return;
  std::fprintf(f, "step %d %d %d %d\n", splits, m_tiles, batch, fp8 ? 1 : 0);
  for (int c = 0; c < ctas; ++c) {
    write_trace_row(f, host.data() + static_cast<size_t>(c) * kDecodeTraceSlots, t0, kTraceSm, kTraceStages);
  }
  std::fprintf(f, "attn\n");
  for (int c = 0; c < kTraceMaxCtas; ++c) {
    const unsigned long long* row = host.data() + kTraceHalf + static_cast<size_t>(c) * kDecodeTraceSlots;
    if (row[kAttnTraceStart] == 0) continue;
    std::fprintf(f, "%d ", c);
    write_trace_row(f, row, t0, kAttnTraceSm, kAttnTraceBlocks);
  }
  std::fclose(f);
}

}  // namespace
}  // namespace decode

cudaError_t run_decode(const DecodeParams& params, void* workspace, cudaStream_t stream) {
  const char* trace_path = std::getenv("MSA_DECODE_TRACE_FILE");
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (trace_path != nullptr && (cudaStreamIsCapturing(stream, &capture) != cudaSuccess ||
                                capture != cudaStreamCaptureStatusNone)) {
    trace_path = nullptr;  // the trace's synchronizing copy cannot be captured: no trace
  }
  DecodeParams p = params;
  p.select_trace = decode::trace_buffer(trace_path);
  if (p.select_trace != nullptr) {
    cudaMemsetAsync(p.select_trace, 0, sizeof(unsigned long long) * 2 * decode::kTraceHalf, stream);
  }
  if (!decode_is_supported(p)) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  decode::DecodeWorkspace w;
  decode::carve(p, workspace, w);
  const bool bf16 = p.dtype == DType::kBF16;

  if (p.appended_tokens > 0) {
    decode::AppendParams ap{decode::CacheGeometry::from(p),
                            static_cast<const uint4*>(p.k_new),
                            static_cast<const uint4*>(p.v_new),
                            static_cast<const uint4*>(p.k_idx_new),
                            static_cast<uint4*>(p.k_cache),
                            static_cast<uint4*>(p.v_cache),
                            static_cast<uint4*>(p.k_idx_cache),
                            p.k_idx_scale,
                            p.s_new,
                            p.num_heads_kv * p.head_dim * 2 / 16,
                            p.head_dim_idx * 2 / 16,
                            p.idx_dtype == DType::kBF16};
    decode::decode_append_kernel<<<p.batch * p.s_new, 128, 0, stream>>>(ap);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }

  const int splits = decode::decode_select_splits(p);
  cudaError_t err;
  const bool idx_bf16 = p.idx_dtype == DType::kBF16;
  const bool fp8 = p.k_idx_scale != nullptr;
  if (p.head_dim_idx == 128) {
    err = fp8 ? (idx_bf16 ? decode::launch_decode_select<decode::BF, 128, true>(p, w, splits, stream)
                          : decode::launch_decode_select<decode::FP, 128, true>(p, w, splits, stream))
              : (idx_bf16 ? decode::launch_decode_select<decode::BF, 128, false>(p, w, splits, stream)
                          : decode::launch_decode_select<decode::FP, 128, false>(p, w, splits, stream));
  } else {
    err = fp8 ? (idx_bf16 ? decode::launch_decode_select<decode::BF, 64, true>(p, w, splits, stream)
                          : decode::launch_decode_select<decode::FP, 64, true>(p, w, splits, stream))
              : (idx_bf16 ? decode::launch_decode_select<decode::BF, 64, false>(p, w, splits, stream)
                          : decode::launch_decode_select<decode::FP, 64, false>(p, w, splits, stream));
  }
  if (err != cudaSuccess) return err;
  if (p.head_dim == 128) {
    err = bf16 ? decode::launch_decode_attn<decode::BF, 128>(p, w, stream)
               : decode::launch_decode_attn<decode::FP, 128>(p, w, stream);
  } else {
    err = bf16 ? decode::launch_decode_attn<decode::BF, 64>(p, w, stream)
               : decode::launch_decode_attn<decode::FP, 64>(p, w, stream);
  }
  if (err == cudaSuccess && p.select_trace != nullptr) {
    const int rows = p.s_new * p.num_heads_kv;
    const int block_q = decode::decode_select_block_q(rows);
    decode::write_trace(trace_path, p.select_trace, splits, (rows + block_q - 1) / block_q, p.batch, fp8, stream);
  }
  return err;
}

}  // namespace msa
