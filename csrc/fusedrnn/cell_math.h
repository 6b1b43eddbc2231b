// Per-element gate math of every cell, forward and backward: the one definition in C++ of what
// fusedrnn/reference.py specifies. Included by the CPU kernels (csrc/cpu) and, compiled by nvcc as
// __host__ __device__, by the CUDA kernels (csrc/cuda). T is the compute type (float or double); callers
// convert half inputs to float before and after.
//
// Pre-activations passed in include both GEMMs and both biases, except GRU's n gate, whose recurrent part
// (W_hn h + b_hn) is multiplied by r and so arrives separately.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define FUSEDRNN_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: the CPU kernels call these from multiversioned (AVX-512 / AVX2) loops, and only inlined
// code gets the caller's instruction set and vectorizes.
#define FUSEDRNN_HOST_DEVICE __attribute__((always_inline)) inline
#else
#define FUSEDRNN_HOST_DEVICE inline
#endif

namespace fusedrnn {

#if !defined(__CUDA_ARCH__)
// exp for fp32 on the CPU: branch-free Cody-Waite range reduction + degree-6 polynomial (Cephes expf),
// within 2 ulp of expf on [-87, 87] (clamped outside). Why: libm's expf/tanhf are scalar calls, ~10-20 ns each, and an LSTM
// step needs five per element: at T=64, B=16, H=256 that was 16 ms of a 34 ms forward. This form
// auto-vectorizes (16 lanes with AVX-512).
FUSEDRNN_HOST_DEVICE float exp_approx(float x) {
  // Clamp to |x| <= 87 and floor by truncating a positive value: written so, GCC 12 vectorizes the loops that
  // call this (a two-sided clamp or std::floor left them scalar). NaN stays NaN.
  float ax = x < 0.0f ? -x : x;
  ax = ax > 87.0f ? 87.0f : ax;
  x = __builtin_copysignf(ax, x);
  const int32_t ni = static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128;  // floor(x/ln2 + 0.5)
  const float n = static_cast<float>(ni);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
#endif

FUSEDRNN_HOST_DEVICE float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_approx(x);
#endif
}
FUSEDRNN_HOST_DEVICE double exp_(double x) { return exp(x); }
FUSEDRNN_HOST_DEVICE float tanh_(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  // 1 - 2/(e^2x + 1): absolute error ~1e-7 (fp32 rounding), exact limits +-1, no NaN at +-inf inputs.
  return 1.0f - 2.0f / (exp_approx(2.0f * x) + 1.0f);
#endif
}
FUSEDRNN_HOST_DEVICE double tanh_(double x) { return tanh(x); }

template <typename T>
FUSEDRNN_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));  // exp overflows to inf for x < -88 (fp32): the result is 0, not NaN
}

enum class Cell : int { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };

FUSEDRNN_HOST_DEVICE constexpr int num_gates(Cell cell) {
  return cell == Cell::LSTM ? 4 : cell == Cell::GRU ? 3 : 1;
}

// ---------------------------------------------------------------------------------------------------
// LSTM: gates i, f, g, o.  c = f*c_prev + i*g;  r = o*tanh(c)  (h = r, or W_hr r with a projection)
// ---------------------------------------------------------------------------------------------------
template <typename T>
struct LstmState {
  T i, f, g, o;  // activated gates
  T c, r;
};

// The gates and the new cell state; r is left to the caller (the LayerNorm LSTM takes tanh of LN(c), whose
// row statistics need every unit's c first).
template <typename T>
FUSEDRNN_HOST_DEVICE LstmState<T> lstm_state_forward(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev) {
  LstmState<T> s;
  s.i = sigmoid(pre_i);
  s.f = sigmoid(pre_f);
  s.g = tanh_(pre_g);
  s.o = sigmoid(pre_o);
  s.c = s.f * c_prev + s.i * s.g;
  s.r = T(0);
  return s;
}

