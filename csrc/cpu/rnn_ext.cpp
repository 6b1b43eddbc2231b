// Backend "cpu" of fusedrnn::rnn_layer_ext (LayerNorm LSTM / GRU and zoneout, issue #18): its two fused row
// kernels, one step of all B rows each.
//
//   fusedrnn::cpu_ext_forward_rows(cell, ax, ah, ...)            -> (h_new, c_new, y)
//   fusedrnn::cpu_ext_backward_rows(cell, ax, ah, ..., acc)      -> (d_ax, d_ah, grad_h_prev, grad_c_prev)
//
// The contract (arguments, shapes, dtypes, the acc layout, invalid rows) is the module doc of
// fusedrnn/backends/ext.py, and ReferenceRows there is the same contract in PyTorch ops; the driver that calls
// these per step (GEMMs in between) is ext_forward / ext_backward there.
//
// One batch row is one task: its layer norms reduce over the row, so a row never splits across threads, and
// the rows are split over threads (at::parallel_for) when a step is large enough to pay for the fork.
// Per row, passes over memory (G*H: over the gates, H: over the units):
//   forward   [norm stats of ax and ah: 2 x G*H]  ->  gate inputs (normed, gained, biased, x and h parts added)
//             to a scratch row: G*H  ->  gates, state, zoneout, y: H  (LSTM with LN(c): that pass leaves c~ and
//             o in c_new and y, then the stats of c~: 2 x H, and h: H)
//   backward  the same up to the gate inputs  ->  the gates recomputed and the gradients of the gate inputs:
//             H (LSTM with LN(c): gates, stats of c~, output gradient, state gradient: 5 x H)  ->  the row's
//             parameter gradients added to acc, and the sums the norms' backward needs: G*H  ->  [d_ax, d_ah
//             through the norms: G*H]
// Every element loop is `#pragma omp simd`: the units are independent, and the pragma is what lets GCC
// vectorize the row sums (it does not reassociate float additions otherwise). The per-element math is
// fusedrnn/cell_math.h (its fp32 exp / tanh are branch-free polynomials that vectorize). Which parts exist
// (the cell, the input norms, the norm of c) are template flags, fixed once per range of rows, and the biases'
// one is fixed per row in the backward's parameter pass; absent biases and zoneout masks read a zero row, so
// no loop tests a flag per element.
//
// Half inputs (float16 / bfloat16) are widened to float32 on entry and the x-dtype outputs rounded back: the
// contract computes them in float32 (acc, grad_h, grad_c are float32 already).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "cpu/blas.h"  // scratch()
#include "cpu/isa.h"
#include "fusedrnn/cell_math.h"

namespace fusedrnn::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---------------------------------------------------------------------------------------------------------
// Row pointers
// ---------------------------------------------------------------------------------------------------------
// A [B, n] operand: row b starts at p + b * stride (elements; unit stride within a row). stride 0: every row
// reads the same one (the zero row of an absent zoneout mask).
template <typename T>
struct Rows {
  T* p = nullptr;
  int64_t stride = 0;
  T* at(int64_t b) const { return p == nullptr ? nullptr : p + b * stride; }
};

// One batch row: every pointer at the row's first element. Gate k of unit j is element k*H + j of the G*H
// operands (ax, ah, d_ax, d_ah, the gate blocks of acc). Pointers of parts a call lacks are null and never
// read: the flags that would read them are off (absent biases and zoneout masks point at zeros instead).
template <typename T>
struct Row {
  const T *ax, *ah, *b_ih, *b_hh, *ln_ih, *ln_hh, *ln_cw, *ln_cb, *h_prev, *c_prev, *zh, *zc;
  T *h_new, *c_new, *y;                                   // forward outputs
  const T *grad_h, *grad_y, *grad_c;                      // backward inputs
  T *d_ax, *d_ah, *grad_h_prev, *grad_c_prev;             // backward outputs
  T *acc_b_ih, *acc_b_hh, *acc_ln_ih, *acc_ln_hh, *acc_ln_cw, *acc_ln_cb;  // this row's line of acc
  T* work;  // scratch: the 4H gate inputs, then (backward, LSTM with LN(c)) 2H more
};

// Everything one call's row kernels read and write.
template <typename T>
struct ExtArgs {
  int64_t H = 0, GH = 0;
  bool lstm = false, ln = false, lnc = false, bias = false;
  Rows<const T> ax, ah, h_prev, c_prev, zh, zc, grad_h, grad_y, grad_c;
  const T *b_ih = nullptr, *b_hh = nullptr, *ln_ih = nullptr, *ln_hh = nullptr, *ln_cw = nullptr,
          *ln_cb = nullptr;
  const bool* valid = nullptr;  // null: every row valid
  Rows<T> h_new, c_new, y, d_ax, d_ah, grad_h_prev, grad_c_prev, acc, work;

