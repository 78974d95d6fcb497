// Thin torch binding of the prefix-attention CUDA launcher (forward, for inference).
//
// Builds against any torch with ninja. Without FASTPROMPT_WITH_CUDA (a CPU-only torch) it still
// builds and loads, checks its arguments and refuses with a clear error; with it, it fills the
// plain-C parameter block and calls fastprompt_prefix_attention_fwd on the current stream.

#include <torch/extension.h>

#include "prefix_attention.h"

#ifdef FASTPROMPT_WITH_CUDA
// c10's CUDA headers only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE): the
// binding then compiles against an nvcc-only toolkit, and the tests check it does
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
extern "C" int fastprompt_prefix_attention_fwd(const FastpromptPrefixAttentionParams* params, cudaStream_t stream);
#endif

namespace {

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "fastprompt cuda backend: ", name, " must be a CUDA tensor, got a tensor on ", t.device(),
              " (use backend='cpu' or 'torch' for CPU tensors)");
  TORCH_CHECK(t.device() == q.device(), "fastprompt cuda backend: ", name, " is on ", t.device(), ", q on ", q.device());
  TORCH_CHECK(t.stride(-1) == 1, "fastprompt cuda backend: ", name, " must have a contiguous last (head) dimension");
}

void strides3(const at::Tensor& t, int64_t* out) {
  for (int i = 0; i < 3; ++i) out[i] = t.stride(i);
}

void strides4(const at::Tensor& t, int64_t* out, const at::Tensor& like_q, int64_t seq_k) {
  auto e = t.expand({like_q.size(0), like_q.size(1), like_q.size(2), seq_k});
  for (int i = 0; i < 4; ++i) out[i] = e.stride(i);
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                                const at::Tensor& prefix_v, const c10::optional<at::Tensor>& prompt_ids,
                                const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& bias, bool causal,
                                double scale) {
  check_cuda(q, "q", q);
  check_cuda(k, "k", q);
  check_cuda(v, "v", q);
  check_cuda(prefix_k, "prefix_k", q);
  check_cuda(prefix_v, "prefix_v", q);
  TORCH_CHECK(!(at::GradMode::is_enabled() &&
                (q.requires_grad() || k.requires_grad() || v.requires_grad() || prefix_k.requires_grad() || prefix_v.requires_grad())),
              "fastprompt cuda backend: forward only (inference; it has no backward): run under torch.no_grad(), "
              "or train with backend='aten' or 'triton'");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fastprompt cuda backend: q, k, v must be 4-D");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && prefix_k.scalar_type() == q.scalar_type(),
              "fastprompt cuda backend: q, k, v and the prefix must share one dtype");
  at::Tensor pk = prefix_k.dim() == 3 ? prefix_k.unsqueeze(0) : prefix_k;
  at::Tensor pv = prefix_v.dim() == 3 ? prefix_v.unsqueeze(0) : prefix_v;
  auto out = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
#ifndef FASTPROMPT_WITH_CUDA
  TORCH_CHECK(false, "fastprompt cuda backend: this build has no CUDA kernels (it was built against a CPU-only torch)");
#else
  const c10::cuda::CUDAGuard guard(q.device());  // launch on q's GPU, not the current one
  FastpromptPrefixAttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.prefix_k = pk.data_ptr();
  p.prefix_v = pv.data_ptr();
  at::Tensor ids, m, bi;
  if (prompt_ids) {
    ids = prompt_ids->to(at::kLong).contiguous();
    p.prompt_ids = ids.data_ptr<int64_t>();
  }
  if (mask) {
    m = mask->to(at::kBool);
    p.mask = m.data_ptr<bool>();
    strides4(m, p.mask_stride, q, k.size(2));
  }
  if (bias) {
    bi = bias->to(at::kFloat);
    p.bias = bi.data_ptr();
    strides4(bi, p.bias_stride, q, k.size(2));
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  strides3(q, p.q_stride);
  strides3(k, p.k_stride);
  strides3(v, p.v_stride);
  strides3(pk, p.prefix_stride);
  strides3(pv, p.prefix_v_stride);
  strides3(out, p.out_stride);
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.seq_q = q.size(2);
  p.seq_k = k.size(2);
  p.prefix_len = pk.size(2);
  p.head_dim = q.size(3);
  p.causal = causal ? 1 : 0;
  p.scale = static_cast<float>(scale);
  p.dtype = q.scalar_type() == at::kFloat ? FASTPROMPT_F32 : q.scalar_type() == at::kHalf ? FASTPROMPT_F16 : FASTPROMPT_BF16;
  const int rc = fastprompt_prefix_attention_fwd(&p, c10::cuda::getCurrentCUDAStream(q.device().index()).stream());
  TORCH_CHECK(rc == 0, "fastprompt cuda backend: launch failed with code ", rc);
#endif
  return {out, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "prefix attention forward: (out (B, H, S, D), lse (B, H, S))");
}
