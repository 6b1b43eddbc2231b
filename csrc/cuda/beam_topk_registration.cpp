// Registration of the CUDA beam_topk kernels (beam_topk.cu) as the torch op
//
//   fusedrnn::cuda_beam_topk(Tensor logits [B*K, V], Tensor beam_scores [B*K], int k, int num_beams)
//       -> (scores [B, k] fp32, tokens [B, k] int64, parents [B, k] int64)
//
// Validates, allocates the workspace and outputs, picks the vocab split count and launches on the current
// stream. Compiled only with the CUDA kernels (FUSEDRNN_WITH_CUDA, see setup.py).
// Built twice, like rnn_layer_cuda.cpp: FUSEDRNN_WITH_CUDA (CUDA tensors) and FUSEDRNN_EMU (cuda-emu, CPU tensors).
#if defined(FUSEDRNN_WITH_CUDA) || defined(FUSEDRNN_EMU)

#include "cuda/op_glue.h"

#include <array>
#include <tuple>

#include "cuda/beam_topk.h"

namespace fusedrnn::cuda::beam {
namespace {

using at::Tensor;

// SM count per device, cached: the split heuristic needs it every call. (ATen/cuda/CUDAContext.h would give
// it too but pulls in cusparse.h, which the CUDA toolkit of the build machines lacks.)
int num_sms(int device) {
  static std::array<int, 64> cache{};
  if (device < 0 || device >= static_cast<int>(cache.size())) return 132;
  if (cache[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device] = n;
  }
  return cache[device];
}

std::tuple<Tensor, Tensor, Tensor> cuda_beam_topk(const Tensor& logits_in, const Tensor& beam_scores_in, int64_t k,
                                                  int64_t num_beams) {
#ifdef FUSEDRNN_EMU
  TORCH_CHECK(logits_in.is_cpu(), "fusedrnn cuda_beam_topk: logits must be " FUSEDRNN_CUDA_TENSORS);
#else
  TORCH_CHECK(logits_in.is_cuda(), "fusedrnn cuda_beam_topk: logits must be a CUDA tensor");
#endif
  TORCH_CHECK(logits_in.dim() == 2, "fusedrnn cuda_beam_topk: logits must be 2-D [batch*beams, vocab]");
  const int64_t R = logits_in.size(0), V = logits_in.size(1);
  TORCH_CHECK(num_beams > 0 && R > 0 && V > 0 && R % num_beams == 0, "fusedrnn cuda_beam_topk: logits rows (",
              R, ") must be a positive multiple of num_beams (", num_beams, ")");
  TORCH_CHECK(beam_scores_in.numel() == R, "fusedrnn cuda_beam_topk: beam_scores must have one element per row");
  TORCH_CHECK(k >= 1 && k <= kMaxK && k <= num_beams * V, "fusedrnn cuda_beam_topk: k=", k,
              " must be in [1, min(", kMaxK, ", num_beams*vocab)]");
  TORCH_CHECK(V < (int64_t(1) << 32) - 1, "fusedrnn cuda_beam_topk: vocab must be < 2^32 - 1");
  TORCH_CHECK(num_beams * k < (int64_t(1) << 31), "fusedrnn cuda_beam_topk: num_beams*k too large");
  LogitsType dtype;
  switch (logits_in.scalar_type()) {
    case at::kFloat: dtype = LogitsType::F32; break;
    case at::kHalf: dtype = LogitsType::F16; break;
    case at::kBFloat16: dtype = LogitsType::BF16; break;
    default:
      TORCH_CHECK(false, "fusedrnn cuda_beam_topk: logits must be float16/bfloat16/float32, got ",
                  logits_in.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const Tensor beam_scores = beam_scores_in.reshape({R}).to(logits.device(), at::kFloat).contiguous();
  const int64_t B = R / num_beams;

  BeamTopkArgs a{};
  a.logits = logits.const_data_ptr();
  a.row_stride = logits.stride(0);
  a.dtype = dtype;
  a.beam_scores = beam_scores.const_data_ptr<float>();
  a.R = R;
  a.V = V;
  a.K = static_cast<int>(num_beams);
  a.k = static_cast<int>(k);
  choose_splits(R, V, num_sms(logits.get_device()), &a.num_splits, &a.chunk);

  const auto opts = logits.options();
  Tensor part_keys = at::empty({R, a.num_splits, k}, opts.dtype(at::kLong));  // uint64 bits
  Tensor part_m = at::empty({R, a.num_splits}, opts.dtype(at::kFloat));
  Tensor part_s = at::empty({R, a.num_splits}, opts.dtype(at::kFloat));
  Tensor part_bad = at::empty({R, a.num_splits}, opts.dtype(at::kInt));
  Tensor row_tokens = at::empty({R, k}, opts.dtype(at::kLong));
  Tensor scores = at::empty({B, k}, opts.dtype(at::kFloat));
  Tensor tokens = at::empty({B, k}, opts.dtype(at::kLong));
  Tensor parents = at::empty({B, k}, opts.dtype(at::kLong));
  a.part_keys = reinterpret_cast<uint64_t*>(part_keys.mutable_data_ptr<int64_t>());
  a.part_m = part_m.mutable_data_ptr<float>();
  a.part_s = part_s.mutable_data_ptr<float>();
  a.part_bad = part_bad.mutable_data_ptr<int>();
  a.row_tokens = row_tokens.mutable_data_ptr<int64_t>();
  a.scores = scores.mutable_data_ptr<float>();
  a.tokens = tokens.mutable_data_ptr<int64_t>();
  a.parents = parents.mutable_data_ptr<int64_t>();
  C10_CUDA_CHECK(launch_beam_topk(a, c10::cuda::getCurrentCUDAStream()));
  return {scores, tokens, parents};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def(FUSEDRNN_CUDA_OP("beam_topk(Tensor logits, Tensor beam_scores, int k, int num_beams) -> (Tensor, Tensor, Tensor)"));
}

TORCH_LIBRARY_IMPL(fusedrnn, FUSEDRNN_CUDA_KEY, m) {
  m.impl(FUSEDRNN_CUDA_OP("beam_topk"), &cuda_beam_topk);
}

}  // namespace fusedrnn::cuda::beam

#endif  // FUSEDRNN_WITH_CUDA || FUSEDRNN_EMU