  FUSEDRNN_ALWAYS_INLINE Row<T> row(int64_t b) const {
    Row<T> r{};
    r.ax = ax.at(b), r.ah = ah.at(b), r.h_prev = h_prev.at(b), r.c_prev = c_prev.at(b);
    r.zh = zh.at(b), r.zc = zc.at(b);
    r.b_ih = b_ih, r.b_hh = b_hh, r.ln_ih = ln_ih, r.ln_hh = ln_hh, r.ln_cw = ln_cw, r.ln_cb = ln_cb;
    r.h_new = h_new.at(b), r.c_new = c_new.at(b), r.y = y.at(b);
    r.grad_h = grad_h.at(b), r.grad_y = grad_y.at(b), r.grad_c = grad_c.at(b);
    r.d_ax = d_ax.at(b), r.d_ah = d_ah.at(b), r.grad_h_prev = grad_h_prev.at(b), r.grad_c_prev = grad_c_prev.at(b);
    r.work = work.at(b);
    if (T* line = acc.at(b)) {
      r.acc_b_ih = line, r.acc_b_hh = line + GH, r.acc_ln_ih = line + 2 * GH, r.acc_ln_hh = line + 3 * GH;
      if (lstm) r.acc_ln_cw = line + 4 * GH, r.acc_ln_cb = line + 4 * GH + H;
    }
    return r;
  }
};

// ---------------------------------------------------------------------------------------------------------
// Parts shared by the forward and the backward (the backward recomputes the forward with them, so both
// compute every value alike)
// ---------------------------------------------------------------------------------------------------------
template <typename T>
struct Norm {
  T mean = T(0), rstd = T(0);
};

template <typename T>
FUSEDRNN_ALWAYS_INLINE T normed(T v, const Norm<T>& s) {
  return (v - s.mean) * s.rstd;
}

// LayerNorm statistics of the rows a and b (n values each), in two passes: the mean, then the mean of the
// centred squares (cell_math.h: one pass of sum and sum of squares cancels).
template <typename T>
FUSEDRNN_ALWAYS_INLINE void norm_stats(int64_t n, const T* a, const T* b, Norm<T>& sa, Norm<T>& sb) {
  T suma = T(0), sumb = T(0);
#pragma omp simd reduction(+ : suma, sumb)
  for (int64_t e = 0; e < n; ++e) {
    suma += a[e];
    sumb += b[e];
  }
  sa.mean = suma / T(n), sb.mean = sumb / T(n);
  T sqa = T(0), sqb = T(0);
#pragma omp simd reduction(+ : sqa, sqb)
  for (int64_t e = 0; e < n; ++e) {
    const T da = a[e] - sa.mean, db = b[e] - sb.mean;
    sqa += da * da;
    sqb += db * db;
  }
  sa.rstd = layer_norm_rstd(sqa / T(n)), sb.rstd = layer_norm_rstd(sqb / T(n));
}

template <typename T>
FUSEDRNN_ALWAYS_INLINE Norm<T> norm_stats(int64_t n, const T* a) {
  Norm<T> s;
  T sum = T(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < n; ++e) sum += a[e];
  s.mean = sum / T(n);
  T sq = T(0);
#pragma omp simd reduction(+ : sq)
  for (int64_t e = 0; e < n; ++e) {
    const T d = a[e] - s.mean;
    sq += d * d;
  }
  s.rstd = layer_norm_rstd(sq / T(n));
  return s;
}

// Element e of the input part (ax) or recurrent part (ah) of the pre-activations: normed times gain, plus bias.
template <bool LN, typename T>
FUSEDRNN_ALWAYS_INLINE T gate_part(const T* v, const T* gain, const T* bias, int64_t e, const Norm<T>& s) {
  if constexpr (LN) {
    return normed(v[e], s) * gain[e] + bias[e];
  } else {
    return v[e] + bias[e];
  }
}

// The row's gate inputs, one pass over G*H into pre (4H): the input and recurrent parts added where the cell
// adds them -- every gate of the LSTM; r and z of the GRU, whose n keeps them apart (pre[2H + j]: x part,
// pre[3H + j]: h part, which r scales). The unit loops then read one stream per gate instead of six: with all
// of them in one loop (LSTM: 24 input streams, 4 KB apart at H=1024) L1 thrashed.
template <bool LSTM, bool LN, typename T>
FUSEDRNN_ALWAYS_INLINE void gate_inputs(int64_t H, const Row<T>& r, const Norm<T>& nx, const Norm<T>& nh,
                                        T* pre) {
  const int64_t summed = LSTM ? 4 * H : 2 * H;
#pragma omp simd
  for (int64_t e = 0; e < summed; ++e) {
    pre[e] = gate_part<LN>(r.ax, r.ln_ih, r.b_ih, e, nx) + gate_part<LN>(r.ah, r.ln_hh, r.b_hh, e, nh);
  }
  if constexpr (!LSTM) {
#pragma omp simd
    for (int64_t e = 2 * H; e < 3 * H; ++e) {
      pre[e] = gate_part<LN>(r.ax, r.ln_ih, r.b_ih, e, nx);
      pre[e + H] = gate_part<LN>(r.ah, r.ln_hh, r.b_hh, e, nh);
    }
  }
}

template <bool LSTM, bool LN, typename T>
FUSEDRNN_ALWAYS_INLINE void row_gate_inputs(int64_t H, const Row<T>& r, Norm<T>& nx, Norm<T>& nh) {
  if constexpr (LN) norm_stats((LSTM ? 4 : 3) * H, r.ax, r.ah, nx, nh);
  gate_inputs<LSTM, LN>(H, r, nx, nh, r.work);
}

