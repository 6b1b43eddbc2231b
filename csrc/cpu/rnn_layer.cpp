// Backend "cpu": one layer, one direction of every cell, forward and BPTT backward, on CPU tensors.
//
//   fusedrnn::cpu_rnn_layer(...)          -> (y, h_n, c_n, workspace)   same contract as fusedrnn::rnn_layer
//   fusedrnn::cpu_rnn_layer_backward(...) -> grads of (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
//
// Structure: the input projection of all steps is one GEMM; each step is one small GEMM on weights packed once per call (cpu/blas.h) for the recurrent term
// (plus one for the LSTM projection) and ONE fused pass over [B, H] that adds the biases, applies the cell
// (cell_math.h), updates the state, masks by length and writes y and the workspace. Backward runs the same
// loop in reverse producing only the gate gradients; dx, dW_ih, dW_hh, dW_hr and the biases are one GEMM or
// reduction each after the loop. Workspace layout: fusedrnn/backends/base.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <type_traits>

#include "cpu/blas.h"
#include "fusedrnn/cell_math.h"
#include "fusedrnn/layer_args.h"

namespace fusedrnn::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Pointwise passes below this many elements run on the calling thread: forking OpenMP costs ~5-10 us,
// more than a [1, 256] LSTM step takes.
constexpr int64_t kGrain = 1 << 14;

using Dims = LayerDims;

