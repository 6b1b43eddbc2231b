// PackedSequence <-> padded batch on the CPU, one pass each (fusedrnn/nn.py: _unpack / _repack).
//
// torch's pad_packed_sequence / pack_padded_sequence copy one time step at a time, and the index_copy /
// index_select pair that replaced them inside the modules still costs ~10 tensor ops of setup (positions,
// masks, lengths): 75 us at T=10, B=16, H=128 on a quiet core, 0.36 ms between other calls, against a ~1 ms
// LSTM forward. Here each is one loop of row copies, with the lengths counted on the way.
//
// Layout: cpu/packed_layout.h. The padded batch is [T, B, W] in the caller's order, zero past each sequence's end.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/packed_layout.h"

#include <cstring>
#include <vector>

namespace fusedrnn::cpu {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

// Rows of a few hundred bytes: enough steps per task that the fork costs less than the copies.
constexpr int64_t kStepsPerTask = 64;

std::tuple<Tensor, Tensor> packed_to_padded(const Tensor& data_, const Tensor& batch_sizes, const OptTensor& sorted_indices) {
  TORCH_CHECK(data_.device().is_cpu() && data_.dim() >= 1, "packed_to_padded: data: expected a CPU tensor [rows, *], got ",
              data_.dim(), "-D on ", data_.device());
  const Tensor data = data_.contiguous();
  const PackedLayout l = layout_of(batch_sizes, sorted_indices, data.size(0), "packed_to_padded");
  std::vector<int64_t> shape{l.T, l.B};
  for (int64_t d = 1; d < data.dim(); ++d) shape.push_back(data.size(d));
  Tensor padded = at::empty(shape, data.options());
  const int64_t row_bytes = data.numel() / std::max<int64_t>(data.size(0), 1) * static_cast<int64_t>(data.element_size());
  const char* src = static_cast<const char*>(data.data_ptr());
  char* dst = static_cast<char*>(padded.data_ptr());
  at::parallel_for(0, l.T, kStepsPerTask, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t r = 0; r < l.B; ++r) {
        char* out = dst + (t * l.B + l.order[r]) * row_bytes;
        if (r < l.sizes[t]) {
          std::memcpy(out, src + (l.first_row[t] + r) * row_bytes, row_bytes);
        } else {
          std::memset(out, 0, row_bytes);  // past the sequence's end (all-zero bits: 0 in every float type)
        }
      }
    }
  });
  Tensor lengths = at::zeros({l.B}, batch_sizes.options());
  int64_t* len = lengths.data_ptr<int64_t>();
  const std::vector<int64_t> by_rank = l.lengths();
  for (int64_t r = 0; r < l.B; ++r) len[l.order[r]] = by_rank[r];
  return {padded, lengths};
}

Tensor padded_to_packed(const Tensor& padded_, const Tensor& batch_sizes, const OptTensor& sorted_indices) {
  TORCH_CHECK(padded_.device().is_cpu() && padded_.dim() >= 2, "padded_to_packed: padded: expected a CPU tensor [T, B, *], got ",
              padded_.dim(), "-D on ", padded_.device());
  const Tensor padded = padded_.contiguous();
  const int64_t T = batch_sizes.dim() == 1 ? batch_sizes.size(0) : -1;
  TORCH_CHECK(padded.size(0) == T, "padded_to_packed: padded: expected ", T, " time steps (batch_sizes), got ",
              padded.size(0));
  int64_t rows = 0;
  if (batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong) rows = batch_sizes.sum().item<int64_t>();
  const PackedLayout l = layout_of(batch_sizes, sorted_indices, rows, "padded_to_packed");
  TORCH_CHECK(padded.size(1) == l.B, "padded_to_packed: padded: expected a batch of ", l.B, ", got ", padded.size(1));
  std::vector<int64_t> shape{l.rows};
  for (int64_t d = 2; d < padded.dim(); ++d) shape.push_back(padded.size(d));
  Tensor data = at::empty(shape, padded.options());
  const int64_t row_bytes = l.T * l.B == 0 ? 0 : padded.numel() / (l.T * l.B) * static_cast<int64_t>(padded.element_size());
  const char* src = static_cast<const char*>(padded.data_ptr());
  char* dst = static_cast<char*>(data.data_ptr());
  at::parallel_for(0, l.T, kStepsPerTask, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t r = 0; r < l.sizes[t]; ++r) {
        std::memcpy(dst + (l.first_row[t] + r) * row_bytes, src + (t * l.B + l.order[r]) * row_bytes, row_bytes);
      }
    }
  });
  return data;
}