template <typename T>
FUSEDRNN_ALWAYS_INLINE LstmState<T> lstm_unit(const T* pre, int64_t H, int64_t j, T c_prev) {
  return lstm_state_forward<T>(pre[j], pre[H + j], pre[2 * H + j], pre[3 * H + j], c_prev);
}

template <typename T>
FUSEDRNN_ALWAYS_INLINE GruState<T> gru_unit(const T* pre, int64_t H, int64_t j, T h_prev) {
  return gru_forward<T>(pre[j], pre[H + j], pre[2 * H + j], pre[3 * H + j], h_prev);
}

// ---------------------------------------------------------------------------------------------------------
// Forward rows
// ---------------------------------------------------------------------------------------------------------
// Unit j's outputs from its new h~ and (LSTM) c~: zoneout, then y = h_new.
template <bool LSTM, typename T>
FUSEDRNN_ALWAYS_INLINE void put_state(const Row<T>& r, int64_t j, T h, T c) {
  const T h_new = zoneout(r.zh[j], r.h_prev[j], h);
  r.h_new[j] = h_new;
  r.y[j] = h_new;
  if constexpr (LSTM) r.c_new[j] = zoneout(r.zc[j], r.c_prev[j], c);
}

template <typename T, bool LN, bool LNC>
FUSEDRNN_ALWAYS_INLINE void lstm_forward_row(int64_t H, const Row<T>& r) {
  Norm<T> nx, nh;
  row_gate_inputs<true, LN>(H, r, nx, nh);
  const T* const pre = r.work;
  T* const c_new = r.c_new;
  T* const y = r.y;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const LstmState<T> s = lstm_unit(pre, H, j, r.c_prev[j]);
    if constexpr (LNC) {  // the norm of c~ needs the whole row first: park c~ and o in the outputs
      c_new[j] = s.c;
      y[j] = s.o;
    } else {
      put_state<true>(r, j, s.o * tanh_(s.c), s.c);
    }
  }
  if constexpr (LNC) {
    const Norm<T> nc = norm_stats(H, c_new);
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T c = c_new[j];
      put_state<true>(r, j, y[j] * tanh_(normed(c, nc) * r.ln_cw[j] + r.ln_cb[j]), c);
    }
  }
}

template <typename T, bool LN>
FUSEDRNN_ALWAYS_INLINE void gru_forward_row(int64_t H, const Row<T>& r) {
  Norm<T> nx, nh;
  row_gate_inputs<false, LN>(H, r, nx, nh);
  const T* const pre = r.work;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) put_state<false>(r, j, gru_unit(pre, H, j, r.h_prev[j]).h, T(0));
}

// A row past its sequence's end keeps its state and writes y = 0.
template <bool LSTM, typename T>
FUSEDRNN_ALWAYS_INLINE void invalid_forward_row(int64_t H, const Row<T>& r) {
  std::copy(r.h_prev, r.h_prev + H, r.h_new);
  std::fill(r.y, r.y + H, T(0));
  if constexpr (LSTM) std::copy(r.c_prev, r.c_prev + H, r.c_new);
}

// ---------------------------------------------------------------------------------------------------------
// Backward rows
// ---------------------------------------------------------------------------------------------------------
// The unit loops leave the gradients of the gate inputs (what gate_inputs computed) in d_ax -- and in d_ah
// where they differ (the GRU's n: the h part is scaled by r) -- then passes over G*H add the row's parameter
// gradients to acc and take d_ax, d_ah through the input norms.

// The total gradient of h_t (grad_h + grad_y) split by zoneout's select into the part reaching h~ (returned)
// and the part reaching h_{t-1} directly (written to grad_h_prev).
template <typename T>
FUSEDRNN_ALWAYS_INLINE T split_grad_h(const Row<T>& r, int64_t j) {
  const T g = r.grad_h[j] + r.grad_y[j];
  r.grad_h_prev[j] = zoneout(r.zh[j], g, T(0));
  return zoneout(r.zh[j], T(0), g);
}

// Row sums for the backward of the two input norms: of g = d_p * gain and of g * normed, per norm.
template <typename T>
struct NormGradSums {
  T x = T(0), xn = T(0), h = T(0), hn = T(0);
};

// The row's parameter gradients over elements [e0, e1) of the gate inputs, from their gradients dpx (in d_ax)
// and dph (SAME: equal to dpx, else in d_ah): acc += biases' (BIAS) and norm gains' (LN). Without norms d_ax,
// d_ah are final (SAME: d_ah copied from d_ax); with them, returns the sums norm_input_backward needs.
template <bool LN, bool SAME, bool BIAS, typename T>
FUSEDRNN_ALWAYS_INLINE NormGradSums<T> param_grads(int64_t e0, int64_t e1, const Row<T>& r, const Norm<T>& nx,
                                                   const Norm<T>& nh) {
  T sx = T(0), sxn = T(0), sh = T(0), shn = T(0);
#pragma omp simd reduction(+ : sx, sxn, sh, shn)
  for (int64_t e = e0; e < e1; ++e) {
    const T dpx = r.d_ax[e];
    const T dph = SAME ? dpx : r.d_ah[e];
    if constexpr (BIAS) {
      r.acc_b_ih[e] += dpx;
      r.acc_b_hh[e] += dph;
    }
    if constexpr (LN) {
      const T xn = normed(r.ax[e], nx), hn = normed(r.ah[e], nh);
      r.acc_ln_ih[e] += dpx * xn;
      r.acc_ln_hh[e] += dph * hn;
      const T gx = dpx * r.ln_ih[e], gh = dph * r.ln_hh[e];
      sx += gx;
      sxn += gx * xn;
      sh += gh;
      shn += gh * hn;
    } else if constexpr (SAME) {
      r.d_ah[e] = dpx;
    }
  }
  return {sx, sxn, sh, shn};
}

