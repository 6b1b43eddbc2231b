// Alternating path: the ONE fused pointwise kernel of each step, forward and backward (the GEMM of the step is a
// cuBLAS call in rnn_layer_cuda.cpp). One thread per element (b, j) of [B, H]; every cell in one kernel (the
// cell is uniform across the grid, so the switch costs no divergence) to keep the instantiations at 3 dtypes.
#include "cuda/rnn_device.cuh"

namespace fusedrnn::cuda {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <typename T>
__global__ __launch_bounds__(kThreads) void rnn_alt_forward_kernel(const AltForwardStep p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= static_cast<int64_t>(p.B) * p.H) return;
  const int b = static_cast<int>(idx / p.H), j = static_cast<int>(idx % p.H);
  const Cell cell = static_cast<Cell>(p.cell);
  const int G = num_gates(cell), GH = G * p.H;
  const bool valid = step_valid(p.lengths, b, p.t);
  const bool proj = p.r_out != nullptr;
  const T* xg = static_cast<const T*>(p.x_gates) + (static_cast<int64_t>(p.t) * p.B + b) * GH;
  const float* hg = p.h_gates + static_cast<int64_t>(b) * GH;

  float pre[4] = {0.f, 0.f, 0.f, 0.f};
  if (cell == Cell::GRU) {  // n: the x part and the h part (with b_hn) stay apart
    pre[0] = to_f(xg[j]) + hg[j];
    pre[1] = to_f(xg[p.H + j]) + hg[p.H + j];
    pre[2] = to_f(xg[2 * p.H + j]);
    pre[3] = hg[2 * p.H + j] + (p.b_hn != nullptr ? to_f(static_cast<const T*>(p.b_hn)[j]) : 0.f);
  } else {
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      if (g < G) pre[g] = to_f(xg[g * p.H + j]) + hg[g * p.H + j];
    }
  }
  const int64_t hs = static_cast<int64_t>(b) * p.H_out + j;  // state index (H_out == H without projection)
  const int64_t cs = static_cast<int64_t>(b) * p.H + j;
  T* ws_row = p.ws != nullptr ? static_cast<T*>(p.ws) + (static_cast<int64_t>(p.t) * p.B + b) * workspace_width(cell, p.H, proj)
                              : nullptr;
  const float h_prev = proj ? 0.f : p.h_state[hs];
  const float c_prev = cell == Cell::LSTM ? p.c_state[cs] : 0.f;
  float c_new = 0.f;
  const float out = cell_forward<T>(cell, pre, h_prev, c_prev, ws_row, p.H, j, proj, &c_new);
  if (cell == Cell::LSTM && valid) p.c_state[cs] = c_new;
  if (proj) {  // projected, masked and stored by rnn_alt_proj_forward_kernel after the W_hr GEMM
    static_cast<T*>(p.r_out)[cs] = from_f<T>(out);
    return;
  }
  const float h = valid ? out : h_prev;
  p.h_state[hs] = h;
  if (p.h_gemm != nullptr) static_cast<T*>(p.h_gemm)[hs] = from_f<T>(h);
  static_cast<T*>(p.y)[static_cast<int64_t>(p.t) * p.B * p.H_out + hs] = from_f<T>(valid ? out : 0.f);
}

template <typename T>
__global__ __launch_bounds__(kThreads) void rnn_alt_proj_forward_kernel(const AltProjForwardStep p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= static_cast<int64_t>(p.B) * p.H_out) return;
  const int b = static_cast<int>(idx / p.H_out);
  const bool valid = step_valid(p.lengths, b, p.t);
  const float h = valid ? p.h_proj[idx] : p.h_state[idx];
  p.h_state[idx] = h;
  if (p.h_gemm != nullptr) static_cast<T*>(p.h_gemm)[idx] = from_f<T>(h);
  static_cast<T*>(p.y)[static_cast<int64_t>(p.t) * p.B * p.H_out + idx] = from_f<T>(valid ? h : 0.f);
}

