// The layout of a PackedSequence (batch_sizes, sorted_indices), read and validated once on the CPU.
// Users: the packing pair (cpu/packed_sequence.cpp) and the layer kernel on packed data (cpu/rnn_layer.cpp).
//
// Packed rows are time-major; at step t the rows of ranks 0 .. batch_sizes[t]-1 (sorted order, longest first);
// rank r is the caller's sequence sorted_indices[r] (identity when absent).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace fusedrnn::cpu {

struct PackedLayout {
  int64_t T = 0, B = 0, rows = 0;
  std::vector<int64_t> first_row;  // [T]: the packed row of rank 0 at step t
  std::vector<int64_t> sizes;      // batch_sizes
  std::vector<int64_t> order;      // [B]: rank -> caller's index

  // Steps of the sequence of rank r (ranks are longest first, so this falls as r grows).
  std::vector<int64_t> lengths() const {
    std::vector<int64_t> len(B);
    for (int64_t r = 0, t = T; r < B; ++r) {
      while (t > 0 && sizes[t - 1] <= r) --t;
      len[r] = t;
    }
    return len;
  }
};

// Validates batch_sizes / sorted_indices as a PackedSequence built by torch would have them (a hand-made one
// with bad values must raise, not copy out of bounds).
inline PackedLayout layout_of(const at::Tensor& batch_sizes, const std::optional<at::Tensor>& sorted_indices, int64_t rows,
                              const char* op) {
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong,
              op, ": batch_sizes: expected a 1-D int64 CPU tensor (PackedSequence.batch_sizes), got ",
              batch_sizes.scalar_type(), " of shape ", batch_sizes.sizes(), " on ", batch_sizes.device());
  PackedLayout l;
  l.T = batch_sizes.size(0);
  TORCH_CHECK(l.T > 0, op, ": batch_sizes: expected at least one time step, got none");
  const at::Tensor bs = batch_sizes.contiguous();
  const int64_t* s = bs.data_ptr<int64_t>();
  l.sizes.assign(s, s + l.T);
  l.B = l.sizes[0];
  l.first_row.resize(l.T);
  for (int64_t t = 0; t < l.T; ++t) {
    TORCH_CHECK(l.sizes[t] >= 1 && l.sizes[t] <= (t ? l.sizes[t - 1] : l.B), op,
                ": batch_sizes: expected non-increasing values >= 1, got ", l.sizes[t], " at step ", t);
    l.first_row[t] = l.rows;
    l.rows += l.sizes[t];
  }
  TORCH_CHECK(l.rows == rows, op, ": batch_sizes sum to ", l.rows, " rows, but the data has ", rows);
  l.order.resize(l.B);
  if (sorted_indices && sorted_indices->defined()) {
    TORCH_CHECK(sorted_indices->dim() == 1 && sorted_indices->size(0) == l.B && sorted_indices->scalar_type() == at::kLong,
                op, ": sorted_indices: expected an int64 tensor [", l.B, "], got ", sorted_indices->scalar_type(),
                " of shape ", sorted_indices->sizes());
    const at::Tensor si = sorted_indices->to(at::kCPU).contiguous();
    std::vector<char> seen(l.B, 0);
    for (int64_t r = 0; r < l.B; ++r) {
      const int64_t b = si.data_ptr<int64_t>()[r];
      TORCH_CHECK(b >= 0 && b < l.B && !seen[b], op, ": sorted_indices: expected a permutation of 0..", l.B - 1,
                  ", got ", b, " at position ", r);
      seen[b] = 1;
      l.order[r] = b;
    }
  } else {
    for (int64_t r = 0; r < l.B; ++r) l.order[r] = r;
  }
  return l;
}

}  // namespace fusedrnn::cpu