template <bool LN, bool SAME, typename T>
FUSEDRNN_ALWAYS_INLINE NormGradSums<T> param_grads(int64_t e0, int64_t e1, const Row<T>& r, const Norm<T>& nx,
                                                   const Norm<T>& nh, bool bias) {
  return bias ? param_grads<LN, SAME, true>(e0, e1, r, nx, nh) : param_grads<LN, SAME, false>(e0, e1, r, nx, nh);
}

// d_ax, d_ah over [e0, e1) through the input norms, from the gate inputs' gradients left there; s: the sums
// over the whole row.
template <bool SAME, typename T>
FUSEDRNN_ALWAYS_INLINE void norm_input_backward(int64_t GH, int64_t e0, int64_t e1, const Row<T>& r,
                                                const Norm<T>& nx, const Norm<T>& nh, const NormGradSums<T>& s) {
  const T mx = s.x / T(GH), mxn = s.xn / T(GH), mh = s.h / T(GH), mhn = s.hn / T(GH);
  T* const d_ax = r.d_ax;
  T* const d_ah = r.d_ah;
#pragma omp simd
  for (int64_t e = e0; e < e1; ++e) {
    const T dpx = d_ax[e];
    const T dph = SAME ? dpx : d_ah[e];
    d_ax[e] = layer_norm_backward(dpx * r.ln_ih[e], normed(r.ax[e], nx), nx.rstd, mx, mxn);
    d_ah[e] = layer_norm_backward(dph * r.ln_hh[e], normed(r.ah[e], nh), nh.rstd, mh, mhn);
  }
}

template <typename T, bool LN, bool LNC>
FUSEDRNN_ALWAYS_INLINE void lstm_backward_row(int64_t H, const Row<T>& r, bool bias) {
  Norm<T> nx, nh;
  row_gate_inputs<true, LN>(H, r, nx, nh);
  T* const pre = r.work;
  T* const dp = r.d_ax;
  if constexpr (!LNC) {
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const LstmState<T> s = lstm_unit(pre, H, j, r.c_prev[j]);
      const LstmOutputGrad<T> od = lstm_output_backward(s.o, tanh_(s.c), split_grad_h(r, j));
      const T gc = r.grad_c[j];
      const LstmGrad<T> d = lstm_state_backward(s.i, s.f, s.g, r.c_prev[j], zoneout(r.zc[j], T(0), gc) + od.n);
      r.grad_c_prev[j] = zoneout(r.zc[j], gc, T(0)) + d.c_prev;
      dp[j] = d.i, dp[H + j] = d.f, dp[2 * H + j] = d.g, dp[3 * H + j] = od.o;
    }
  } else {
    // LN(c) reduces over the row's c~ between the output gradient and the state gradient: three loops. The
    // gates replace their inputs in pre (o then its gradient); c~ and the gradient of LN(c) * gain follow.
    T* const wc = pre + 4 * H;
    T* const wn = wc + H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const LstmState<T> s = lstm_unit(pre, H, j, r.c_prev[j]);
      pre[j] = s.i, pre[H + j] = s.f, pre[2 * H + j] = s.g, pre[3 * H + j] = s.o;
      wc[j] = s.c;
    }
    const Norm<T> nc = norm_stats(H, wc);
    T sn = T(0), snn = T(0);
#pragma omp simd reduction(+ : sn, snn)
    for (int64_t j = 0; j < H; ++j) {
      const T cn = normed(wc[j], nc);
      const LstmOutputGrad<T> od =
          lstm_output_backward(pre[3 * H + j], tanh_(cn * r.ln_cw[j] + r.ln_cb[j]), split_grad_h(r, j));
      r.acc_ln_cw[j] += od.n * cn;
      r.acc_ln_cb[j] += od.n;
      const T gn = od.n * r.ln_cw[j];
      wn[j] = gn;
      pre[3 * H + j] = od.o;
      sn += gn;
      snn += gn * cn;
    }
    const T mn = sn / T(H), mnn = snn / T(H);
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T gc = r.grad_c[j];
      const T d_c = zoneout(r.zc[j], T(0), gc) + layer_norm_backward(wn[j], normed(wc[j], nc), nc.rstd, mn, mnn);
      const LstmGrad<T> d = lstm_state_backward(pre[j], pre[H + j], pre[2 * H + j], r.c_prev[j], d_c);
      r.grad_c_prev[j] = zoneout(r.zc[j], gc, T(0)) + d.c_prev;
      dp[j] = d.i, dp[H + j] = d.f, dp[2 * H + j] = d.g, dp[3 * H + j] = pre[3 * H + j];
    }
  }
  const NormGradSums<T> sums = param_grads<LN, true>(0, 4 * H, r, nx, nh, bias);
  if constexpr (LN) norm_input_backward<true>(4 * H, 0, 4 * H, r, nx, nh, sums);
}