// The layout torch.nn.utils.rnn.pack_padded_sequence gives a batch of `lengths` (T padded steps):
// (batch_sizes, sorted_indices, unsorted_indices), the indices empty under enforce_sorted. The order is
// at::sort's (descending), the sort torch's function runs, so ties fall the same way. Lengths it would
// refuse (outside [1, T], unsorted under enforce_sorted) give an empty batch_sizes: the caller then leaves
// the call to torch's function, for torch's own error. Replaces ~10 tensor ops of Python (aminmax, the
// order check, sort, arange, compare, sum: 0.2-0.3 ms a call between RNN calls at T=10, B=16).
std::tuple<Tensor, Tensor, Tensor> packed_layout(const Tensor& lengths_, int64_t T, bool enforce_sorted) {
  TORCH_CHECK(lengths_.device().is_cpu() && lengths_.dim() == 1 && at::isIntegralType(lengths_.scalar_type(), false),
              "packed_layout: lengths: expected a 1-D integer CPU tensor, got ", lengths_.scalar_type(), " of shape ",
              lengths_.sizes(), " on ", lengths_.device());
  const Tensor lengths = lengths_.to(at::kLong).contiguous();
  const int64_t B = lengths.numel();
  const auto long_opts = at::TensorOptions().dtype(at::kLong);
  const Tensor none = at::empty({0}, long_opts);
  const int64_t* len = lengths.data_ptr<int64_t>();
  int64_t lo = B ? len[0] : 0, hi = 0;
  bool ordered = true;
  for (int64_t b = 0; b < B; ++b) {
    lo = std::min(lo, len[b]);
    hi = std::max(hi, len[b]);
    ordered = ordered && (b == 0 || len[b - 1] >= len[b]);
  }
  if (B == 0 || lo < 1 || hi > T || (enforce_sorted && !ordered)) return {none, none, none};
  Tensor sorted_indices = none, unsorted_indices = none, sorted_lengths = lengths;
  if (!enforce_sorted) {
    std::tie(sorted_lengths, sorted_indices) = at::sort(lengths, 0, /*descending=*/true);
    unsorted_indices = at::empty({B}, long_opts);
    const int64_t* order = sorted_indices.data_ptr<int64_t>();
    int64_t* inverse = unsorted_indices.data_ptr<int64_t>();
    for (int64_t r = 0; r < B; ++r) inverse[order[r]] = r;
  }
  Tensor batch_sizes = at::empty({hi}, long_opts);
  const int64_t* sl = sorted_lengths.data_ptr<int64_t>();
  int64_t* bs = batch_sizes.data_ptr<int64_t>();
  for (int64_t t = 0, running = B; t < hi; ++t) {  // lengths descend: the running count only falls
    while (running > 0 && sl[running - 1] <= t) --running;
    bs[t] = running;
  }
  return {batch_sizes, sorted_indices, unsorted_indices};
}

// Raises unless (batch_sizes, sorted_indices) over `rows` packed rows is a layout torch builds: the modules'
// in-place path (fusedrnn/nn.py) checks a hand-made PackedSequence once a call, as the unpack path did
// (index_select alone would take a sorted_indices with repeats and answer wrongly).
void check_packed_layout(const Tensor& batch_sizes, const OptTensor& sorted_indices, int64_t rows) {
  layout_of(batch_sizes, sorted_indices, rows, "PackedSequence");
}

}  // namespace
}  // namespace fusedrnn::cpu

TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def("cpu_packed_to_padded(Tensor data, Tensor batch_sizes, Tensor? sorted_indices) -> (Tensor, Tensor)");
  m.def("cpu_padded_to_packed(Tensor padded, Tensor batch_sizes, Tensor? sorted_indices) -> Tensor");
  m.def("cpu_packed_layout(Tensor lengths, int T, bool enforce_sorted) -> (Tensor, Tensor, Tensor)");
  m.def("cpu_check_packed_layout(Tensor batch_sizes, Tensor? sorted_indices, int rows) -> ()");
}
TORCH_LIBRARY_IMPL(fusedrnn, CPU, m) {
  m.impl("cpu_packed_to_padded", &fusedrnn::cpu::packed_to_padded);
  m.impl("cpu_padded_to_packed", &fusedrnn::cpu::padded_to_packed);
  m.impl("cpu_packed_layout", &fusedrnn::cpu::packed_layout);
  m.impl("cpu_check_packed_layout", &fusedrnn::cpu::check_packed_layout);
}