template <typename T>
FUSEDRNN_HOST_DEVICE LstmState<T> lstm_forward(T pre_i, T pre_f, T pre_g, T pre_o, T c_prev) {
  LstmState<T> s = lstm_state_forward(pre_i, pre_f, pre_g, pre_o, c_prev);
  s.r = s.o * tanh_(s.c);
  return s;
}

template <typename T>
struct LstmGrad {
  T i, f, g, o;  // gradients of the pre-activations
  T c_prev;
};

// grad_r: gradient reaching r = o*tanh(c) (after back-projection); grad_c: gradient reaching c from step t+1.
template <typename T>
FUSEDRNN_HOST_DEVICE LstmGrad<T> lstm_backward(T i, T f, T g, T o, T c, T c_prev, T grad_r, T grad_c) {
  const T tanh_c = tanh_(c);
  const T grad_c_total = grad_c + grad_r * o * (T(1) - tanh_c * tanh_c);
  LstmGrad<T> d;
  d.i = grad_c_total * g * i * (T(1) - i);
  d.f = grad_c_total * c_prev * f * (T(1) - f);
  d.g = grad_c_total * i * (T(1) - g * g);
  d.o = grad_r * tanh_c * o * (T(1) - o);
  d.c_prev = grad_c_total * f;
  return d;
}

// The two halves of lstm_backward, for the LayerNorm LSTM (r = o * tanh(n), n = LN(c) * w + b), where the
// gradient of c comes from n through the norm's row reduction in between.
template <typename T>
struct LstmOutputGrad {
  T o;  // gradient of pre_o
  T n;  // gradient of n, the argument of the output tanh
};

template <typename T>
FUSEDRNN_HOST_DEVICE LstmOutputGrad<T> lstm_output_backward(T o, T tanh_n, T grad_r) {
  LstmOutputGrad<T> d;
  d.o = grad_r * tanh_n * o * (T(1) - o);
  d.n = grad_r * o * (T(1) - tanh_n * tanh_n);
  return d;
}

// grad_c_total: the whole gradient of c_t (from its norm and from step t+1). d.c_prev: its direct part.
template <typename T>
FUSEDRNN_HOST_DEVICE LstmGrad<T> lstm_state_backward(T i, T f, T g, T c_prev, T grad_c_total) {
  LstmGrad<T> d;
  d.i = grad_c_total * g * i * (T(1) - i);
  d.f = grad_c_total * c_prev * f * (T(1) - f);
  d.g = grad_c_total * i * (T(1) - g * g);
  d.o = T(0);
  d.c_prev = grad_c_total * f;
  return d;
}

// ---------------------------------------------------------------------------------------------------
// LayerNorm over one row (the G*H pre-activations of a sequence, or the LSTM's H cell states) and zoneout
// (issue #18; spec: fusedrnn/reference.py rnn_layer_ext). The row reductions belong to the caller (a loop on
// the CPU, a warp or block reduction on the GPU); these are the per-element parts. Statistics in T:
// mean, then rstd = 1/sqrt(mean((v - mean)^2) + eps) from the centred values (two passes: one pass of
// sum and sum of squares loses the variance to cancellation when |mean| >> std).
// ---------------------------------------------------------------------------------------------------
constexpr double kLayerNormEps = 1e-5;  // reference.LN_EPS, torch.nn.LayerNorm's default

FUSEDRNN_HOST_DEVICE float layer_norm_rstd(float mean_centred_square) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(mean_centred_square + float(kLayerNormEps));
#else
  return 1.0f / std::sqrt(mean_centred_square + float(kLayerNormEps));
#endif
}
FUSEDRNN_HOST_DEVICE double layer_norm_rstd(double mean_centred_square) {
  return 1.0 / std::sqrt(mean_centred_square + kLayerNormEps);
}