template <typename T, bool LN>
FUSEDRNN_ALWAYS_INLINE void gru_backward_row(int64_t H, const Row<T>& r, bool bias) {
  Norm<T> nx, nh;
  row_gate_inputs<false, LN>(H, r, nx, nh);
  const T* const pre = r.work;
  T* const d_ax = r.d_ax;
  T* const d_ah = r.d_ah;
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T h_prev = r.h_prev[j];
    const GruState<T> s = gru_unit(pre, H, j, h_prev);
    const T g = r.grad_h[j] + r.grad_y[j];
    const GruGrad<T> d = gru_backward(s.r, s.z, s.n, pre[3 * H + j], h_prev, zoneout(r.zh[j], T(0), g));
    r.grad_h_prev[j] = zoneout(r.zh[j], g, T(0)) + d.h_prev;
    d_ax[j] = d.r, d_ax[H + j] = d.z, d_ax[2 * H + j] = d.n;
    d_ah[2 * H + j] = d.h_n;  // r and z: the same as d_ax's (SAME below)
  }
  const NormGradSums<T> rz = param_grads<LN, true>(0, 2 * H, r, nx, nh, bias);
  const NormGradSums<T> n = param_grads<LN, false>(2 * H, 3 * H, r, nx, nh, bias);
  if constexpr (LN) {
    const NormGradSums<T> sums{rz.x + n.x, rz.xn + n.xn, rz.h + n.h, rz.hn + n.hn};
    norm_input_backward<true>(3 * H, 0, 2 * H, r, nx, nh, sums);
    norm_input_backward<false>(3 * H, 2 * H, 3 * H, r, nx, nh, sums);
  }
}

// A row past its sequence's end did nothing: its state gradients pass through, d_ax = d_ah = 0, acc untouched.
template <bool LSTM, typename T>
FUSEDRNN_ALWAYS_INLINE void invalid_backward_row(int64_t GH, int64_t H, const Row<T>& r) {
  std::fill(r.d_ax, r.d_ax + GH, T(0));
  std::fill(r.d_ah, r.d_ah + GH, T(0));
  std::copy(r.grad_h, r.grad_h + H, r.grad_h_prev);
  if constexpr (LSTM) std::copy(r.grad_c, r.grad_c + H, r.grad_c_prev);
}

// ---------------------------------------------------------------------------------------------------------
// Ranges of rows, one copy per ISA level (cpu/isa.h)
// ---------------------------------------------------------------------------------------------------------
// f(LSTM, LN, LNC) with the three flags as compile-time constants (GRU: LNC false only).
template <typename F>
FUSEDRNN_ALWAYS_INLINE void with_ext_flags(bool lstm, bool ln, bool lnc, const F& f) {
  using Y = std::true_type;
  using N = std::false_type;
  if (!lstm) {
    ln ? f(N{}, Y{}, N{}) : f(N{}, N{}, N{});
  } else if (ln) {
    lnc ? f(Y{}, Y{}, Y{}) : f(Y{}, Y{}, N{});
  } else {
    lnc ? f(Y{}, N{}, Y{}) : f(Y{}, N{}, N{});
  }
}

template <typename T, Isa>
FUSEDRNN_ALWAYS_INLINE void ext_forward_range_body(const ExtArgs<T>& a, int64_t b0, int64_t b1) {
  with_ext_flags(a.lstm, a.ln, a.lnc, [&](auto LSTM, auto LN, auto LNC) FUSEDRNN_INLINE_LAMBDA {
    for (int64_t b = b0; b < b1; ++b) {
      const Row<T> r = a.row(b);
      if (a.valid != nullptr && !a.valid[b]) {
        invalid_forward_row<decltype(LSTM)::value>(a.H, r);
      } else if constexpr (decltype(LSTM)::value) {
        lstm_forward_row<T, decltype(LN)::value, decltype(LNC)::value>(a.H, r);
      } else {
        gru_forward_row<T, decltype(LN)::value>(a.H, r);
      }
    }
  });
}
FUSEDRNN_ISA_LEVELS(ext_forward_range, (const ExtArgs<T>& a, int64_t b0, int64_t b1), (a, b0, b1))

template <typename T, Isa>
FUSEDRNN_ALWAYS_INLINE void ext_backward_range_body(const ExtArgs<T>& a, int64_t b0, int64_t b1) {
  with_ext_flags(a.lstm, a.ln, a.lnc, [&](auto LSTM, auto LN, auto LNC) FUSEDRNN_INLINE_LAMBDA {
    for (int64_t b = b0; b < b1; ++b) {
      const Row<T> r = a.row(b);
      if (a.valid != nullptr && !a.valid[b]) {
        invalid_backward_row<decltype(LSTM)::value>(a.GH, a.H, r);
      } else if constexpr (decltype(LSTM)::value) {
        lstm_backward_row<T, decltype(LN)::value, decltype(LNC)::value>(a.H, r, a.bias);
      } else {
        gru_backward_row<T, decltype(LN)::value>(a.H, r, a.bias);
      }
    }
  });
}
FUSEDRNN_ISA_LEVELS(ext_backward_range, (const ExtArgs<T>& a, int64_t b0, int64_t b1), (a, b0, b1))

