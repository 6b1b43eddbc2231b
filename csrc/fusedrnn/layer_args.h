// The arguments of one layer call (fusedrnn::<backend>_rnn_layer ops): cell names, sizes, and the shape
// checks every backend's op runs before touching memory. Device and dtype rules differ per backend and stay
// with it. The Python layer (fusedrnn/functional.py) validates first with friendlier messages; these checks
// guard direct callers of the ops.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "fusedrnn/cell_math.h"

namespace fusedrnn {

inline Cell parse_cell(const std::string& name, const char* backend) {
  if (name == "lstm") return Cell::LSTM;
  if (name == "gru") return Cell::GRU;
  if (name == "rnn_tanh") return Cell::RNN_TANH;
  if (name == "rnn_relu") return Cell::RNN_RELU;
  TORCH_CHECK(false, "fusedrnn ", backend, ": cell must be one of lstm, gru, rnn_tanh, rnn_relu, got '", name, "'");
}

struct LayerDims {
  Cell cell;
  int64_t T, B, I, H, H_out, G;
  bool proj, bias, reverse;
  int64_t ws;  // workspace row width per batch element (layout: fusedrnn/backends/base.py)
};

inline LayerDims layer_dims(Cell cell, int64_t T, int64_t B, int64_t I, const at::Tensor& w_hh, const at::Tensor& h0,
                            bool proj, bool bias, bool reverse) {
  LayerDims d;
  d.cell = cell;
  d.T = T;
  d.B = B;
  d.I = I;
  d.G = num_gates(cell);
  d.H = w_hh.size(0) / d.G;
  d.H_out = h0.size(-1);
  d.proj = proj;
  d.bias = bias;
  d.reverse = reverse;
  d.ws = cell == Cell::LSTM ? (proj ? 6 : 5) * d.H : cell == Cell::GRU ? 4 * d.H : 0;
  return d;
}

inline LayerDims layer_dims(Cell cell, const at::Tensor& x, const at::Tensor& w_hh, const at::Tensor& h0, bool proj,
                            bool bias, bool reverse) {
  return layer_dims(cell, x.size(0), x.size(1), x.size(2), w_hh, h0, proj, bias, reverse);
}

// Everything check_layer_shapes checks but x (a packed x is [rows, I]: its caller checks it).
inline void check_weight_shapes(const char* backend, const LayerDims& d, const at::Tensor& h0,
                                const std::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                                const std::optional<at::Tensor>& w_hr) {
  TORCH_CHECK(w_ih.sizes() == at::IntArrayRef({d.G * d.H, d.I}), "fusedrnn ", backend, ": w_ih must be [G*H, I]");
  TORCH_CHECK(w_hh.sizes() == at::IntArrayRef({d.G * d.H, d.H_out}), "fusedrnn ", backend,
              ": w_hh must be [G*H, H_out]");
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({d.B, d.H_out}), "fusedrnn ", backend, ": h0 must be [B, H_out]");
  TORCH_CHECK((d.cell == Cell::LSTM) == c0.has_value(), "fusedrnn ", backend, ": c0 is required for LSTM only");
  if (c0) TORCH_CHECK(c0->sizes() == at::IntArrayRef({d.B, d.H}), "fusedrnn ", backend, ": c0 must be [B, H]");
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "fusedrnn ", backend, ": give both biases or neither");
  if (b_ih) {
    TORCH_CHECK(b_ih->sizes() == at::IntArrayRef({d.G * d.H}) && b_hh->sizes() == at::IntArrayRef({d.G * d.H}),
                "fusedrnn ", backend, ": biases must be [G*H]");
  }
  if (w_hr) {
    TORCH_CHECK(w_hr->sizes() == at::IntArrayRef({d.H_out, d.H}), "fusedrnn ", backend, ": w_hr must be [H_out, H]");
  }
  TORCH_CHECK(!w_hr || d.cell == Cell::LSTM, "fusedrnn ", backend, ": projection is LSTM-only");
  TORCH_CHECK(d.proj || d.H_out == d.H, "fusedrnn ", backend, ": H_out != H needs w_hr");
}

inline void check_layer_shapes(const char* backend, const LayerDims& d, const at::Tensor& x, const at::Tensor& h0,
                               const std::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                               const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                               const std::optional<at::Tensor>& w_hr) {
  TORCH_CHECK(x.dim() == 3 && d.T > 0, "fusedrnn ", backend, ": x must be [T>0, B, I]");
  check_weight_shapes(backend, d, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
}

}  // namespace fusedrnn