// Gradient of v from g = (gradient of the normed output) * gain, with normed = (v - mean) * rstd and the
// row means mean_g = mean(g), mean_gn = mean(g * normed).
template <typename T>
FUSEDRNN_HOST_DEVICE T layer_norm_backward(T g, T normed, T rstd, T mean_g, T mean_gn) {
  return rstd * (g - mean_g - normed * mean_gn);
}

// Zoneout: the unit keeps its previous value where the keep-mask is nonzero.
template <typename T>
FUSEDRNN_HOST_DEVICE T zoneout(T keep, T previous, T next) {
#if !defined(__CUDA_ARCH__)
  // On the CPU the same select on the bits. Written as ?:, GCC 12 sinks the math computing `next` into a branch
  // of the select and then leaves the loop scalar (float math may trap, so it is not if-converted back): the
  // CPU's LayerNorm GRU rows (csrc/cpu/rnn_ext.cpp) ran 4.5x slower so (B=16, H=256, fp32).
  if constexpr (sizeof(T) == 4 || sizeof(T) == 8) {
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    Bits p, n;
    std::memcpy(&p, &previous, sizeof(T));
    std::memcpy(&n, &next, sizeof(T));
    const Bits mask = Bits(0) - Bits(keep != T(0));
    const Bits out = (p & mask) | (n & ~mask);
    T result;
    std::memcpy(&result, &out, sizeof(T));
    return result;
  }
#endif
  return keep != T(0) ? previous : next;
}

// ---------------------------------------------------------------------------------------------------
// GRU (reset-after, PyTorch's): r, z from x- and h-parts; n = tanh(x_n + r*h_n); h = (1-z)*n + z*h_prev
// with x_* = W_i* x + b_i* and h_* = W_h* h_prev + b_h*.
// ---------------------------------------------------------------------------------------------------
template <typename T>
struct GruState {
  T r, z, n, h;
};

template <typename T>
FUSEDRNN_HOST_DEVICE GruState<T> gru_forward(T pre_r, T pre_z, T x_n, T h_n, T h_prev) {
  GruState<T> s;
  s.r = sigmoid(pre_r);
  s.z = sigmoid(pre_z);
  s.n = tanh_(x_n + s.r * h_n);
  s.h = (T(1) - s.z) * s.n + s.z * h_prev;
  return s;
}

template <typename T>
struct GruGrad {
  T r, z, n;     // gradients of pre_r, pre_z and of x_n (the x-side n pre-activation)
  T h_n;         // gradient of h_n = W_hn h_prev + b_hn  (= n * r)
  T h_prev;      // direct part of the gradient of h_prev (the GEMM part comes from the gate gradients)
};

template <typename T>
FUSEDRNN_HOST_DEVICE GruGrad<T> gru_backward(T r, T z, T n, T h_n, T h_prev, T grad_h) {
  GruGrad<T> d;
  d.n = grad_h * (T(1) - z) * (T(1) - n * n);
  d.h_n = d.n * r;
  d.r = d.n * h_n * r * (T(1) - r);
  d.z = grad_h * (h_prev - n) * z * (T(1) - z);
  d.h_prev = grad_h * z;
  return d;
}

// ---------------------------------------------------------------------------------------------------
// Elman RNN: h = tanh(pre) or relu(pre). The derivative is read from h itself.
// ---------------------------------------------------------------------------------------------------
template <typename T>
FUSEDRNN_HOST_DEVICE T rnn_tanh_forward(T pre) { return tanh_(pre); }

template <typename T>
FUSEDRNN_HOST_DEVICE T rnn_relu_forward(T pre) { return pre > T(0) ? pre : T(0); }

template <typename T>
FUSEDRNN_HOST_DEVICE T rnn_tanh_backward(T h, T grad_h) { return grad_h * (T(1) - h * h); }

template <typename T>
FUSEDRNN_HOST_DEVICE T rnn_relu_backward(T h, T grad_h) { return h > T(0) ? grad_h : T(0); }

}  // namespace fusedrnn