// Elements (of G*H) of one thread's share of a step below which the rows stay on the calling thread. On the
// 2-core Zen 3, two threads started to pay between 8K and 16K elements per step (LSTM with norms, fp32: ~20-50
// us a step there); below, the fork and the second thread's wake-up cost more than they save.
constexpr int64_t kMinTaskElements = int64_t(1) << 13;

template <typename F>
void over_rows(int64_t B, int64_t GH, const F& range) {
  (void)active_isa();  // raises on a bad FUSEDRNN_CPU_ISA here, not inside the parallel region
  const int64_t grain = std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(GH, 1));
  at::parallel_for(0, B, grain, range);
}

// ---------------------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------------------
// The checked, widened (half -> float32) and unit-stride arguments of one call.
struct Call {
  bool lstm = false;
  int64_t B = 0, H = 0, GH = 0;
  at::ScalarType dtype;     // x.dtype: ax's
  at::ScalarType compute;   // float32 for half inputs, else dtype (also the acc dtype)
  Tensor ax, ah, h_prev;
  OptTensor b_ih, b_hh, ln_ih, ln_hh, ln_cw, ln_cb, c_prev, zh, zc, valid;
};

void check_tensor(const char* op, const char* name, const Tensor& t, at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "fusedrnn ", op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "fusedrnn ", op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "fusedrnn ", op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_optional(const char* op, const char* name, const OptTensor& t, at::ScalarType dtype,
                    at::IntArrayRef shape) {
  if (t) check_tensor(op, name, *t, dtype, shape);
}

void check_absent(const char* op, const char* name, const OptTensor& t, const char* why) {
  TORCH_CHECK(!t.has_value(), "fusedrnn ", op, ": ", name, " must be None ", why);
}

// In the compute dtype, with unit stride along the last dimension (row strides are kept: the driver passes
// workspace slices as ax and ah).
Tensor prepared(const Tensor& t, at::ScalarType compute) {
  Tensor out = t.scalar_type() == compute ? t : t.to(compute);
  if (out.size(-1) > 1 && out.stride(-1) != 1) out = out.contiguous();
  return out;
}

OptTensor prepared(const OptTensor& t, at::ScalarType compute) {
  return t ? OptTensor(prepared(*t, compute)) : std::nullopt;
}

Call prepare(const char* op, const std::string& cell, const Tensor& ax, const Tensor& ah, const OptTensor& b_ih,
             const OptTensor& b_hh, const OptTensor& ln_ih, const OptTensor& ln_hh, const OptTensor& ln_c_weight,
             const OptTensor& ln_c_bias, const Tensor& h_prev, const OptTensor& c_prev, const OptTensor& zoneout_h,
             const OptTensor& zoneout_c, const OptTensor& valid) {
  Call c;
  TORCH_CHECK(cell == "lstm" || cell == "gru", "fusedrnn ", op, ": cell must be 'lstm' or 'gru', got '", cell, "'");
  c.lstm = cell == "lstm";
  const int64_t G = c.lstm ? 4 : 3;
  TORCH_CHECK(ax.dim() == 2, "fusedrnn ", op, ": ax must be [B, G*H], got shape ", ax.sizes());
  c.dtype = ax.scalar_type();
  TORCH_CHECK(c.dtype == at::kFloat || c.dtype == at::kDouble || c.dtype == at::kHalf || c.dtype == at::kBFloat16,
              "fusedrnn ", op, ": ax must be float32, float64, float16 or bfloat16, got ", c.dtype);
  c.compute = (c.dtype == at::kHalf || c.dtype == at::kBFloat16) ? at::kFloat : c.dtype;
  c.B = ax.size(0), c.GH = ax.size(1);
  TORCH_CHECK(c.GH % G == 0, "fusedrnn ", op, ": ax's last dimension (", c.GH, ") must be ", G, "*H for ", cell);
  c.H = c.GH / G;
  const int64_t B = c.B, H = c.H, GH = c.GH;
  check_tensor(op, "ax", ax, c.dtype, {B, GH});
  check_tensor(op, "ah", ah, c.dtype, {B, GH});
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "fusedrnn ", op, ": give both b_ih and b_hh or neither");
  check_optional(op, "b_ih", b_ih, c.dtype, {GH});
  check_optional(op, "b_hh", b_hh, c.dtype, {GH});
  TORCH_CHECK(ln_ih.has_value() == ln_hh.has_value(), "fusedrnn ", op, ": give both ln_ih and ln_hh or neither");
  check_optional(op, "ln_ih", ln_ih, c.dtype, {GH});
  check_optional(op, "ln_hh", ln_hh, c.dtype, {GH});
  TORCH_CHECK(ln_c_weight.has_value() == ln_c_bias.has_value(), "fusedrnn ", op,
              ": give both ln_c_weight and ln_c_bias or neither");
  check_tensor(op, "h_prev", h_prev, c.dtype, {B, H});
  check_optional(op, "zoneout_h", zoneout_h, c.dtype, {B, H});
  if (c.lstm) {
    check_optional(op, "ln_c_weight", ln_c_weight, c.dtype, {H});
    check_optional(op, "ln_c_bias", ln_c_bias, c.dtype, {H});
    TORCH_CHECK(c_prev.has_value(), "fusedrnn ", op, ": c_prev is required for lstm");
    check_tensor(op, "c_prev", *c_prev, c.dtype, {B, H});
    check_optional(op, "zoneout_c", zoneout_c, c.dtype, {B, H});
  } else {
    check_absent(op, "ln_c_weight", ln_c_weight, "for gru (the norm of the cell state is LSTM's)");
    check_absent(op, "ln_c_bias", ln_c_bias, "for gru (the norm of the cell state is LSTM's)");
    check_absent(op, "c_prev", c_prev, "for gru");
    check_absent(op, "zoneout_c", zoneout_c, "for gru");
  }
  check_optional(op, "valid", valid, at::kBool, {B});
  const at::ScalarType ct = c.compute;
  c.ax = prepared(ax, ct), c.ah = prepared(ah, ct), c.h_prev = prepared(h_prev, ct);
  c.b_ih = prepared(b_ih, ct), c.b_hh = prepared(b_hh, ct), c.ln_ih = prepared(ln_ih, ct);
  c.ln_hh = prepared(ln_hh, ct), c.ln_cw = prepared(ln_c_weight, ct), c.ln_cb = prepared(ln_c_bias, ct);
  c.c_prev = prepared(c_prev, ct), c.zh = prepared(zoneout_h, ct), c.zc = prepared(zoneout_c, ct);
  c.valid = valid ? OptTensor(valid->contiguous()) : std::nullopt;
  return c;
}

