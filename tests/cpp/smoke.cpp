// Smoke test of the libtorch build (CMakeLists.txt): the fusedrnn ops are registered by linking the library,
// and the CPU LSTM layer agrees with a one-step computation written out here with ATen ops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>

int main() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fusedrnn::cpu_rnn_layer", "");
  auto layer = op.typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const std::string&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, bool,
      const std::optional<at::Tensor>&)>();
  const int64_t T = 1, B = 3, I = 5, H = 4;
  at::manual_seed(0);
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto x = at::randn({T, B, I}, opts), h0 = at::randn({B, H}, opts), c0 = at::randn({B, H}, opts);
  auto w_ih = at::randn({4 * H, I}, opts), w_hh = at::randn({4 * H, H}, opts);
  auto b_ih = at::randn({4 * H}, opts), b_hh = at::randn({4 * H}, opts);
  auto [y, h_n, c_n, ws] = layer.call("lstm", x, h0, c0, w_ih, w_hh, b_ih, b_hh, std::nullopt, std::nullopt,
                                      false, true, std::nullopt);
  // the same step on packed data (batch_sizes [B]: one step of B sequences)
  auto packed = layer.call("lstm", x[0], h0, c0, w_ih, w_hh, b_ih, b_hh, std::nullopt, std::nullopt, false, true,
                           at::full({T}, B, at::TensorOptions().dtype(at::kLong)));
  auto gates = (at::mm(x[0], w_ih.t()) + b_ih + at::mm(h0, w_hh.t()) + b_hh).chunk(4, 1);
  auto c = at::sigmoid(gates[1]) * c0 + at::sigmoid(gates[0]) * at::tanh(gates[2]);
  auto h = at::sigmoid(gates[3]) * at::tanh(c);
  const double err = std::max((h - h_n).abs().max().item<double>(), (c - c_n).abs().max().item<double>());
  const double packed_err = (std::get<1>(packed) - h_n).abs().max().item<double>();
  const bool ok = err < 1e-12 && packed_err < 1e-12 && y.sizes() == at::IntArrayRef({T, B, H}) && ws.size(2) == 5 * H &&
                  std::get<0>(packed).sizes() == at::IntArrayRef({B, H});
  std::cout << "fusedrnn C++ smoke test: max error " << err << (ok ? " OK" : " FAILED") << std::endl;
  return ok ? 0 : 1;
}