void check_args(const Dims& d, const Tensor& x, const Tensor& h0, const OptTensor& c0, const Tensor& w_ih,
                const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                const OptTensor& lengths) {
  check_layer_shapes("cpu", d, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  for (const OptTensor& t : {OptTensor(x), OptTensor(h0), c0, OptTensor(w_ih), OptTensor(w_hh), b_ih, b_hh, w_hr}) {
    TORCH_CHECK(!t || (t->device().is_cpu() && t->scalar_type() == x.scalar_type()),
                "fusedrnn cpu: all tensors must be CPU tensors of x's dtype");
  }
  if (lengths) {
    TORCH_CHECK(lengths->device().is_cpu() && lengths->scalar_type() == at::kLong && lengths->numel() == d.B,
                "fusedrnn cpu: lengths must be a CPU int64 tensor [B]");
  }
}

// Per-sequence number of valid steps, clamped to [0, T]; all T without lengths.
std::vector<int64_t> valid_lengths(const Dims& d, const OptTensor& lengths) {
  std::vector<int64_t> len(d.B, d.T);
  if (lengths) {
    auto acc = lengths->contiguous();
    const int64_t* p = acc.data_ptr<int64_t>();
    for (int64_t b = 0; b < d.B; ++b) len[b] = std::min<int64_t>(std::max<int64_t>(p[b], 0), d.T);
  }
  return len;
}

// Step t of the processing order s (0..T-1).
inline int64_t step_time(const Dims& d, int64_t s) { return d.reverse ? d.T - 1 - s : s; }

// The time of the step that ran just before step t in sequence b, or -1 when step t started from the
// initial state. Only meaningful for valid (t < len) steps.
inline int64_t previous_time(const Dims& d, int64_t t, int64_t len) {
  if (!d.reverse) return t - 1;
  return t + 1 < len ? t + 1 : -1;
}

Tensor contig(const Tensor& t) { return t.contiguous(); }
OptTensor contig(const OptTensor& t) { return t ? OptTensor(t->contiguous()) : std::nullopt; }

// ---------------------------------------------------------------------------------------------------
// Pointwise rows: one batch row of one step, every hidden unit j; multiversioned so they get AVX-512/AVX2.
// The row's flags (valid, projection, tanh) become compile-time constants before the loop (with_flags):
// GCC 12 does not unswitch a select on a bool argument, and "control flow in loop" kept these loops scalar.
// Pointers are never null (absent biases point at zeros, an unneeded workspace at a scratch row) and never
// alias each other (__restrict__: with 8 pointers GCC gave up on its run-time alias checks).
// ---------------------------------------------------------------------------------------------------
#define FUSEDRNN_INLINE_LAMBDA __attribute__((always_inline))

template <typename F>
FUSEDRNN_ALWAYS_INLINE void with_flags(bool a, bool b, const F& f) {
  if (a) {
    b ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  } else {
    b ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
  }
}

template <typename T>
FUSEDRNN_MULTIVERSION void lstm_forward_row(int64_t H, const T* __restrict__ xg, const T* __restrict__ hg, const T* __restrict__ bias, T* __restrict__ c, T* __restrict__ h,
                                            T* __restrict__ y, T* __restrict__ ws, T* __restrict__ r, bool valid, bool proj) {
  with_flags(valid, proj, [&](auto VALID, auto PROJ) FUSEDRNN_INLINE_LAMBDA {
    for (int64_t j = 0; j < H; ++j) {
      const T c_prev = c[j];
      const LstmState<T> st = lstm_forward<T>(xg[j] + hg[j] + bias[j], xg[H + j] + hg[H + j] + bias[H + j],
                                              xg[2 * H + j] + hg[2 * H + j] + bias[2 * H + j],
                                              xg[3 * H + j] + hg[3 * H + j] + bias[3 * H + j], c_prev);
      ws[j] = st.i;
      ws[H + j] = st.f;
      ws[2 * H + j] = st.g;
      ws[3 * H + j] = st.o;
      ws[4 * H + j] = st.c;
      if constexpr (VALID) c[j] = st.c;
      if constexpr (PROJ) {  // r is projected (and masked) after this pass
        ws[5 * H + j] = st.r;
        r[j] = st.r;
      } else {
        if constexpr (VALID) h[j] = st.r;
        y[j] = VALID ? st.r : T(0);
      }
    }
  });
}

template <typename T>
FUSEDRNN_MULTIVERSION void gru_forward_row(int64_t H, const T* __restrict__ xg, const T* __restrict__ hg, const T* __restrict__ bias, T* __restrict__ h, T* __restrict__ y, T* __restrict__ ws,
                                           bool valid) {
  with_flags(valid, false, [&](auto VALID, auto) FUSEDRNN_INLINE_LAMBDA {
    for (int64_t j = 0; j < H; ++j) {
      const T h_prev = h[j];
      const T h_n = hg[2 * H + j] + bias[2 * H + j];
      const GruState<T> st = gru_forward<T>(xg[j] + hg[j] + bias[j], xg[H + j] + hg[H + j] + bias[H + j],
                                            xg[2 * H + j], h_n, h_prev);
      ws[j] = st.r;
      ws[H + j] = st.z;
      ws[2 * H + j] = st.n;
      ws[3 * H + j] = h_n;
      if constexpr (VALID) h[j] = st.h;
      y[j] = VALID ? st.h : T(0);
    }
  });
}

template <typename T>
FUSEDRNN_MULTIVERSION void rnn_forward_row(int64_t H, const T* __restrict__ xg, const T* __restrict__ hg, const T* __restrict__ bias, T* __restrict__ h, T* __restrict__ y,
                                           bool valid, bool tanh_cell) {
  with_flags(valid, tanh_cell, [&](auto VALID, auto TANH) FUSEDRNN_INLINE_LAMBDA {
    for (int64_t j = 0; j < H; ++j) {
      const T pre = xg[j] + hg[j] + bias[j];
      const T out = TANH ? rnn_tanh_forward<T>(pre) : rnn_relu_forward<T>(pre);
      if constexpr (VALID) h[j] = out;
      y[j] = VALID ? out : T(0);
    }
  });
}

// Runs fn(b) for every batch row, on several threads only when the step is big enough to pay for it.
template <typename F>
void for_each_row(int64_t rows, int64_t row_size, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(row_size, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) fn(b);
  });
}

