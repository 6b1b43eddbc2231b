// Device helpers shared by the alternating (rnn_pointwise.cu) and persistent (rnn_persistent.cu) kernels: dtype
// conversion, length masking, and the per-element step of every cell around cell_math.h (the one definition of
// the gate math), including the workspace layout of fusedrnn/backends/base.py:
//   lstm  i f g o c [r]     gru  r z n (W_hn h + b_hn)     rnn  (none: y holds h)
// All arithmetic is fp32; half inputs are converted on load and rounded once on store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/ptx.cuh"
#include "cuda/rnn_kernels.h"
#include "fusedrnn/cell_math.h"

namespace fusedrnn::cuda {

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Step t of sequence b is valid iff t < lengths[b] (every step without lengths).
__device__ __forceinline__ bool step_valid(const int64_t* lengths, int b, int t) {
  return lengths == nullptr || t < lengths[b];
}

// The time of the step that ran just before valid step t of a sequence of length len, or -1 when step t started
// from the initial state (a reversed sequence starts at its own last valid step len-1).
__device__ __forceinline__ int previous_time(int t, int len, bool reverse) {
  if (!reverse) return t - 1;
  return t + 1 < len ? t + 1 : -1;
}

// Row width of the workspace [T, B, W] (fusedrnn/backends/base.py).
__device__ __forceinline__ int64_t workspace_width(Cell cell, int H, bool proj) {
  return cell == Cell::LSTM ? (proj ? 6 : 5) * static_cast<int64_t>(H) : cell == Cell::GRU ? 4 * static_cast<int64_t>(H) : 0;
}

// One element (b, j) of one step forward, values only. pre: LSTM i f g o pre-activations (both GEMMs, both
// biases); GRU pre_r, pre_z, x_n = W_in x + b_in, h_n = W_hn h + b_hn; RNN pre. Returns the new output state (LSTM:
// r = o tanh(c), before any projection); *c_new gets the LSTM cell state, ws[] the workspace entries in row order
// (LSTM i f g o c r, GRU r z n h_n; RNN none).
__device__ __forceinline__ float cell_forward_values(Cell cell, const float (&pre)[4], float h_prev, float c_prev,
                                                     float (&ws)[6], float* c_new) {
  if (cell == Cell::LSTM) {
    const LstmState<float> st = lstm_forward<float>(pre[0], pre[1], pre[2], pre[3], c_prev);
    ws[0] = st.i;
    ws[1] = st.f;
    ws[2] = st.g;
    ws[3] = st.o;
    ws[4] = st.c;
    ws[5] = st.r;
    *c_new = st.c;
    return st.r;
  }
  if (cell == Cell::GRU) {
    const GruState<float> st = gru_forward<float>(pre[0], pre[1], pre[2], pre[3], h_prev);
    ws[0] = st.r;
    ws[1] = st.z;
    ws[2] = st.n;
    ws[3] = pre[3];
    return st.h;
  }
  return cell == Cell::RNN_TANH ? rnn_tanh_forward<float>(pre[0]) : rnn_relu_forward<float>(pre[0]);
}

// Writes the workspace entries of element j to its row (the persistent kernels hold them back until the step's
// exchange is published; `ws` needs only the entries the cell has: LSTM 5, 6 with proj; GRU 4).
template <typename T, int N>
__device__ __forceinline__ void store_workspace(Cell cell, const float (&ws)[N], T* ws_row, int H, int j, bool proj) {
  if (cell == Cell::LSTM) {
#pragma unroll
    for (int e = 0; e < 5; ++e) ws_row[e * H + j] = from_f<T>(ws[e]);
    if constexpr (N > 5) {
      if (proj) ws_row[5 * H + j] = from_f<T>(ws[5]);
    }
  } else if (cell == Cell::GRU) {
#pragma unroll
    for (int e = 0; e < 4; ++e) ws_row[e * H + j] = from_f<T>(ws[e]);
  }
}

// One element (b, j) of one step forward: cell_forward_values, and the workspace row written (when given).
template <typename T>
__device__ __forceinline__ float cell_forward(Cell cell, const float (&pre)[4], float h_prev, float c_prev, T* ws_row,
                                              int H, int j, bool proj, float* c_new) {
  float ws[6];
  const float out = cell_forward_values(cell, pre, h_prev, c_prev, ws, c_new);
  if (ws_row != nullptr) store_workspace<T>(cell, ws, ws_row, H, j, proj);
  return out;
}

struct GateGrads {
  float x[4];      // gradients of the x-side pre-activations (rows of grad_xg)
  float h[4];      // gradients of the h-side ones, multiplied by W_hh (GRU: r, z, W_hn h + b_hn; else = x)
  float c_prev;    // LSTM: dL/dc_{t-1}
  float h_direct;  // the part of dL/dh_{t-1} that does not go through W_hh (GRU: z * grad_h)
};

// One valid element (b, j) of one step backward. ws_row: workspace row [W] of step t; prev: LSTM c_{t-1},
// GRU h_{t-1}; y_t: RNN h_t; grad_out: dL/dr_t (LSTM) or dL/dh_t; grad_c: dL/dc_t carried from step t+1.
template <typename T>
__device__ __forceinline__ GateGrads cell_backward(Cell cell, const T* ws_row, int H, int j, float prev, float y_t,
                                                   float grad_out, float grad_c) {
  GateGrads d{};
  if (cell == Cell::LSTM) {
    const LstmGrad<float> g = lstm_backward<float>(to_f(ws_row[j]), to_f(ws_row[H + j]), to_f(ws_row[2 * H + j]),
                                                   to_f(ws_row[3 * H + j]), to_f(ws_row[4 * H + j]), prev,
                                                   grad_out, grad_c);
    d.x[0] = d.h[0] = g.i;
    d.x[1] = d.h[1] = g.f;
    d.x[2] = d.h[2] = g.g;
    d.x[3] = d.h[3] = g.o;
    d.c_prev = g.c_prev;
  } else if (cell == Cell::GRU) {
    const GruGrad<float> g = gru_backward<float>(to_f(ws_row[j]), to_f(ws_row[H + j]), to_f(ws_row[2 * H + j]),
                                                 to_f(ws_row[3 * H + j]), prev, grad_out);
    d.x[0] = d.h[0] = g.r;
    d.x[1] = d.h[1] = g.z;
    d.x[2] = g.n;
    d.h[2] = g.h_n;
    d.h_direct = g.h_prev;
  } else {
    d.x[0] = d.h[0] = cell == Cell::RNN_TANH ? rnn_tanh_backward<float>(y_t, grad_out)
                                             : rnn_relu_backward<float>(y_t, grad_out);
  }
  return d;
}

}  // namespace fusedrnn::cuda
