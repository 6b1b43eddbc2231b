// Backend "cpu": one layer, one direction of every cell, forward and BPTT backward, on CPU tensors.
//
//   fusedrnn::cpu_rnn_layer(...)          -> (y, h_n, c_n, workspace)   same contract as fusedrnn::rnn_layer
//   fusedrnn::cpu_rnn_layer_backward(...) -> grads of (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
//
// With batch_sizes (a PackedSequence's), x, y, the workspace and their gradients are packed [rows, *] and
// h0 / c0 / h_n / c_n are in the sequence's sorted order (StepRows): multi-layer modules run on the packed
// data with no unpack / repack between or around the layers.
//
// Structure: the input projection of all steps is one GEMM; each step is one small GEMM on weights packed once per call (cpu/blas.h) for the recurrent term
// (plus one for the LSTM projection) and ONE fused pass over [B, H] that adds the biases, applies the cell
// (cell_math.h), updates the state, masks by length and writes y and the workspace. Backward runs the same
// loop in reverse producing only the gate gradients; dx, dW_ih, dW_hh, dW_hr and the biases are one GEMM or
// reduction each after the loop. Workspace layout: fusedrnn/backends/base.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "cpu/blas.h"
#include "cpu/packed_layout.h"
#include "fusedrnn/cell_math.h"
#include "fusedrnn/layer_args.h"

namespace fusedrnn::cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

using Dims = LayerDims;