template <typename T>
Rows<T> rows_of(const Tensor& t) {
  return {t.data_ptr<T>(), t.size(0) > 1 ? t.stride(0) : 0};
}

// An input's rows; an absent one reads zero_row for every row.
template <typename T>
Rows<const T> in_rows(const OptTensor& t, const Tensor& zero_row) {
  return t ? Rows<const T>{t->data_ptr<T>(), t->size(0) > 1 ? t->stride(0) : 0}
           : Rows<const T>{zero_row.data_ptr<T>(), 0};
}

template <typename T>
const T* data_of(const OptTensor& t, const Tensor& fallback) {
  return t ? t->data_ptr<T>() : (fallback.defined() ? fallback.data_ptr<T>() : nullptr);
}

// The inputs both kernels read; zeros holds max(G*H, H) zeros (absent biases and masks).
template <typename T>
ExtArgs<T> input_args(const Call& c, const Tensor& zeros) {
  ExtArgs<T> a;
  a.H = c.H, a.GH = c.GH;
  a.lstm = c.lstm, a.ln = c.ln_ih.has_value(), a.lnc = c.ln_cw.has_value(), a.bias = c.b_ih.has_value();
  a.ax = in_rows<T>(OptTensor(c.ax), zeros), a.ah = in_rows<T>(OptTensor(c.ah), zeros);
  a.h_prev = in_rows<T>(OptTensor(c.h_prev), zeros);
  if (c.lstm) a.c_prev = in_rows<T>(c.c_prev, zeros);
  a.zh = in_rows<T>(c.zh, zeros);
  if (c.lstm) a.zc = in_rows<T>(c.zc, zeros);
  a.b_ih = data_of<T>(c.b_ih, zeros), a.b_hh = data_of<T>(c.b_hh, zeros);
  a.ln_ih = data_of<T>(c.ln_ih, Tensor()), a.ln_hh = data_of<T>(c.ln_hh, Tensor());
  a.ln_cw = data_of<T>(c.ln_cw, Tensor()), a.ln_cb = data_of<T>(c.ln_cb, Tensor());
  a.valid = c.valid ? c.valid->data_ptr<bool>() : nullptr;
  return a;
}

Tensor zeros_for(const Call& c) {
  return at::zeros({std::max(c.GH, c.H)}, at::TensorOptions().dtype(c.compute));
}

