// Backend "cuda" of fusedrnn::rnn_layer_ext (LayerNorm LSTM / GRU, zoneout; issue #18): the plain C++ interface
// between its two row kernels (rnn_ext.cu, nvcc, no torch headers) and their op glue (rnn_ext_cuda.cpp). The
// contract of the kernels -- arguments, shapes, dtypes, the acc layout, invalid rows -- is the module doc of
// fusedrnn/backends/ext.py; ReferenceRows there is the same in PyTorch ops.
//
// One CTA per batch row (rnn_ext.cu says why), ext_threads(H) threads. Each thread owns the hidden units
// j = tid + k * threads and, of every [G*H] row, the elements g*H + j: all its per-element work reads back
// only what it wrote itself, so the CTA exchanges nothing but the row sums of its block reductions.
// The row cache (fp32: the norms' inputs, then what the backward's later passes need) is dynamic shared memory
// when it fits the device's opt-in limit, else a global fp32 scratch [grid, cache_floats] the glue allocates.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/rnn_kernels.h"  // DType

namespace fusedrnn::cuda::ext {

constexpr int kMaxThreads = 256;          // __launch_bounds__ of both kernels (512: spills on sm_80)
constexpr int kUnitsPerThread = 2;        // threads = H / 2, rounded up to a warp, 32..256
constexpr int kMaxGrid = 4096;            // rows beyond it: the CTAs loop over rows (b += gridDim.x)
constexpr int kDefaultSmem = 48 * 1024;   // dynamic shared memory without cudaFuncSetAttribute
// Static shared memory of either kernel (the block reductions' partial sums, 4 per warp at most): the row cache
// gets the device's opt-in shared memory per block less this (both count against that limit).
constexpr int kStaticSmem = 4 * (kMaxThreads / 32) * static_cast<int>(sizeof(float));

inline int ext_threads(int H) {
  int t = (H + kUnitsPerThread - 1) / kUnitsPerThread;
  t = (t + 31) / 32 * 32;
  return t < 32 ? 32 : t > kMaxThreads ? kMaxThreads : t;
}

inline int ext_grid(int64_t B) { return static_cast<int>(B < kMaxGrid ? B : kMaxGrid); }

// Whether a row cache of `floats` fp32 fits in dynamic shared memory on a device with this opt-in limit.
inline bool ext_cache_in_smem(int64_t floats, int smem_optin) {
  return floats * static_cast<int64_t>(sizeof(float)) + kStaticSmem <= smem_optin;
}

// Row-cache layout, in floats, offsets from the row's cache base (absent parts: -1). GH = G*H.
//   forward   x [GH] | h [GH]  (ax, ah: with the norms)  | c [H] | o [H]  (LSTM with the cell-state norm)
//   backward  x [GH] | h [GH] | d [GH] (gradients of the x-side pre-activations; with the norms)
//             | dhn [H] (GRU with the norms: gradient of the h-side n part) | c [H] | dc [H] (LSTM cell norm)
// Without the norms nothing is cached: every value goes from global memory to registers and back.
struct CacheLayout {
  int64_t x = -1, h = -1, d = -1, dhn = -1, c = -1, o = -1, dc = -1;
  int64_t floats = 0;
};

inline CacheLayout ext_cache_layout(bool lstm, bool ln, bool ln_c, int64_t H, bool backward) {
  CacheLayout l;
  const int64_t GH = (lstm ? 4 : 3) * H;
  int64_t at = 0;
  auto take = [&at](int64_t n) {
    const int64_t o = at;
    at += n;
    return o;
  };
  if (ln) {
    l.x = take(GH);
    l.h = take(GH);
    if (backward) {
      l.d = take(GH);
      if (!lstm) l.dhn = take(H);
    }
  }
  if (lstm && ln_c) {
    l.c = take(H);
    if (backward) {
      l.dc = take(H);
    } else {
      l.o = take(H);
    }
  }
  l.floats = at;
  return l;
}

// Both kernels' arguments. Rows of every [B, n] input are `*_stride` elements apart with unit inner stride;
// outputs are contiguous. Pointers of the dtype of ax ("T") unless typed; float = the acc dtype (fp32).
struct ExtRows {
  int lstm;  // 1: LSTM (gates i f g o), 0: GRU (r z n)
  int B, H;
  const void* ax;  int64_t ax_stride;   // [B, GH]
  const void* ah;  int64_t ah_stride;   // [B, GH]
  const void* b_ih;                     // [GH] or null (b_hh likewise; both or neither)
  const void* b_hh;
  const void* ln_ih;                    // [GH] or null (ln_hh likewise; both or neither)
  const void* ln_hh;
  const void* ln_c_weight;              // [H] or null (LSTM with the norms; ln_c_bias likewise)
  const void* ln_c_bias;
  const void* h_prev;  int64_t h_prev_stride;  // [B, H]
  const void* c_prev;  int64_t c_prev_stride;  // [B, H] (LSTM)
  const void* zoneout_h;  int64_t zoneout_h_stride;  // [B, H] keep-masks or null
  const void* zoneout_c;  int64_t zoneout_c_stride;
  const uint8_t* valid;                 // [B] bool or null (all valid)
  // forward outputs [B, H]
  void* h_new;
  void* c_new;  // LSTM
  void* y;
  // backward inputs
  const float* grad_h;  int64_t grad_h_stride;  // [B, H]
  const void* grad_y;   int64_t grad_y_stride;  // [B, H] T
  const float* grad_c;  int64_t grad_c_stride;  // [B, H] (LSTM)
  float* acc;           int64_t acc_stride;     // [B, P], P = 4GH (+2H LSTM), +=
  // backward outputs
  void* d_ax;           // [B, GH] T
  void* d_ah;           // [B, GH] T
  float* grad_h_prev;   // [B, H]
  float* grad_c_prev;   // [B, H] (LSTM)
  // row cache: null = dynamic shared memory; else [ext_grid(B), cache.floats] fp32 in global memory
  float* scratch;
  CacheLayout cache;  // set by the launch functions (ext_cache_layout)
};

// Launch on `stream`. smem_optin: the device's opt-in dynamic shared memory per block; the row cache must fit
// it unless a.scratch is given. Returns the launch error (cudaSuccess if none).
cudaError_t launch_ext_forward_rows(DType dt, const ExtRows& a, int smem_optin, cudaStream_t stream);
cudaError_t launch_ext_backward_rows(DType dt, const ExtRows& a, int smem_optin, cudaStream_t stream);

}  // namespace fusedrnn::cuda::ext
