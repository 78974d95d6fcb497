// Parameters of the prefix-attention CUDA launcher: plain C, shared by the .cu and the binding.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum FastpromptDtype { FASTPROMPT_F32 = 0, FASTPROMPT_F16 = 1, FASTPROMPT_BF16 = 2 };

// Shapes: q (B, H, Sq, D), k/v (B, Hkv, Sk, D), prefix (T, Hkv, P, D) (T = 1 without a bank),
// out (B, H, Sq, D); strides in elements, the head dim contiguous. mask: bool read through four
// strides (0 where it broadcasts) over (B, H, Sq, Sk); bias likewise, float32. lse: (B*H*Sq)
// float32, natural log, may be null. scale multiplies q.k.
typedef struct FastpromptPrefixAttentionParams {
  const void* q;
  const void* k;
  const void* v;
  const void* prefix_k;
  const void* prefix_v;
  const int64_t* prompt_ids;  // (B,) or null
  const bool* mask;           // or null
  const void* bias;           // float32, or null
  void* out;
  float* lse;
  int64_t q_stride[3], k_stride[3], v_stride[3], prefix_stride[3], prefix_v_stride[3], out_stride[3];
  int64_t mask_stride[4], bias_stride[4];
  int batch, heads, kv_heads, seq_q, seq_k, prefix_len, head_dim;
  int causal;
  float scale;
  int dtype;  // FastpromptDtype
} FastpromptPrefixAttentionParams;

#ifdef __CUDACC__
int fastprompt_prefix_attention_fwd(const FastpromptPrefixAttentionParams* params, cudaStream_t stream);
#endif

#ifdef __cplusplus
}
#endif