Tensor narrowed_back(const Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// ---------------------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> cpu_ext_forward_rows(
    const std::string& cell, const Tensor& ax, const Tensor& ah, const OptTensor& b_ih, const OptTensor& b_hh,
    const OptTensor& ln_ih, const OptTensor& ln_hh, const OptTensor& ln_c_weight, const OptTensor& ln_c_bias,
    const Tensor& h_prev, const OptTensor& c_prev, const OptTensor& zoneout_h, const OptTensor& zoneout_c,
    const OptTensor& valid) {
  const Call c = prepare("cpu_ext_forward_rows", cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias,
                         h_prev, c_prev, zoneout_h, zoneout_c, valid);
  const auto opts = at::TensorOptions().dtype(c.compute);
  Tensor h_new = at::empty({c.B, c.H}, opts);
  Tensor c_new = at::empty({c.lstm ? c.B : 0, c.lstm ? c.H : 0}, opts);
  Tensor y = at::empty({c.B, c.H}, opts);
  if (c.B > 0 && c.H > 0) {
    const Tensor zeros = zeros_for(c);
    const Tensor work = scratch(Scratch::kStepRows, {c.B, 4 * c.H}, c.compute);  // the gate inputs of each row
    AT_DISPATCH_FLOATING_TYPES(c.compute, "fusedrnn_cpu_ext_forward_rows", [&] {
      using T = scalar_t;
      ExtArgs<T> a = input_args<T>(c, zeros);
      a.work = rows_of<T>(work);
      a.h_new = rows_of<T>(h_new), a.y = rows_of<T>(y);
      if (c.lstm) a.c_new = rows_of<T>(c_new);
      over_rows(c.B, c.GH, [&](int64_t b0, int64_t b1) { ext_forward_range<T>(a, b0, b1); });
    });
  }
  if (!c.lstm) c_new = at::empty({0}, ax.options());
  return {narrowed_back(h_new, c.dtype), narrowed_back(c_new, c.dtype), narrowed_back(y, c.dtype)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_ext_backward_rows(
    const std::string& cell, const Tensor& ax, const Tensor& ah, const OptTensor& b_ih, const OptTensor& b_hh,
    const OptTensor& ln_ih, const OptTensor& ln_hh, const OptTensor& ln_c_weight, const OptTensor& ln_c_bias,
    const Tensor& h_prev, const OptTensor& c_prev, const OptTensor& zoneout_h, const OptTensor& zoneout_c,
    const OptTensor& valid, const Tensor& grad_h_, const Tensor& grad_y_, const OptTensor& grad_c_, Tensor& acc) {
  const char* op = "cpu_ext_backward_rows";
  const Call c = prepare(op, cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev,
                         zoneout_h, zoneout_c, valid);
  const int64_t B = c.B, H = c.H, GH = c.GH;
  const int64_t P = 4 * GH + (c.lstm ? 2 * H : 0);
  check_tensor(op, "grad_h", grad_h_, c.compute, {B, H});
  check_tensor(op, "grad_y", grad_y_, c.dtype, {B, H});
  if (c.lstm) {
    TORCH_CHECK(grad_c_.has_value(), "fusedrnn ", op, ": grad_c is required for lstm");
    check_tensor(op, "grad_c", *grad_c_, c.compute, {B, H});
  } else {
    check_absent(op, "grad_c", grad_c_, "for gru");
  }
  check_tensor(op, "acc", acc, c.compute, {B, P});
  const Tensor grad_h = prepared(grad_h_, c.compute), grad_y = prepared(grad_y_, c.compute);
  const OptTensor grad_c = prepared(grad_c_, c.compute);
  // acc is updated in place; one without unit stride along P is updated through a copy
  const bool acc_strided = P > 1 && acc.stride(1) != 1;
  Tensor acc_rows = acc_strided ? acc.contiguous() : acc;

  const auto opts = at::TensorOptions().dtype(c.compute);
  Tensor d_ax = at::empty({B, GH}, opts);
  Tensor d_ah = at::empty({B, GH}, opts);
  Tensor grad_h_prev = at::empty({B, H}, opts);
  Tensor grad_c_prev = at::empty({c.lstm ? B : 0, c.lstm ? H : 0}, opts);
  if (B > 0 && H > 0) {
    const Tensor zeros = zeros_for(c);
    // Per-row scratch: the gate inputs (4H); LSTM with LN(c) parks c~ and a gradient behind them (2H).
    const Tensor work = scratch(Scratch::kStepRows, {B, (c.lstm && c.ln_cw ? 6 : 4) * H}, c.compute);
    AT_DISPATCH_FLOATING_TYPES(c.compute, "fusedrnn_cpu_ext_backward_rows", [&] {
      using T = scalar_t;
      ExtArgs<T> a = input_args<T>(c, zeros);
      a.grad_h = in_rows<T>(OptTensor(grad_h), zeros), a.grad_y = in_rows<T>(OptTensor(grad_y), zeros);
      if (c.lstm) a.grad_c = in_rows<T>(grad_c, zeros);
      a.d_ax = rows_of<T>(d_ax), a.d_ah = rows_of<T>(d_ah), a.grad_h_prev = rows_of<T>(grad_h_prev);
      if (c.lstm) a.grad_c_prev = rows_of<T>(grad_c_prev);
      a.acc = {acc_rows.data_ptr<T>(), B > 1 ? acc_rows.stride(0) : 0};
      a.work = rows_of<T>(work);
      over_rows(B, GH, [&](int64_t b0, int64_t b1) { ext_backward_range<T>(a, b0, b1); });
    });
  }
  if (acc_strided) acc.copy_(acc_rows);
  if (!c.lstm) grad_c_prev = at::empty({0}, grad_h_.options());
  return {narrowed_back(d_ax, c.dtype), narrowed_back(d_ah, c.dtype), grad_h_prev, grad_c_prev};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def("cpu_ext_forward_rows(str cell, Tensor ax, Tensor ah, Tensor? b_ih, Tensor? b_hh, Tensor? ln_ih, "
        "Tensor? ln_hh, Tensor? ln_c_weight, Tensor? ln_c_bias, Tensor h_prev, Tensor? c_prev, Tensor? zoneout_h, "
        "Tensor? zoneout_c, Tensor? valid) -> (Tensor, Tensor, Tensor)");
  m.def("cpu_ext_backward_rows(str cell, Tensor ax, Tensor ah, Tensor? b_ih, Tensor? b_hh, Tensor? ln_ih, "
        "Tensor? ln_hh, Tensor? ln_c_weight, Tensor? ln_c_bias, Tensor h_prev, Tensor? c_prev, Tensor? zoneout_h, "
        "Tensor? zoneout_c, Tensor? valid, Tensor grad_h, Tensor grad_y, Tensor? grad_c, Tensor(a!) acc) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("cpu_ext_forward_rows", &cpu_ext_forward_rows);
  m.impl("cpu_ext_backward_rows", &cpu_ext_backward_rows);
}

}  // namespace fusedrnn::cpu
