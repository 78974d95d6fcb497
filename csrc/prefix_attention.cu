// Prefix-concat attention forward in CUDA C++ (inference path of the `cuda` backend).
//
// One warp per query row: each lane holds D/32 of the head dim; the row walks the P prefix keys
// (shared by the batch, or the example's prompt in a bank) and then its own sequence keys with
// one online softmax in fp32, and writes the output and the row's log-sum-exp. The prefix is
// read in place: never concatenated, never copied per example.
//
// No torch headers here: the launcher is plain `extern "C"` taking a cudaStream_t, so this file
// compiles with nvcc alone (tests build it for sm_80 and sm_90) and the thin binding in
// prefix_attention_binding.cpp links against it.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "prefix_attention.h"

namespace {

constexpr int kWarp = 32;
constexpr int kMaxPerLane = 4;  // head dims up to 128

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

struct RowState {
  float m = -INFINITY;  // running max (natural log domain)
  float l = 0.f;        // running sum of exp(s - m)
  float acc[kMaxPerLane] = {0.f, 0.f, 0.f, 0.f};
};

template <typename T>
__device__ __forceinline__ void attend(RowState& st, const float (&q)[kMaxPerLane], const T* key, const T* value,
                                       int d, int lane, float score_bias) {
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int j = lane + i * kWarp;
    if (j < d) dot += q[i] * to_float(key[j]);
  }
  const float s = warp_sum(dot) + score_bias;
  const float m_new = fmaxf(st.m, s);
  const float alpha = __expf(st.m - m_new);
  const float p = __expf(s - m_new);
  st.l = st.l * alpha + p;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int j = lane + i * kWarp;
    st.acc[i] = st.acc[i] * alpha + (j < d ? p * to_float(value[j]) : 0.f);
  }
  st.m = m_new;
}

template <typename T>
__global__ void prefix_attention_fwd_kernel(FastpromptPrefixAttentionParams p) {
  const int warps_per_block = blockDim.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps_per_block + threadIdx.x / kWarp;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seq_q;
  if (row >= rows) return;
  const int m = static_cast<int>(row % p.seq_q);
  const int h = static_cast<int>((row / p.seq_q) % p.heads);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.seq_q) * p.heads));
  const int hkv = h / (p.heads / p.kv_heads);
  const int t = p.prompt_ids ? static_cast<int>(p.prompt_ids[b]) : 0;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + m * p.q_stride[2];
  float qf[kMaxPerLane];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int j = lane + i * kWarp;
    qf[i] = j < p.head_dim ? to_float(q[j]) * p.scale : 0.f;
  }

  RowState st;
  const T* pk = static_cast<const T*>(p.prefix_k) + t * p.prefix_stride[0] + hkv * p.prefix_stride[1];
  const T* pv = static_cast<const T*>(p.prefix_v) + t * p.prefix_v_stride[0] + hkv * p.prefix_v_stride[1];
  for (int n = 0; n < p.prefix_len; ++n) {
    attend(st, qf, pk + n * p.prefix_stride[2], pv + n * p.prefix_v_stride[2], p.head_dim, lane, 0.f);
  }
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hkv * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hkv * p.v_stride[1];
  const int shift = p.seq_k - p.seq_q;  // causal masks align bottom-right (cached decoding)
  for (int n = 0; n < p.seq_k; ++n) {
    if (p.causal && n > m + shift) break;
    if (p.mask) {
      const int64_t off = b * p.mask_stride[0] + h * p.mask_stride[1] + m * p.mask_stride[2] + n * p.mask_stride[3];
      if (!p.mask[off]) continue;
    }
    float bias = 0.f;
    if (p.bias) {
      const int64_t off = b * p.bias_stride[0] + h * p.bias_stride[1] + m * p.bias_stride[2] + n * p.bias_stride[3];
      bias = static_cast<const float*>(p.bias)[off];
    }
    attend(st, qf, k + n * p.k_stride[2], v + n * p.v_stride[2], p.head_dim, lane, bias);
  }

  T* out = static_cast<T*>(p.out) + b * p.out_stride[0] + h * p.out_stride[1] + m * p.out_stride[2];
  const float inv = 1.f / st.l;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int j = lane + i * kWarp;
    if (j < p.head_dim) out[j] = from_float<T>(st.acc[i] * inv);
  }
  if (lane == 0 && p.lse) p.lse[row] = st.m + __logf(st.l);
}

}  // namespace

extern "C" int fastprompt_prefix_attention_fwd(const FastpromptPrefixAttentionParams* params, cudaStream_t stream) {
  const FastpromptPrefixAttentionParams& p = *params;
  if (p.head_dim > kWarp * kMaxPerLane || p.head_dim <= 0) return 1;
  if (p.kv_heads <= 0 || p.heads % p.kv_heads != 0 || p.prefix_len <= 0) return 2;
  const int threads = 128;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.seq_q;
  const int64_t blocks = (rows + threads / kWarp - 1) / (threads / kWarp);
  if (blocks == 0) return 0;
  switch (p.dtype) {
    case FASTPROMPT_F32: prefix_attention_fwd_kernel<float><<<blocks, threads, 0, stream>>>(p); break;
    case FASTPROMPT_F16: prefix_attention_fwd_kernel<__half><<<blocks, threads, 0, stream>>>(p); break;
    case FASTPROMPT_BF16: prefix_attention_fwd_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(p); break;
    default: return 3;
  }
  return cudaGetLastError() == cudaSuccess ? 0 : 4;
}