template <typename T>
__global__ __launch_bounds__(kThreads) void rnn_alt_backward_kernel(const AltBackwardStep p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= static_cast<int64_t>(p.B) * p.H) return;
  const int b = static_cast<int>(idx / p.H), j = static_cast<int>(idx % p.H);
  const Cell cell = static_cast<Cell>(p.cell);
  const int G = num_gates(cell), GH = G * p.H;
  const bool proj = p.grad_r != nullptr;
  const int64_t W = workspace_width(cell, p.H, proj);
  const int64_t row = static_cast<int64_t>(p.t) * p.B + b;
  const int len = p.lengths != nullptr ? static_cast<int>(p.lengths[b]) : p.T;
  const bool valid = p.t < len;
  const int64_t hs = static_cast<int64_t>(b) * p.H_out + j, cs = static_cast<int64_t>(b) * p.H + j;

  GateGrads d{};
  if (valid) {
    const float grad_out =
        proj ? p.grad_r[cs] : p.grad_h[hs] + to_f(static_cast<const T*>(p.grad_y)[row * p.H_out + j]);
    const T* ws_row = static_cast<const T*>(p.ws) + row * W;
    float prev = 0.f, y_t = 0.f, grad_c = 0.f;
    if (cell == Cell::LSTM) {
      const int tp = previous_time(p.t, len, p.reverse != 0);
      prev = tp >= 0 ? to_f(static_cast<const T*>(p.ws)[(static_cast<int64_t>(tp) * p.B + b) * W + 4 * p.H + j])
                     : to_f(static_cast<const T*>(p.c0)[cs]);
      grad_c = p.grad_c[cs];
    } else if (cell == Cell::GRU) {
      prev = to_f(static_cast<const T*>(p.h_prev)[row * p.H + j]);
    } else {
      y_t = to_f(static_cast<const T*>(p.y)[row * p.H_out + j]);
    }
    d = cell_backward<T>(cell, ws_row, p.H, j, prev, y_t, grad_out, grad_c);
    if (cell == Cell::LSTM) p.grad_c[cs] = d.c_prev;
  }
  // Invalid steps did nothing: zero gate gradients, the state gradients pass through unchanged.
  if (!proj) p.grad_h_next[hs] = valid ? d.h_direct : p.grad_h[hs];
  T* gx = static_cast<T*>(p.grad_xg) + row * GH;
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    if (g < G) gx[g * p.H + j] = from_f<T>(d.x[g]);
  }
  if (cell == Cell::GRU) {
    T* gh = static_cast<T*>(p.grad_hg) + row * GH;
#pragma unroll
    for (int g = 0; g < 3; ++g) gh[g * p.H + j] = from_f<T>(d.h[g]);
  }
}

template <typename T>
__global__ __launch_bounds__(kThreads) void rnn_alt_proj_backward_kernel(const AltProjBackwardStep p) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= static_cast<int64_t>(p.B) * p.H_out) return;
  const int b = static_cast<int>(idx / p.H_out);
  const bool valid = step_valid(p.lengths, b, p.t);
  const int64_t row = static_cast<int64_t>(p.t) * p.B * p.H_out + idx;
  const float g = valid ? p.grad_h[idx] + to_f(static_cast<const T*>(p.grad_y)[row]) : 0.f;
  static_cast<T*>(p.grad_out)[row] = from_f<T>(g);
  p.grad_h_next[idx] = valid ? 0.f : p.grad_h[idx];
}

template <template <typename> class Launch, typename P>
cudaError_t dispatch(DType dt, const P& p, cudaStream_t stream) {
  switch (dt) {
    case DType::F32: Launch<float>::run(p, stream); break;
    case DType::F16: Launch<__half>::run(p, stream); break;
    case DType::BF16: Launch<__nv_bfloat16>::run(p, stream); break;
  }
  return cudaGetLastError();
}

template <typename T>
struct ForwardLaunch {
  static void run(const AltForwardStep& p, cudaStream_t s) {
    FUSEDRNN_LAUNCH(blocks_for(static_cast<int64_t>(p.B) * p.H), kThreads, 0, s, rnn_alt_forward_kernel<T>)(p);
  }
};
template <typename T>
struct ProjForwardLaunch {
  static void run(const AltProjForwardStep& p, cudaStream_t s) {
    FUSEDRNN_LAUNCH(blocks_for(static_cast<int64_t>(p.B) * p.H_out), kThreads, 0, s, rnn_alt_proj_forward_kernel<T>)(p);
  }
};
template <typename T>
struct BackwardLaunch {
  static void run(const AltBackwardStep& p, cudaStream_t s) {
    FUSEDRNN_LAUNCH(blocks_for(static_cast<int64_t>(p.B) * p.H), kThreads, 0, s, rnn_alt_backward_kernel<T>)(p);
  }
};
template <typename T>
struct ProjBackwardLaunch {
  static void run(const AltProjBackwardStep& p, cudaStream_t s) {
    FUSEDRNN_LAUNCH(blocks_for(static_cast<int64_t>(p.B) * p.H_out), kThreads, 0, s, rnn_alt_proj_backward_kernel<T>)(p);
  }
};

}  // namespace

cudaError_t launch_alt_forward_step(DType dt, const AltForwardStep& p, cudaStream_t stream) {
  return dispatch<ForwardLaunch>(dt, p, stream);
}
cudaError_t launch_alt_proj_forward_step(DType dt, const AltProjForwardStep& p, cudaStream_t stream) {
  return dispatch<ProjForwardLaunch>(dt, p, stream);
}
cudaError_t launch_alt_backward_step(DType dt, const AltBackwardStep& p, cudaStream_t stream) {
  return dispatch<BackwardLaunch>(dt, p, stream);
}
cudaError_t launch_alt_proj_backward_step(DType dt, const AltProjBackwardStep& p, cudaStream_t stream) {
  return dispatch<ProjBackwardLaunch>(dt, p, stream);
}

}  // namespace fusedrnn::cuda