// ---------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------
template <typename T>
void forward_loop(const Dims& d, const std::vector<int64_t>& len, const T* x_gates, const PackedB<T>& w_hh_t,
                  const T* b_hh, const PackedB<T>& w_hr_t, T* h, T* c, T* y, T* ws, int64_t ws_stride, T* h_gates,
                  T* r_buf, T* h_proj) {
  const int64_t GH = d.G * d.H;
  for (int64_t s = 0; s < d.T; ++s) {
    const int64_t t = step_time(d, s);
    gemm_packed<T>(d.B, h, w_hh_t, T(0), h_gates);
    const T* xg_t = x_gates + t * d.B * GH;
    T* y_t = y + t * d.B * d.H_out;
    T* ws_t = ws + t * d.B * ws_stride;  // ws_stride == 0: one scratch row block reused every step
    for_each_row(d.B, GH, [&](int64_t b) {
      const bool valid = t < len[b];
      const T* xg = xg_t + b * GH;
      const T* hg = h_gates + b * GH;
      T* w = ws_t + b * d.ws;
      if (d.cell == Cell::LSTM) {
        lstm_forward_row<T>(d.H, xg, hg, b_hh, c + b * d.H, h + b * d.H_out, y_t + b * d.H_out, w,
                            r_buf + b * d.H, valid, d.proj);
      } else if (d.cell == Cell::GRU) {
        gru_forward_row<T>(d.H, xg, hg, b_hh, h + b * d.H, y_t + b * d.H, w, valid);
      } else {
        rnn_forward_row<T>(d.H, xg, hg, b_hh, h + b * d.H, y_t + b * d.H, valid, d.cell == Cell::RNN_TANH);
      }
    });

    if (d.proj) {  // h = W_hr r for valid rows; y row is zero for invalid ones
      gemm_packed<T>(d.B, r_buf, w_hr_t, T(0), h_proj);
      for (int64_t b = 0; b < d.B; ++b) {
        const bool valid = t < len[b];
        for (int64_t j = 0; j < d.H_out; ++j) {
          const T v = h_proj[b * d.H_out + j];
          if (valid) h[b * d.H_out + j] = v;
          y_t[b * d.H_out + j] = valid ? v : T(0);
        }
      }
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_rnn_layer(
    const std::string& cell_name, const Tensor& x_, const Tensor& h0_, const OptTensor& c0_, const Tensor& w_ih_,
    const Tensor& w_hh_, const OptTensor& b_ih_, const OptTensor& b_hh_, const OptTensor& w_hr_,
    const OptTensor& lengths, bool reverse, bool need_workspace) {
  const Cell cell = parse_cell(cell_name, "cpu");
  Tensor x = contig(x_), h0 = contig(h0_), w_ih = contig(w_ih_), w_hh = contig(w_hh_);
  OptTensor c0 = contig(c0_), b_ih = contig(b_ih_), b_hh = contig(b_hh_), w_hr = contig(w_hr_);
  const Dims d = layer_dims(cell, x, w_hh, h0, w_hr.has_value(), b_ih.has_value(), reverse);
  check_args(d, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  const auto len = valid_lengths(d, lengths);

  // Input projection of all steps in one GEMM, onto rows pre-filled with b_ih. The packed kernel of
  // cpu/blas.h, not at::addmm: it runs at ~100 GFLOP/s per Zen 4 core at m = T*B >= 64, where torch's MKL
  // takes its generic AMD path at ~75-84.
  Tensor x_gates = b_ih ? b_ih->expand({d.T * d.B, d.G * d.H}).contiguous()
                        : at::zeros({d.T * d.B, d.G * d.H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fusedrnn_cpu_input_projection", [&] {
    const auto w_ih_t = pack_b<scalar_t>(w_ih.data_ptr<scalar_t>(), d.I, d.G * d.H, 1, d.I);
    gemm_packed<scalar_t>(d.T * d.B, x.data_ptr<scalar_t>(), w_ih_t, scalar_t(1), x_gates.data_ptr<scalar_t>());
  });

  Tensor y = at::empty({d.T, d.B, d.H_out}, x.options());
  Tensor h = h0.clone();
  Tensor c = c0 ? c0->clone() : at::empty({0}, x.options());
  Tensor ws = need_workspace ? at::empty({d.T, d.B, d.ws}, x.options()) : at::empty({0}, x.options());
  // Without a workspace the rows still write one: a scratch block reused every step (stride 0).
  Tensor ws_scratch = need_workspace ? Tensor() : at::empty({d.B, d.ws}, x.options());
  Tensor h_gates = at::empty({d.B, d.G * d.H}, x.options());
  Tensor r_buf = at::empty({d.proj ? d.B : 0, d.H}, x.options());
  Tensor h_proj = at::empty({d.proj ? d.B : 0, d.H_out}, x.options());
  Tensor b_hh_or_zeros = b_hh ? *b_hh : at::zeros({d.G * d.H}, x.options());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fusedrnn_cpu_rnn_layer", [&] {
    // Step GEMMs multiply by W_hh^T and W_hr^T: pack them once per call (see cpu/blas.h).
    const auto w_hh_t = pack_b<scalar_t>(w_hh.data_ptr<scalar_t>(), d.H_out, d.G * d.H, 1, d.H_out);
    const auto w_hr_t = d.proj ? pack_b<scalar_t>(w_hr->data_ptr<scalar_t>(), d.H, d.H_out, 1, d.H)
                               : PackedB<scalar_t>();
    forward_loop<scalar_t>(d, len, x_gates.data_ptr<scalar_t>(), w_hh_t, b_hh_or_zeros.data_ptr<scalar_t>(), w_hr_t,
                           h.data_ptr<scalar_t>(), c0 ? c.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(),
                           (need_workspace ? ws : ws_scratch).data_ptr<scalar_t>(), need_workspace ? d.ws : 0,
                           h_gates.data_ptr<scalar_t>(), r_buf.data_ptr<scalar_t>(), h_proj.data_ptr<scalar_t>());
  });
  return {y, h, c, ws};
}

// Backward rows. grad_out / grad_r are zero on invalid rows (that step did nothing), so every gate gradient
// of such a row is zero without a branch; only the carried cell-state gradient needs the select.
template <typename T>
FUSEDRNN_MULTIVERSION void lstm_backward_row(int64_t H, const T* __restrict__ ws, const T* __restrict__ c_prev, const T* __restrict__ grad_r, T* __restrict__ grad_c,
                                             T* __restrict__ gx, bool valid) {
  with_flags(valid, false, [&](auto VALID, auto) FUSEDRNN_INLINE_LAMBDA {
    for (int64_t j = 0; j < H; ++j) {
      const T gc = VALID ? grad_c[j] : T(0);
      const LstmGrad<T> g = lstm_backward<T>(ws[j], ws[H + j], ws[2 * H + j], ws[3 * H + j], ws[4 * H + j],
                                             c_prev[j], grad_r[j], gc);
      gx[j] = g.i;
      gx[H + j] = g.f;
      gx[2 * H + j] = g.g;
      gx[3 * H + j] = g.o;
      if constexpr (VALID) grad_c[j] = g.c_prev;
    }
  });
}

template <typename T>
FUSEDRNN_MULTIVERSION void gru_backward_row(int64_t H, const T* __restrict__ ws, const T* __restrict__ h_prev, const T* __restrict__ grad_out, T* __restrict__ gx,
                                            T* __restrict__ gh, T* __restrict__ grad_h_direct) {
  for (int64_t j = 0; j < H; ++j) {
    const GruGrad<T> g = gru_backward<T>(ws[j], ws[H + j], ws[2 * H + j], ws[3 * H + j], h_prev[j], grad_out[j]);
    gx[j] = g.r;
    gx[H + j] = g.z;
    gx[2 * H + j] = g.n;
    gh[j] = g.r;
    gh[H + j] = g.z;
    gh[2 * H + j] = g.h_n;
    grad_h_direct[j] = g.h_prev;  // the GEMM of the step accumulates onto it
  }
}

template <typename T>
FUSEDRNN_MULTIVERSION void rnn_backward_row(int64_t H, const T* __restrict__ h, const T* __restrict__ grad_out, T* __restrict__ gx, bool tanh_cell) {
  with_flags(tanh_cell, false, [&](auto TANH, auto) FUSEDRNN_INLINE_LAMBDA {
    for (int64_t j = 0; j < H; ++j) {
      gx[j] = TANH ? rnn_tanh_backward<T>(h[j], grad_out[j]) : rnn_relu_backward<T>(h[j], grad_out[j]);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------
// Fills prev [T, B, W] with the state each valid step started from: states[previous_time] or init.
template <typename T>
void gather_previous(const Dims& d, const std::vector<int64_t>& len, const T* states, int64_t stride,
                     int64_t width, const T* init, T* prev) {
  at::parallel_for(0, d.T * d.B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t t = idx / d.B, b = idx % d.B;
      const int64_t tp = t < len[b] ? previous_time(d, t, len[b]) : -1;
      const T* src = tp >= 0 ? states + (tp * d.B + b) * stride : init + b * width;
      std::copy(src, src + width, prev + idx * width);
    }
  });
}

template <typename T>
void backward_loop(const Dims& d, const std::vector<int64_t>& len, const PackedB<T>& w_hh, const PackedB<T>& w_hr,
                   const T* y,
                   const T* ws, const T* h_prev_all, const T* c0, const T* grad_y, T* grad_h, T* grad_c,
                   T* grad_xg, T* grad_hg, T* grad_out_all, T* grad_r, T* grad_h_next) {
  const int64_t GH = d.G * d.H;
  const bool masked = std::any_of(len.begin(), len.end(), [&](int64_t l) { return l < d.T; });
  for (int64_t s = d.T - 1; s >= 0; --s) {
    const int64_t t = step_time(d, s);
    const T* gy_t = grad_y + t * d.B * d.H_out;
    // grad_out = dL/dh_t for valid rows (zero for invalid ones: that step did nothing).
    T* gout = grad_out_all + t * d.B * d.H_out;
    for (int64_t b = 0; b < d.B; ++b) {
      const bool valid = t < len[b];
      for (int64_t j = 0; j < d.H_out; ++j) {
        gout[b * d.H_out + j] = valid ? grad_h[b * d.H_out + j] + gy_t[b * d.H_out + j] : T(0);
      }
    }
    const T* g_r = gout;
    if (d.proj) {  // dL/dr = grad_out @ W_hr
      gemm_packed<T>(d.B, gout, w_hr, T(0), grad_r);
      g_r = grad_r;
    }
    T* gxg_t = grad_xg + t * d.B * GH;
    T* ghg_t = d.cell == Cell::GRU ? grad_hg + t * d.B * GH : gxg_t;
    const T* ws_t = ws ? ws + t * d.B * d.ws : nullptr;
    const T* y_t = y + t * d.B * d.H_out;
    const T* hp_t = h_prev_all + t * d.B * d.H_out;

    for_each_row(d.B, GH, [&](int64_t b) {
      const bool valid = t < len[b];
      T* gx = gxg_t + b * GH;
      if (d.cell == Cell::LSTM) {
        const int64_t tp = valid ? previous_time(d, t, len[b]) : -1;
        const T* c_prev = tp >= 0 ? ws + (tp * d.B + b) * d.ws + 4 * d.H : c0 + b * d.H;
        lstm_backward_row<T>(d.H, ws_t + b * d.ws, c_prev, g_r + b * d.H, grad_c + b * d.H, gx, valid);
      } else if (d.cell == Cell::GRU) {
        gru_backward_row<T>(d.H, ws_t + b * d.ws, hp_t + b * d.H, gout + b * d.H, gx, ghg_t + b * GH,
                            grad_h_next + b * d.H);
      } else {
        rnn_backward_row<T>(d.H, y_t + b * d.H, gout + b * d.H, gx, d.cell == Cell::RNN_TANH);
      }
    });

    // dL/dh_{t-1} = grad_hg @ W_hh (+ GRU's direct term); invalid rows keep their gradient.
    gemm_packed<T>(d.B, ghg_t, w_hh, d.cell == Cell::GRU ? T(1) : T(0), grad_h_next);
    if (!masked) {
      std::copy(grad_h_next, grad_h_next + d.B * d.H_out, grad_h);
    } else {
      for (int64_t b = 0; b < d.B; ++b) {
        if (t < len[b]) std::copy(grad_h_next + b * d.H_out, grad_h_next + (b + 1) * d.H_out, grad_h + b * d.H_out);
      }
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cpu_rnn_layer_backward(
    const std::string& cell_name, const Tensor& x_, const Tensor& h0_, const OptTensor& c0_, const Tensor& w_ih_,
    const Tensor& w_hh_, const OptTensor& b_ih_, const OptTensor& b_hh_, const OptTensor& w_hr_,
    const OptTensor& lengths, bool reverse, const Tensor& y_, const Tensor& ws_, const Tensor& grad_y_,
    const Tensor& grad_h_n, const OptTensor& grad_c_n) {
  const Cell cell = parse_cell(cell_name, "cpu");
  Tensor x = contig(x_), h0 = contig(h0_), w_ih = contig(w_ih_), w_hh = contig(w_hh_);
  OptTensor c0 = contig(c0_), b_ih = contig(b_ih_), b_hh = contig(b_hh_), w_hr = contig(w_hr_);
  Tensor y = contig(y_), ws = contig(ws_), grad_y = contig(grad_y_);
  const Dims d = layer_dims(cell, x, w_hh, h0, w_hr.has_value(), b_ih.has_value(), reverse);
  check_args(d, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  TORCH_CHECK(ws.numel() == d.T * d.B * d.ws,
              "fusedrnn cpu: workspace of ", ws.numel(), " elements does not match this call (expected ",
              d.T * d.B * d.ws, "): was the forward run with need_workspace=True?");
  const auto len = valid_lengths(d, lengths);
  const int64_t GH = d.G * d.H;
  auto opts = x.options();

  Tensor grad_h = grad_h_n.contiguous().clone();
  Tensor grad_c = cell == Cell::LSTM ? (grad_c_n ? grad_c_n->contiguous().clone() : at::zeros_like(*c0))
                                     : at::empty({0}, opts);
  Tensor grad_xg = at::empty({d.T, d.B, GH}, opts);
  Tensor grad_hg = cell == Cell::GRU ? at::empty({d.T, d.B, GH}, opts) : grad_xg;
  Tensor grad_out_all = at::empty({d.T, d.B, d.H_out}, opts);
  Tensor grad_r = d.proj ? at::empty({d.B, d.H}, opts) : Tensor();
  Tensor grad_h_next = at::empty({d.B, d.H_out}, opts);
  Tensor h_prev_all = at::empty({d.T, d.B, d.H_out}, opts);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fusedrnn_cpu_rnn_layer_backward", [&] {
    gather_previous<scalar_t>(d, len, y.data_ptr<scalar_t>(), d.H_out, d.H_out, h0.data_ptr<scalar_t>(),
                              h_prev_all.data_ptr<scalar_t>());
    const auto w_hh_p = pack_b<scalar_t>(w_hh.data_ptr<scalar_t>(), d.G * d.H, d.H_out, d.H_out, 1);
    const auto w_hr_p = d.proj ? pack_b<scalar_t>(w_hr->data_ptr<scalar_t>(), d.H_out, d.H, d.H, 1)
                               : PackedB<scalar_t>();
    backward_loop<scalar_t>(d, len, w_hh_p, w_hr_p,
                            y.data_ptr<scalar_t>(), d.ws ? ws.data_ptr<scalar_t>() : nullptr,
                            h_prev_all.data_ptr<scalar_t>(), c0 ? c0->data_ptr<scalar_t>() : nullptr,
                            grad_y.data_ptr<scalar_t>(), grad_h.data_ptr<scalar_t>(),
                            cell == Cell::LSTM ? grad_c.data_ptr<scalar_t>() : nullptr,
                            grad_xg.data_ptr<scalar_t>(), grad_hg.data_ptr<scalar_t>(),
                            grad_out_all.data_ptr<scalar_t>(), d.proj ? grad_r.data_ptr<scalar_t>() : nullptr,
                            grad_h_next.data_ptr<scalar_t>());
  });

  // Everything off the recurrence: one GEMM / reduction each over all T*B rows, on the packed kernel
  // (see the input projection in the forward for why not at::mm).
  const int64_t rows = d.T * d.B;
  Tensor grad_x = at::empty({d.T, d.B, d.I}, opts);
  Tensor grad_w_ih = at::empty({GH, d.I}, opts);
  Tensor grad_w_hh = at::empty({GH, d.H_out}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fusedrnn_cpu_rnn_layer_weight_grads", [&] {
    using T = scalar_t;
    const T* gx = grad_xg.data_ptr<T>();
    // grad_x [rows, I] = grad_xg [rows, GH] @ W_ih [GH, I]
    gemm_packed<T>(rows, gx, pack_b<T>(w_ih.data_ptr<T>(), GH, d.I, d.I, 1), T(0), grad_x.data_ptr<T>());
  });
  // The weight gradients reduce over k = T*B rows of transposed operands: at::mm packs those, the panel
  // kernel would stride through them (measured 2x slower at T=128, B=64, H=512).
  at::mm_out(grad_w_ih, grad_xg.view({rows, GH}).t(), x.view({rows, d.I}));
  at::mm_out(grad_w_hh, grad_hg.view({rows, GH}).t(), h_prev_all.view({rows, d.H_out}));
  Tensor gx2 = grad_xg.view({rows, GH});
  Tensor gh2 = grad_hg.view({rows, GH});
  Tensor grad_b_ih = d.bias ? gx2.sum(0) : at::empty({0}, opts);
  Tensor grad_b_hh = d.bias ? gh2.sum(0) : at::empty({0}, opts);
  Tensor grad_w_hr = at::empty({0}, opts);
  if (d.proj) {
    Tensor r_all = ws.view({rows, d.ws}).narrow(1, 5 * d.H, d.H);
    grad_w_hr = at::mm(grad_out_all.view({rows, d.H_out}).t(), r_all);
  }
  return {grad_x, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def("cpu_rnn_layer(str cell, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
        "Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, bool need_workspace) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_rnn_layer_backward(str cell, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
        "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, Tensor y, Tensor workspace, "
        "Tensor grad_y, Tensor grad_h_n, Tensor? grad_c_n) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("cpu_rnn_layer", &cpu_rnn_layer);
  m.impl("cpu_rnn_layer_backward", &cpu_rnn_layer_backward);
}

}  // namespace fusedrnn::cpu
