// Backend "cuda" of fusedrnn::beam_topk: the plain C++ interface between the kernels (beam_topk.cu, nvcc,
// no torch headers) and their registration (beam_topk_registration.cpp). Raw pointers, a dtype tag, a stream.
// Semantics, tie rule and -inf/NaN policy: fusedrnn/reference_decoding.py.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fusedrnn::cuda::beam {

enum class LogitsType : int { F32 = 0, F16 = 1, BF16 = 2 };

constexpr int kMaxK = 128;       // = fusedrnn.reference_decoding.MAX_KERNEL_K
constexpr int kPartialThreads = 128;
constexpr int kPartialUnroll = 4;  // elements per thread per tile: a tile is 128 * 4 = 512 logits

struct BeamTopkArgs {
  const void* logits;        // [R, V] rows row_stride apart, unit stride inside a row
  int64_t row_stride;
  LogitsType dtype;
  const float* beam_scores;  // [R]
  int64_t R, V;              // R = B * K
  int K, k;                  // beams per item, candidates to return (1 <= k <= min(kMaxK, K*V))
  int num_splits;            // vocab slices per row (stage 1 grid.y)
  int64_t chunk;             // logits per slice (the last slice may be shorter)
  // workspace
  uint64_t* part_keys;       // [R, num_splits, k]
  float* part_m;             // [R, num_splits]
  float* part_s;             // [R, num_splits]
  int* part_bad;             // [R, num_splits]
  int64_t* row_tokens;       // [R, k]
  // outputs, [B, k]
  float* scores;
  int64_t* tokens;
  int64_t* parents;
};

// (num_splits, chunk) for R rows of V logits on a GPU with num_sms SMs.
void choose_splits(int64_t R, int64_t V, int num_sms, int* num_splits, int64_t* chunk);

// Launches both stages on `stream`; returns the first launch error (cudaSuccess if none).
cudaError_t launch_beam_topk(const BeamTopkArgs& args, cudaStream_t stream);

}  // namespace fusedrnn::cuda::beam