void check_args(const Dims& d, const Tensor& x, const Tensor& h0, const OptTensor& c0, const Tensor& w_ih,
                const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                const OptTensor& lengths, bool packed = false) {
  if (packed) {  // x [rows, I]: its rows were checked against batch_sizes
    TORCH_CHECK(x.size(1) == d.I, "fusedrnn cpu: packed x must be [rows, I]");
    check_weight_shapes("cpu", d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  } else {
    check_layer_shapes("cpu", d, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  }
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

// Where each step's batch rows live in x, y, the workspace and the gradients.
//  - Padded [T, B, *]: step t's rows start at t*B and all B are stored; a row past its sequence's end holds
//    zeros and its state passes through.
//  - Packed (a PackedSequence's data [rows, *], the batch in sorted order, longest first): step t's rows start
//    at first[t] and only the stored[t] = batch_sizes[t] sequences still running have one. The others are
//    neither stored nor computed: the step's GEMMs and pointwise pass skip them, so a batch of mixed lengths
//    costs its valid rows only, and no unpack / repack copy surrounds the layer.
struct StepRows {
  std::vector<int64_t> first, stored;
  int64_t total = 0;
  bool packed = false;
  int64_t at(int64_t t, int64_t b) const { return first[t] + b; }
};

StepRows padded_rows(const Dims& d) {
  StepRows r;
  r.first.resize(d.T);
  for (int64_t t = 0; t < d.T; ++t) r.first[t] = t * d.B;
  r.stored.assign(d.T, d.B);
  r.total = d.T * d.B;
  return r;
}

StepRows packed_rows(const PackedLayout& l) {
  return StepRows{l.first_row, l.sizes, l.rows, true};
}

Tensor contig(const Tensor& t) { return t.contiguous(); }
OptTensor contig(const OptTensor& t) { return t ? OptTensor(t->contiguous()) : std::nullopt; }

// ---------------------------------------------------------------------------------------------------
// Pointwise rows: one batch row of one step, every hidden unit j; one copy per ISA level (cpu/isa.h).
// The row's flags (valid, projection, tanh) become compile-time constants before the loop (with_flags):
// GCC 12 does not unswitch a select on a bool argument, and "control flow in loop" kept these loops scalar.
// Pointers are never null (absent biases point at zeros, an unneeded workspace at a scratch row) and never
// alias each other (__restrict__: with 8 pointers GCC gave up on its run-time alias checks).
// ---------------------------------------------------------------------------------------------------
template <typename F>
FUSEDRNN_ALWAYS_INLINE void with_flags(bool a, bool b, const F& f) {
  if (a) {
    b ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  } else {
    b ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
  }
}

// Every row function covers n hidden units of one batch row: its pointers start at the first unit, and the
// gates of a unit are H apart (the layout of x_gates, the workspace and the gradients).
template <typename T, Isa>
FUSEDRNN_ALWAYS_INLINE void lstm_forward_row_body(int64_t H, int64_t n, const T* __restrict__ xg, const T* __restrict__ hg,
                                            const T* __restrict__ bias, T* __restrict__ c,
                                            const T* __restrict__ h_in, T* __restrict__ h_out, T* __restrict__ y,
                                            T* __restrict__ ws, T* __restrict__ r, bool valid, bool proj) {
  with_flags(valid, proj, [&](auto VALID, auto PROJ) FUSEDRNN_INLINE_LAMBDA {
    for (int64_t j = 0; j < n; ++j) {
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
        h_out[j] = VALID ? st.r : h_in[j];
        y[j] = VALID ? st.r : T(0);
      }
    }
  });
}
FUSEDRNN_ISA_LEVELS(lstm_forward_row, (int64_t H, int64_t n, const T* __restrict__ xg, const T* __restrict__ hg, const T* __restrict__ bias, T* __restrict__ c, const T* __restrict__ h_in, T* __restrict__ h_out, T* __restrict__ y, T* __restrict__ ws, T* __restrict__ r, bool valid, bool proj),
                    (H, n, xg, hg, bias, c, h_in, h_out, y, ws, r, valid, proj))

// bias holds b_ir+b_hr, b_iz+b_hz, b_in; bias_hn is b_hn (it stays inside r * (W_hn h + b_hn)).
template <typename T, Isa>
FUSEDRNN_ALWAYS_INLINE void gru_forward_row_body(int64_t H, int64_t n, const T* __restrict__ xg, const T* __restrict__ hg,
                                           const T* __restrict__ bias, const T* __restrict__ bias_hn,
                                           const T* __restrict__ h_in, T* __restrict__ h_out, T* __restrict__ y,
                                           T* __restrict__ ws, bool valid) {
  with_flags(valid, false, [&](auto VALID, auto) FUSEDRNN_INLINE_LAMBDA {
    for (int64_t j = 0; j < n; ++j) {
      const T h_prev = h_in[j];
      const T h_n = hg[2 * H + j] + bias_hn[j];
      const GruState<T> st = gru_forward<T>(xg[j] + hg[j] + bias[j], xg[H + j] + hg[H + j] + bias[H + j],
                                            xg[2 * H + j] + bias[2 * H + j], h_n, h_prev);
      ws[j] = st.r;
      ws[H + j] = st.z;
      ws[2 * H + j] = st.n;
      ws[3 * H + j] = h_n;
      h_out[j] = VALID ? st.h : h_prev;
      y[j] = VALID ? st.h : T(0);
    }
  });
}
FUSEDRNN_ISA_LEVELS(gru_forward_row, (int64_t H, int64_t n, const T* __restrict__ xg, const T* __restrict__ hg, const T* __restrict__ bias, const T* __restrict__ bias_hn, const T* __restrict__ h_in, T* __restrict__ h_out, T* __restrict__ y, T* __restrict__ ws, bool valid),
                    (H, n, xg, hg, bias, bias_hn, h_in, h_out, y, ws, valid))

template <typename T, Isa>
FUSEDRNN_ALWAYS_INLINE void rnn_forward_row_body(int64_t n, const T* __restrict__ xg, const T* __restrict__ hg,
                                           const T* __restrict__ bias, const T* __restrict__ h_in,
                                           T* __restrict__ h_out, T* __restrict__ y, bool valid, bool tanh_cell) {
  with_flags(valid, tanh_cell, [&](auto VALID, auto TANH) FUSEDRNN_INLINE_LAMBDA {
    for (int64_t j = 0; j < n; ++j) {
      const T pre = xg[j] + hg[j] + bias[j];
      const T out = TANH ? rnn_tanh_forward<T>(pre) : rnn_relu_forward<T>(pre);
      h_out[j] = VALID ? out : h_in[j];
      y[j] = VALID ? out : T(0);
    }
  });
}
FUSEDRNN_ISA_LEVELS(rnn_forward_row, (int64_t n, const T* __restrict__ xg, const T* __restrict__ hg, const T* __restrict__ bias, const T* __restrict__ h_in, T* __restrict__ h_out, T* __restrict__ y, bool valid, bool tanh_cell),
                    (n, xg, hg, bias, h_in, h_out, y, valid, tanh_cell))

// ---------------------------------------------------------------------------------------------------
// Work split of the recurrence over a thread team
// ---------------------------------------------------------------------------------------------------
// Per-step multiply-adds below which the loop stays on one thread: the barrier round trip (~0.5-1 us) then
// costs more than half a step saves (standalone: a [1x64]@[64x256] step took 1.2 us on one core, 1.1 on two).
constexpr int64_t kTeamMinStepMacs = int64_t(1) << 15;

// The part of every step one thread owns: batch rows, or hidden units.
//  - Rows: the rows are independent sequences, so the threads never wait for each other; each streams all
//    of W_hh every step. Chosen when every thread gets a full 8-row tile and W_hh is at most 4 MB: LSTM
//    T=64, B=16, H=256 ran in 5.5 ms against 5.8-6.1 split by units (2 threads).
//  - Units: each thread keeps its slice of W_hh hot in its own L2 and the threads meet at a barrier per step
//    (the next step needs all of h). LSTM T=32, B=8, H=1024 (16 MB of W_hh): 27 ms, against 55 split by rows.
struct StepSlice {
  int64_t b0 = 0, b1 = 0;  // batch rows
  int64_t u0 = 0, u1 = 0;  // unit blocks of H (panels [u0*G, u1*G) of the packed W_hh^T)
  int64_t o0 = 0, o1 = 0;  // unit blocks of H_out
  bool shared = false;     // other threads work on the same rows: barriers needed
  int64_t j0 = 0, n = 0;      // the units of H those blocks cover: [j0, j0 + n)
  int64_t k0 = 0, n_out = 0;  // and of H_out
};

inline int64_t unit_blocks(int64_t width, int64_t nr) { return (width + nr - 1) / nr; }

bool split_by_units(const Dims& d, int64_t nr, int threads) {
  if (std::min(unit_blocks(d.H, nr), unit_blocks(d.H_out, nr)) < threads) return false;
  const int64_t weight_bytes = d.G * d.H * d.H_out * (128 / nr);  // nr = 128 bytes / sizeof(T)
  const bool rows_preferred = d.B >= 8 * threads && weight_bytes <= (int64_t(4) << 20);
  return !rows_preferred;
}

int loop_threads(const Dims& d, int64_t nr) {
  const int threads = team_threads();
  const int64_t step_macs = d.B * d.G * d.H * d.H_out + (d.proj ? d.B * d.H * d.H_out : 0);
  if (threads <= 1 || step_macs < kTeamMinStepMacs) return 1;
  if (std::min(unit_blocks(d.H, nr), unit_blocks(d.H_out, nr)) >= threads) return threads;
  return static_cast<int>(std::min<int64_t>(threads, d.B));
}

StepSlice step_slice(const Dims& d, int64_t nr, const Team& team) {
  StepSlice sl;
  const int64_t blocks_h = unit_blocks(d.H, nr), blocks_o = unit_blocks(d.H_out, nr);
  sl.b0 = 0, sl.b1 = d.B, sl.u0 = 0, sl.u1 = blocks_h, sl.o0 = 0, sl.o1 = blocks_o;
  if (team.size > 1 && split_by_units(d, nr, team.size)) {
    std::tie(sl.u0, sl.u1) = split_range(blocks_h, team.id, team.size);
    std::tie(sl.o0, sl.o1) = split_range(blocks_o, team.id, team.size);
    sl.shared = true;
  } else if (team.size > 1) {
    std::tie(sl.b0, sl.b1) = split_range(d.B, team.id, team.size);
  }
  sl.j0 = sl.u0 * nr, sl.n = std::min(sl.u1 * nr, d.H) - sl.j0;
  sl.k0 = sl.o0 * nr, sl.n_out = std::min(sl.o1 * nr, d.H_out) - sl.k0;
  return sl;
}

// One call's sizes, row layout and per-sequence lengths, checked. With batch_sizes, x is a PackedSequence's
// data [rows, I] and h0 / c0 are in its sorted order; lengths must then be absent (the layout carries them).
struct LayerSetup {
  Dims d;
  StepRows rows;
  std::vector<int64_t> len;
};

LayerSetup layer_setup(Cell cell, const Tensor& x, const Tensor& h0, const OptTensor& c0, const Tensor& w_ih,
                       const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                       const OptTensor& lengths, bool reverse, const OptTensor& batch_sizes) {
  LayerSetup s;
  if (!batch_sizes) {
    s.d = layer_dims(cell, x, w_hh, h0, w_hr.has_value(), b_ih.has_value(), reverse);
    check_args(s.d, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
    s.rows = padded_rows(s.d);
    s.len = valid_lengths(s.d, lengths);
    return s;
  }
  TORCH_CHECK(!lengths, "fusedrnn cpu: lengths must be None with batch_sizes (packed data carries its lengths)");
  TORCH_CHECK(x.dim() == 2, "fusedrnn cpu: packed x must be [rows, I], got ", x.dim(), "-D");
  const PackedLayout l = layout_of(*batch_sizes, std::nullopt, x.size(0), "fusedrnn cpu");
  s.d = layer_dims(cell, l.T, l.B, x.size(1), w_hh, h0, w_hr.has_value(), b_ih.has_value(), reverse);
  check_args(s.d, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, std::nullopt, /*packed=*/true);
  s.rows = packed_rows(l);
  s.len = l.lengths();
  return s;
}

// The shape of a per-row tensor of `width` columns: [T, B, width] padded, [rows, width] packed.
std::vector<int64_t> row_shape(const Dims& d, const StepRows& sr, int64_t width) {
  return sr.packed ? std::vector<int64_t>{sr.total, width} : std::vector<int64_t>{d.T, d.B, width};
}

// ---------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------
// h is double-buffered (h_buf [2, B, H_out]): in a unit split, a thread writes its units of step s's h while
// another still reads all of step s-1's h in its GEMM.
// The input projection runs inside the loop, `chunk` steps at a time (~64 rows of x): each thread computes
// the gate columns of its own units (or its own rows), so no barrier guards it, and the chunk's [rows, G*H]
// pre-activations are still in L2 when its steps read them. Hoisted over all T*B rows up front, they came
// back from memory: the load of x_gates was 22% of the LSTM pointwise pass at T=64, B=16, H=256.
inline int64_t projection_chunk(const Dims& d) { return std::clamp<int64_t>(64 / d.B, 1, d.T); }

template <typename T>
void forward_loop(const Dims& d, const StepRows& sr, const std::vector<int64_t>& len, const T* x,
                  const PackedB<T>& w_ih_t, T* x_gates, const PackedB<T>& w_hh_t,
                  const T* bias, const T* bias_hn, const PackedB<T>& w_hr_t, T* h_buf, T* c, T* y, T* ws,
                  int64_t ws_stride, T* h_gates, T* r_buf, T* h_proj, bool gemms_done) {
  constexpr int64_t NR = kPanel<T>;
  const int64_t GH = d.G * d.H;
  run_team(loop_threads(d, NR), [&](Team team) {
    const StepSlice sl = step_slice(d, NR, team);
    const int64_t j0 = sl.j0, n = sl.n, k0 = sl.k0, n_out = sl.n_out;
    const int64_t chunk = projection_chunk(d);
    // x_gates rows of the current chunk. Split by units, every thread writes its own columns of all the
    // chunk's rows, packed as x's (step t at first[t] - chunk_row). Split by rows, the threads run without a
    // barrier, one possibly a chunk ahead: step t of the chunk keeps the padded stride (t - t_first) * B, so
    // each thread's rows stay its own whatever the packing.
    const bool rows_split = !sl.shared && team.size > 1;
    int64_t t_first = 0, chunk_row = 0;
    for (int64_t s = 0; s < d.T; ++s) {
      const int64_t t = step_time(d, s);
      // this thread's rows that step t stores: [b0, b_end) (all of its rows unless packed)
      const int64_t b_end = std::min(sl.b1, sr.stored[t]);
      if (s % chunk == 0 && !gemms_done) {
        const int64_t steps = std::min(chunk, d.T - s);
        t_first = d.reverse ? t - steps + 1 : t;
        chunk_row = sr.first[t_first];
        if (rows_split) {  // this thread's rows of each step
          for (int64_t i = 0; i < steps; ++i) {
            gemm_panels<T>(std::min(sl.b1, sr.stored[t_first + i]) - sl.b0, 0, w_ih_t.panels(),
                           x + sr.at(t_first + i, sl.b0) * d.I, d.I, w_ih_t, T(0), x_gates + (i * d.B + sl.b0) * GH,
                           GH);
          }
        } else {  // this thread's units, every row of the chunk
          const int64_t t_last = t_first + steps - 1;
          gemm_panels<T>(sr.at(t_last, sr.stored[t_last]) - chunk_row, sl.u0 * d.G, sl.u1 * d.G,
                         x + chunk_row * d.I, d.I, w_ih_t, T(0), x_gates, GH);
        }
      }
      const T* h_in = h_buf + (s % 2) * d.B * d.H_out;
      T* h_out = h_buf + ((s + 1) % 2) * d.B * d.H_out;
      if (!gemms_done) {
        gemm_panels<T>(b_end - sl.b0, sl.u0 * d.G, sl.u1 * d.G, h_in + sl.b0 * d.H_out, d.H_out, w_hh_t, T(0),
                       h_gates + sl.b0 * GH, GH);
      }
      const T* xg_t = x_gates + (rows_split ? (t - t_first) * d.B : sr.first[t] - chunk_row) * GH;
      T* y_t = y + sr.first[t] * d.H_out;
      T* ws_t = ws + sr.first[t] * ws_stride;  // ws_stride == 0: one scratch row block reused every step
      for (int64_t b = sl.b0; b < sl.b1; ++b) {
        const int64_t hb = b * d.H_out + j0;
        if (b >= b_end) {  // packed, this sequence has ended: its state passes through (projected: below)
          if (!d.proj) std::copy(h_in + hb, h_in + hb + n, h_out + hb);
          continue;
        }
        const bool valid = t < len[b];
        const T* xg = xg_t + b * GH + j0;
        const T* hg = h_gates + b * GH + j0;
        T* w = ws_t + b * d.ws + j0;
        if (d.cell == Cell::LSTM) {
          lstm_forward_row<T>(d.H, n, xg, hg, bias + j0, c + b * d.H + j0, h_in + hb, h_out + hb, y_t + hb, w,
                              r_buf + b * d.H + j0, valid, d.proj);
        } else if (d.cell == Cell::GRU) {
          gru_forward_row<T>(d.H, n, xg, hg, bias + j0, bias_hn + j0, h_in + hb, h_out + hb, y_t + hb, w, valid);
        } else {
          rnn_forward_row<T>(n, xg, hg, bias + j0, h_in + hb, h_out + hb, y_t + hb, valid,
                             d.cell == Cell::RNN_TANH);
        }
      }
      if (d.proj) {  // h = W_hr r for valid rows (needs every unit of r); y row is zero for invalid ones
        if (sl.shared) team_barrier(team);
        gemm_panels<T>(b_end - sl.b0, sl.o0, sl.o1, r_buf + sl.b0 * d.H, d.H, w_hr_t, T(0),
                       h_proj + sl.b0 * d.H_out, d.H_out);
        for (int64_t b = sl.b0; b < sl.b1; ++b) {
          const bool stored = b < b_end, valid = stored && t < len[b];
          for (int64_t j = k0; j < k0 + n_out; ++j) {
            const int64_t i = b * d.H_out + j;
            h_out[i] = valid ? h_proj[i] : h_in[i];
            if (stored) y_t[i] = valid ? h_proj[i] : T(0);
          }
        }
      }
      if (sl.shared) team_barrier(team);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_rnn_layer(
    const std::string& cell_name, const Tensor& x_, const Tensor& h0_, const OptTensor& c0_, const Tensor& w_ih_,
    const Tensor& w_hh_, const OptTensor& b_ih_, const OptTensor& b_hh_, const OptTensor& w_hr_,
    const OptTensor& lengths, bool reverse, bool need_workspace, const OptTensor& batch_sizes) {
  const Cell cell = parse_cell(cell_name, "cpu");
  Tensor x = contig(x_), h0 = contig(h0_), w_ih = contig(w_ih_), w_hh = contig(w_hh_);
  OptTensor c0 = contig(c0_), b_ih = contig(b_ih_), b_hh = contig(b_hh_), w_hr = contig(w_hr_);
  const LayerSetup setup = layer_setup(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, batch_sizes);
  const Dims& d = setup.d;
  const StepRows& sr = setup.rows;
  const auto& len = setup.len;
  const auto rows_shape = [&](int64_t width) { return row_shape(d, sr, width); };
  if (d.B == 0 || d.H == 0) {  // nothing to compute (and no division by the batch size below)
    return {at::zeros(rows_shape(d.H_out), x.options()), h0.clone(), c0 ? c0->clone() : at::empty({0}, x.options()),
            at::zeros({need_workspace ? d.T : 0, d.B, d.ws}, x.options())};
  }

  // The input projection runs chunk by chunk inside the loop (forward_loop), on the packed kernel of
  // cpu/blas.h rather than at::mm: ~110 GFLOP/s per Zen 4 core at m >= 16, where torch's MKL takes its
  // generic AMD path at ~75-84. Biases are added in the step.
  const int64_t GH = d.G * d.H;
  // A single step (the cells) uses each weight once per row block: packing it would cost more than the
  // product, so both projections go to at::mm before the loop (LSTMCell H=512, B=64: 3.1 ms packed, against
  // torch's 2.3).
  const bool single_step = d.T == 1;
  Tensor x_gates = single_step ? at::mm(x.view({d.B, d.I}), w_ih.t())
                               : scratch(Scratch::kGates, {projection_chunk(d) * d.B, GH}, x.scalar_type());
  Tensor y = at::empty(rows_shape(d.H_out), x.options());
  Tensor h_buf = at::empty({2, d.B, d.H_out}, x.options());
  std::memcpy(h_buf.data_ptr(), h0.data_ptr(), h0.nbytes());  // h_buf[0] (contiguous, same dtype: checked)
  Tensor c = c0 ? c0->clone() : at::empty({0}, x.options());
  Tensor ws = need_workspace ? at::empty(rows_shape(d.ws), x.options()) : at::empty({0}, x.options());
  // Without a workspace the rows still write one: a scratch block reused every step (stride 0).
  Tensor ws_scratch = need_workspace ? Tensor() : scratch(Scratch::kWorkspace, {d.B, d.ws}, x.scalar_type());
  Tensor h_gates = single_step ? at::mm(h0, w_hh.t()) : scratch(Scratch::kStepGates, {d.B, GH}, x.scalar_type());
  Tensor r_buf = scratch(Scratch::kStepRows, {d.proj ? d.B : 0, d.H}, x.scalar_type());
  Tensor h_proj = scratch(Scratch::kStepProj, {d.proj ? d.B : 0, d.H_out}, x.scalar_type());
  // One bias per gate where the cell only uses the sum; GRU keeps b_hn apart (it is scaled by r). A plain loop:
  // the zeros / copy_ / narrow / add_ it replaces were 5-7 dispatched ops a call.
  Tensor bias = at::empty({GH}, x.options());
  Tensor bias_hn = at::empty({cell == Cell::GRU ? d.H : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fusedrnn_cpu_rnn_layer_bias", [&] {
    using T = scalar_t;
    T* sum = bias.data_ptr<T>();
    const T* bi = b_ih ? b_ih->data_ptr<T>() : nullptr;
    const T* bh = b_hh ? b_hh->data_ptr<T>() : nullptr;
    const int64_t summed = cell == Cell::GRU ? 2 * d.H : GH;  // GRU: r and z only
    for (int64_t i = 0; i < GH; ++i) sum[i] = bi ? bi[i] + (i < summed ? bh[i] : T(0)) : T(0);
    for (int64_t j = 0; j < bias_hn.numel(); ++j) bias_hn.data_ptr<T>()[j] = bh ? bh[2 * d.H + j] : T(0);
  });

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fusedrnn_cpu_rnn_layer", [&] {
    using T = scalar_t;
    // W^T packed once per call, gate-interleaved (see PackedB in cpu/blas.h).
    const auto w_ih_t = single_step ? PackedB<T>() : pack_b<T>(Scratch::kPackIn, w_ih.data_ptr<T>(), d.I, d.G, d.H, 1, d.I);
    const auto w_hh_t = single_step ? PackedB<T>()
                                    : pack_b<T>(Scratch::kPackRec, w_hh.data_ptr<T>(), d.H_out, d.G, d.H, 1, d.H_out);
    const auto w_hr_t = d.proj ? pack_b<T>(Scratch::kPackProj, w_hr->data_ptr<T>(), d.H, 1, d.H_out, 1, d.H) : PackedB<T>();
    forward_loop<T>(d, sr, len, x.data_ptr<T>(), w_ih_t, x_gates.data_ptr<T>(), w_hh_t, bias.data_ptr<T>(), bias_hn.data_ptr<T>(), w_hr_t,
                    h_buf.data_ptr<T>(), c0 ? c.data_ptr<T>() : nullptr, y.data_ptr<T>(),
                    (need_workspace ? ws : ws_scratch).data_ptr<T>(), need_workspace ? d.ws : 0,
                    h_gates.data_ptr<T>(), r_buf.data_ptr<T>(), h_proj.data_ptr<T>(), single_step);
  });
  Tensor h = h_buf[d.T % 2];
  return {y, h, c, ws};
}

// Backward rows, n units each (layout as the forward rows). grad_out / grad_r are zero on invalid rows (that
// step did nothing), so every gate gradient of such a row is zero without a branch; only the carried
// cell-state gradient needs the select.
template <typename T, Isa>
FUSEDRNN_ALWAYS_INLINE void lstm_backward_row_body(int64_t H, int64_t n, const T* __restrict__ ws,
                                             const T* __restrict__ c_prev, const T* __restrict__ grad_r,
                                             T* __restrict__ grad_c, T* __restrict__ gx, bool valid) {
  with_flags(valid, false, [&](auto VALID, auto) FUSEDRNN_INLINE_LAMBDA {
    for (int64_t j = 0; j < n; ++j) {
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
FUSEDRNN_ISA_LEVELS(lstm_backward_row, (int64_t H, int64_t n, const T* __restrict__ ws, const T* __restrict__ c_prev, const T* __restrict__ grad_r, T* __restrict__ grad_c, T* __restrict__ gx, bool valid),
                    (H, n, ws, c_prev, grad_r, grad_c, gx, valid))

template <typename T, Isa>
FUSEDRNN_ALWAYS_INLINE void gru_backward_row_body(int64_t H, int64_t n, const T* __restrict__ ws,
                                            const T* __restrict__ h_prev, const T* __restrict__ grad_out,
                                            T* __restrict__ gx, T* __restrict__ gh, T* __restrict__ grad_h_direct) {
  for (int64_t j = 0; j < n; ++j) {
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
FUSEDRNN_ISA_LEVELS(gru_backward_row, (int64_t H, int64_t n, const T* __restrict__ ws, const T* __restrict__ h_prev, const T* __restrict__ grad_out, T* __restrict__ gx, T* __restrict__ gh, T* __restrict__ grad_h_direct),
                    (H, n, ws, h_prev, grad_out, gx, gh, grad_h_direct))

template <typename T, Isa>
FUSEDRNN_ALWAYS_INLINE void rnn_backward_row_body(int64_t n, const T* __restrict__ h, const T* __restrict__ grad_out,
                                            T* __restrict__ gx, bool tanh_cell) {
  with_flags(tanh_cell, false, [&](auto TANH, auto) FUSEDRNN_INLINE_LAMBDA {
    for (int64_t j = 0; j < n; ++j) {
      gx[j] = TANH ? rnn_tanh_backward<T>(h[j], grad_out[j]) : rnn_relu_backward<T>(h[j], grad_out[j]);
    }
  });
}
FUSEDRNN_ISA_LEVELS(rnn_backward_row, (int64_t n, const T* __restrict__ h, const T* __restrict__ grad_out, T* __restrict__ gx, bool tanh_cell),
                    (n, h, grad_out, gx, tanh_cell))

// ---------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------
// Fills prev (rows as sr, W wide) with the state each valid step started from: states[previous_time] or init.
template <typename T>
void gather_previous(const Dims& d, const StepRows& sr, const std::vector<int64_t>& len, const T* states,
                     int64_t stride, int64_t width, const T* init, T* prev) {
  at::parallel_for(0, d.T, std::max<int64_t>(1, 64 / d.B), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t b = 0; b < sr.stored[t]; ++b) {
        const int64_t tp = t < len[b] ? previous_time(d, t, len[b]) : -1;
        const T* src = tp >= 0 ? states + sr.at(tp, b) * stride : init + b * width;
        std::copy(src, src + width, prev + sr.at(t, b) * width);
      }
    }
  });
}

// grad_h[b, cols] = grad_h_next[b, cols] for the rows b in [b0, b1) valid at step t; an invalid step did
// nothing, so its rows pass their gradient on unchanged.
template <typename T>
void take_valid_rows(const Dims& d, const std::vector<int64_t>& len, int64_t t, int64_t b0, int64_t b1, int64_t k0,
                     int64_t n_out, const T* grad_h_next, T* grad_h) {
  for (int64_t b = b0; b < b1; ++b) {
    if (t < len[b]) {
      std::copy(grad_h_next + b * d.H_out + k0, grad_h_next + b * d.H_out + k0 + n_out, grad_h + b * d.H_out + k0);
    }
  }
}

// The reverse loop, split over the team as the forward (StepSlice). Each step's gate gradients go to their
// own rows of grad_xg / grad_hg, so one barrier per step suffices: the GEMM of step t reads every unit's gate
// gradients of step t while faster threads already write step t-1's. Rows a packed step does not store
// (ended sequences) are skipped: their gradients pass through unchanged.
template <typename T>
void backward_loop(const Dims& d, const StepRows& sr, const std::vector<int64_t>& len, const PackedB<T>& w_hh,
                   const PackedB<T>& w_hr, const T* y, const T* ws, const T* h_prev_all, const T* c0,
                   const T* grad_y, T* grad_h, T* grad_c, T* grad_xg, T* grad_hg, T* grad_out_all, T* grad_r,
                   T* grad_h_next, bool state_gemm_after) {
  constexpr int64_t NR = kPanel<T>;
  const int64_t GH = d.G * d.H;
  run_team(loop_threads(d, NR), [&](Team team) {
    const StepSlice sl = step_slice(d, NR, team);
    const int64_t j0 = sl.j0, n = sl.n, k0 = sl.k0, n_out = sl.n_out;
    for (int64_t s = d.T - 1; s >= 0; --s) {
      const int64_t t = step_time(d, s);
      const int64_t b_end = std::min(sl.b1, sr.stored[t]), row0 = sr.first[t];
      // grad_out = dL/dh_t for valid rows (zero for invalid ones: that step did nothing).
      const T* gy_t = grad_y + row0 * d.H_out;
      T* gout = grad_out_all + row0 * d.H_out;
      for (int64_t b = sl.b0; b < b_end; ++b) {
        const bool valid = t < len[b];
        for (int64_t j = k0; j < k0 + n_out; ++j) {
          const int64_t i = b * d.H_out + j;
          gout[i] = valid ? grad_h[i] + gy_t[i] : T(0);
        }
      }
      const T* g_r = gout;
      if (d.proj) {  // dL/dr = grad_out @ W_hr (needs every unit of grad_out)
        if (sl.shared) team_barrier(team);
        gemm_panels<T>(b_end - sl.b0, sl.u0, sl.u1, gout + sl.b0 * d.H_out, d.H_out, w_hr, T(0),
                       grad_r + sl.b0 * d.H, d.H);
        g_r = grad_r;
      }
      T* gxg_t = grad_xg + row0 * GH;
      T* ghg_t = d.cell == Cell::GRU ? grad_hg + row0 * GH : gxg_t;
      const T* ws_t = ws ? ws + row0 * d.ws : nullptr;
      const T* y_t = y + row0 * d.H_out;
      const T* hp_t = h_prev_all + row0 * d.H_out;
      for (int64_t b = sl.b0; b < b_end; ++b) {
        const bool valid = t < len[b];
        T* gx = gxg_t + b * GH + j0;
        if (d.cell == Cell::LSTM) {
          const int64_t tp = valid ? previous_time(d, t, len[b]) : -1;
          const T* c_prev = tp >= 0 ? ws + sr.at(tp, b) * d.ws + 4 * d.H : c0 + b * d.H;
          lstm_backward_row<T>(d.H, n, ws_t + b * d.ws + j0, c_prev + j0, g_r + b * d.H + j0,
                               grad_c + b * d.H + j0, gx, valid);
        } else if (d.cell == Cell::GRU) {
          gru_backward_row<T>(d.H, n, ws_t + b * d.ws + j0, hp_t + b * d.H + j0, gout + b * d.H + j0, gx,
                              ghg_t + b * GH + j0, grad_h_next + b * d.H + j0);
        } else {
          rnn_backward_row<T>(n, y_t + b * d.H + j0, gout + b * d.H + j0, gx, d.cell == Cell::RNN_TANH);
        }
      }
      // dL/dh_{t-1} = grad_hg @ W_hh (+ GRU's direct term): needs every unit's gate gradients.
      if (state_gemm_after) break;  // single step: the caller runs it on at::mm
      if (sl.shared) team_barrier(team);
      gemm_panels<T>(b_end - sl.b0, sl.o0, sl.o1, ghg_t + sl.b0 * GH, GH, w_hh, d.cell == Cell::GRU ? T(1) : T(0),
                     grad_h_next + sl.b0 * d.H_out, d.H_out);
      take_valid_rows<T>(d, len, t, sl.b0, b_end, k0, n_out, grad_h_next, grad_h);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cpu_rnn_layer_backward(
    const std::string& cell_name, const Tensor& x_, const Tensor& h0_, const OptTensor& c0_, const Tensor& w_ih_,
    const Tensor& w_hh_, const OptTensor& b_ih_, const OptTensor& b_hh_, const OptTensor& w_hr_,
    const OptTensor& lengths, bool reverse, const Tensor& y_, const Tensor& ws_, const Tensor& grad_y_,
    const Tensor& grad_h_n, const OptTensor& grad_c_n, const OptTensor& batch_sizes) {
  const Cell cell = parse_cell(cell_name, "cpu");
  Tensor x = contig(x_), h0 = contig(h0_), w_ih = contig(w_ih_), w_hh = contig(w_hh_);
  OptTensor c0 = contig(c0_), b_ih = contig(b_ih_), b_hh = contig(b_hh_), w_hr = contig(w_hr_);
  Tensor y = contig(y_), ws = contig(ws_), grad_y = contig(grad_y_);
  const LayerSetup setup = layer_setup(cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, batch_sizes);
  const Dims& d = setup.d;
  const StepRows& sr = setup.rows;
  const auto& len = setup.len;
  const int64_t rows = sr.total;
  TORCH_CHECK(ws.numel() == rows * d.ws,
              "fusedrnn cpu: workspace of ", ws.numel(), " elements does not match this call (expected ",
              rows * d.ws, "): was the forward run with need_workspace=True?");
  TORCH_CHECK(y.numel() == rows * d.H_out && grad_y.numel() == rows * d.H_out,
              "fusedrnn cpu: y and grad_y must have ", rows * d.H_out, " elements, got ", y.numel(), " and ",
              grad_y.numel());
  TORCH_CHECK(grad_h_n.sizes() == at::IntArrayRef({d.B, d.H_out}), "fusedrnn cpu: grad_h_n must be [B, H_out] = [",
              d.B, ", ", d.H_out, "], got ", grad_h_n.sizes());
  TORCH_CHECK(!grad_c_n || (cell == Cell::LSTM && grad_c_n->sizes() == at::IntArrayRef({d.B, d.H}) &&
                            grad_c_n->scalar_type() == x.scalar_type()),
              "fusedrnn cpu: grad_c_n must be an LSTM's [B, H] = [", d.B, ", ", d.H, "] of x's dtype");
  TORCH_CHECK(grad_h_n.scalar_type() == x.scalar_type() && grad_y.scalar_type() == x.scalar_type() &&
                  y.scalar_type() == x.scalar_type() && ws.scalar_type() == x.scalar_type(),
              "fusedrnn cpu: y, workspace and the gradients must have x's dtype");
  const int64_t GH = d.G * d.H;
  auto opts = x.options();
  if (d.B == 0 || d.H == 0) {  // no step computed anything: the state gradients pass through, the rest is 0
    return {at::zeros_like(x), grad_h_n.clone(),
            cell == Cell::LSTM ? (grad_c_n ? grad_c_n->clone() : at::zeros_like(*c0)) : at::empty({0}, opts),
            at::zeros_like(w_ih), at::zeros_like(w_hh), d.bias ? at::zeros({GH}, opts) : at::empty({0}, opts),
            d.bias ? at::zeros({GH}, opts) : at::empty({0}, opts),
            d.proj ? at::zeros_like(*w_hr) : at::empty({0}, opts)};
  }
  const bool single_step = d.T == 1;  // as in the forward: at::mm instead of packing W_hh and W_ih

  Tensor grad_h = grad_h_n.contiguous().clone();
  Tensor grad_c = cell == Cell::LSTM ? (grad_c_n ? grad_c_n->contiguous().clone() : at::zeros_like(*c0))
                                     : at::empty({0}, opts);
  Tensor grad_xg = scratch(Scratch::kGradGates, {rows, GH}, x.scalar_type());
  Tensor grad_hg = cell == Cell::GRU ? scratch(Scratch::kGradGatesH, {rows, GH}, x.scalar_type()) : grad_xg;
  Tensor grad_out_all = scratch(Scratch::kGradOut, {rows, d.H_out}, x.scalar_type());
  Tensor grad_r = d.proj ? scratch(Scratch::kStepRows, {d.B, d.H}, x.scalar_type()) : Tensor();
  Tensor grad_h_next = scratch(Scratch::kStepProj, {d.B, d.H_out}, x.scalar_type());
  Tensor h_prev_all = scratch(Scratch::kPrevState, {rows, d.H_out}, x.scalar_type());

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fusedrnn_cpu_rnn_layer_backward", [&] {
    gather_previous<scalar_t>(d, sr, len, y.data_ptr<scalar_t>(), d.H_out, d.H_out, h0.data_ptr<scalar_t>(),
                              h_prev_all.data_ptr<scalar_t>());
    const auto w_hh_p = single_step ? PackedB<scalar_t>()
                                    : pack_b<scalar_t>(Scratch::kPackRec, w_hh.data_ptr<scalar_t>(), d.G * d.H, 1,
                                                       d.H_out, d.H_out, 1);
    const auto w_hr_p = d.proj ? pack_b<scalar_t>(Scratch::kPackProj, w_hr->data_ptr<scalar_t>(), d.H_out, 1, d.H, d.H, 1)
                               : PackedB<scalar_t>();
    backward_loop<scalar_t>(d, sr, len, w_hh_p, w_hr_p,
                            y.data_ptr<scalar_t>(), d.ws ? ws.data_ptr<scalar_t>() : nullptr,
                            h_prev_all.data_ptr<scalar_t>(), c0 ? c0->data_ptr<scalar_t>() : nullptr,
                            grad_y.data_ptr<scalar_t>(), grad_h.data_ptr<scalar_t>(),
                            cell == Cell::LSTM ? grad_c.data_ptr<scalar_t>() : nullptr,
                            grad_xg.data_ptr<scalar_t>(), grad_hg.data_ptr<scalar_t>(),
                            grad_out_all.data_ptr<scalar_t>(), d.proj ? grad_r.data_ptr<scalar_t>() : nullptr,
                            grad_h_next.data_ptr<scalar_t>(), single_step);
  });
  if (single_step) {  // the loop's last GEMM and copy, with at::mm: dL/dh0 = grad_hg @ W_hh (+ GRU's direct term)
    grad_h_next.addmm_(grad_hg.view({d.B, GH}), w_hh, /*beta=*/cell == Cell::GRU ? 1 : 0);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fusedrnn_cpu_rnn_layer_single_step", [&] {
      take_valid_rows<scalar_t>(d, len, 0, 0, d.B, 0, d.H_out, grad_h_next.data_ptr<scalar_t>(),
                                grad_h.data_ptr<scalar_t>());
    });
  }

  // Everything off the recurrence: one GEMM / reduction each over all stored rows, on the packed kernel
  // (see the input projection in the forward for why not at::mm).
  Tensor grad_x = at::empty(row_shape(d, sr, d.I), opts);
  Tensor grad_w_ih = at::empty({GH, d.I}, opts);
  Tensor grad_w_hh = at::empty({GH, d.H_out}, opts);
  if (single_step) {
    Tensor grad_x_rows = grad_x.view({rows, d.I});
    at::mm_out(grad_x_rows, grad_xg.view({rows, GH}), w_ih);
  } else {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fusedrnn_cpu_rnn_layer_weight_grads", [&] {
      using T = scalar_t;
      // grad_x [rows, I] = grad_xg [rows, GH] @ W_ih [GH, I]
      gemm_packed<T>(rows, grad_xg.data_ptr<T>(), pack_b<T>(Scratch::kPackIn, w_ih.data_ptr<T>(), GH, 1, d.I, d.I, 1),
                     T(0), grad_x.data_ptr<T>());
    });
  }
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

// How the recurrence of a call of this shape splits over threads: {threads, 1 if they split hidden units
// (a barrier per step) else 0}. For tests and `fusedrnn.explain`-style diagnostics.
std::vector<int64_t> cpu_loop_plan(const std::string& cell_name, int64_t batch, int64_t hidden, int64_t hidden_out,
                                   bool proj, bool fp64) {
  Dims d{};
  d.cell = parse_cell(cell_name, "cpu");
  d.G = num_gates(d.cell);
  d.B = batch, d.H = hidden, d.H_out = hidden_out, d.proj = proj;
  const int64_t nr = fp64 ? kPanel<double> : kPanel<float>;
  const int threads = loop_threads(d, nr);
  return {threads, step_slice(d, nr, Team{0, threads}).shared ? 1 : 0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def("cpu_loop_plan(str cell, int batch, int hidden, int hidden_out, bool proj, bool fp64) -> int[]",
        &cpu_loop_plan);
  m.def("cpu_rnn_layer(str cell, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
        "Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, bool need_workspace, "
        "Tensor? batch_sizes=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cpu_rnn_layer_backward(str cell, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
        "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, Tensor y, Tensor workspace, "
        "Tensor grad_y, Tensor grad_h_n, Tensor? grad_c_n, Tensor? batch_sizes=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("cpu_rnn_layer", &cpu_rnn_layer);
  m.impl("cpu_rnn_layer_backward", &cpu_rnn_layer_backward);
}

}  // namespace fusedrnn::cpu
