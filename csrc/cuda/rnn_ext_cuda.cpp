// Backend "cuda" of fusedrnn::rnn_layer_ext: its two row kernels (rnn_ext.cu) as torch ops on CUDA tensors,
//
//   fusedrnn::cuda_ext_forward_rows(cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev,
//                                   zoneout_h, zoneout_c, valid) -> (h_new, c_new, y)
//   fusedrnn::cuda_ext_backward_rows(..., valid, grad_h, grad_y, grad_c, acc!)
//       -> (d_ax, d_ah, grad_h_prev, grad_c_prev)
//
// with the contract of fusedrnn/backends/ext.py (module doc; ReferenceRows). The driver of the op (the GEMMs, the
// time loop) is the Python one of that file; fusedrnn/backends/ext_cuda.py hands it these ops. Validates every
// argument (messages name it), accepts row-strided [B, n] inputs (the driver passes views of its workspace),
// allocates the outputs, and gives the kernels a global row-cache scratch when their shared-memory cache would
// not fit the device (rnn_ext.h).
// Built twice, like rnn_layer_cuda.cpp: FUSEDRNN_WITH_CUDA (CUDA tensors) and FUSEDRNN_EMU (the cuda-emu backend:
// ops fusedrnn::cuda_emu_ext_*, CPU tensors, the kernels emulated; csrc/emu/rnn_ext_cuda_emu.cpp).
#if defined(FUSEDRNN_WITH_CUDA) || defined(FUSEDRNN_EMU)

#include "cuda/op_glue.h"

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "cuda/rnn_ext.h"

namespace fusedrnn::cuda::ext {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

#define EXT_FWD "fusedrnn " FUSEDRNN_CUDA_OP("ext_forward_rows") ": "
#define EXT_BWD "fusedrnn " FUSEDRNN_CUDA_OP("ext_backward_rows") ": "

// The device's opt-in dynamic shared memory per block, cached (every call needs it).
int smem_optin(int device) {
  static std::array<int, 64> cache{};
  if (device < 0 || device >= static_cast<int>(cache.size())) device = 0;
  if (cache[device] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cache[device] = v;
  }
  return cache[device];
}

// Everything of one call the two ops share: dims, dtype, and the arguments in kernel-ready form.
struct Call {
  const char* op;
  bool lstm;
  int64_t B, H, G, GH;
  at::ScalarType dtype;
  DType dt;
  Tensor ax, ah, h_prev, c_prev, zoneout_h, zoneout_c;  // [B, n], unit inner stride
  Tensor b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, valid;  // contiguous
};

// t itself when its rows have unit inner stride (any row stride, e.g. a view of the driver's workspace), else a
// contiguous copy.
Tensor rows(const Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

void check_rows(const char* op, const char* name, const Tensor& t, int64_t B, int64_t n, at::ScalarType dtype,
                const Tensor& ax) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == n, op, name, " must be [", B, ", ", n, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(on_kernel_device(t) && t.device() == ax.device(), op, name, " must be on ", ax.device(),
              " (the device of ax), got ", t.device());
}

void check_vec(const char* op, const char* name, const Tensor& t, int64_t n, at::ScalarType dtype, const Tensor& ax) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, name, " must be [", n, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(on_kernel_device(t) && t.device() == ax.device(), op, name, " must be on ", ax.device(),
              " (the device of ax), got ", t.device());
}

Call make_call(const char* op, const std::string& cell, const Tensor& ax, const Tensor& ah, const OptTensor& b_ih,
               const OptTensor& b_hh, const OptTensor& ln_ih, const OptTensor& ln_hh, const OptTensor& ln_c_weight,
               const OptTensor& ln_c_bias, const Tensor& h_prev, const OptTensor& c_prev, const OptTensor& zoneout_h,
               const OptTensor& zoneout_c, const OptTensor& valid) {
  Call c;
  c.op = op;
  TORCH_CHECK(cell == "lstm" || cell == "gru", op, "cell must be 'lstm' or 'gru', got '", cell, "'");
  c.lstm = cell == "lstm";
  c.G = c.lstm ? 4 : 3;
  TORCH_CHECK(on_kernel_device(ax), op, "ax must be on " FUSEDRNN_CUDA_TENSORS ", got ", ax.device());
  c.dtype = ax.scalar_type();
  TORCH_CHECK(c.dtype == at::kFloat || c.dtype == at::kHalf || c.dtype == at::kBFloat16, op,
              "ax must be float32, float16 or bfloat16, got ", c.dtype);
  c.dt = c.dtype == at::kFloat ? DType::F32 : c.dtype == at::kHalf ? DType::F16 : DType::BF16;
  TORCH_CHECK(ax.dim() == 2 && ax.size(1) % c.G == 0, op, "ax must be [B, ", c.G, "*H] for ", cell, ", got ",
              ax.sizes());
  c.B = ax.size(0);
  c.GH = ax.size(1);
  c.H = c.GH / c.G;
  TORCH_CHECK(c.GH < (int64_t(1) << 31) && c.B < (int64_t(1) << 31), op, "ax is too large (", ax.sizes(),
              "): rows of at most 2^31 - 1 elements, at most 2^31 - 1 rows");
  check_rows(op, "ax", ax, c.B, c.GH, c.dtype, ax);
  check_rows(op, "ah", ah, c.B, c.GH, c.dtype, ax);
  check_rows(op, "h_prev", h_prev, c.B, c.H, c.dtype, ax);
  c.ax = rows(ax);
  c.ah = rows(ah);
  c.h_prev = rows(h_prev);
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), op, "b_ih, b_hh: give both biases or neither");
  TORCH_CHECK(ln_ih.has_value() == ln_hh.has_value(), op, "ln_ih, ln_hh: give both layer-norm gains or neither");
  TORCH_CHECK(ln_c_weight.has_value() == ln_c_bias.has_value(), op,
              "ln_c_weight, ln_c_bias: give both or neither");
  if (c.lstm) {
    TORCH_CHECK(c_prev.has_value(), op, "c_prev is required for lstm");
    check_rows(op, "c_prev", *c_prev, c.B, c.H, c.dtype, ax);
    c.c_prev = rows(*c_prev);
    TORCH_CHECK(!ln_c_weight || ln_ih, op, "ln_c_weight, ln_c_bias: the cell-state norm comes only with ln_ih, ln_hh");
  } else {
    TORCH_CHECK(!c_prev && !ln_c_weight && !zoneout_c, op,
                "gru has no cell state: c_prev, ln_c_weight, ln_c_bias and zoneout_c must be None");
  }
  auto vec = [&](const OptTensor& t, const char* name, int64_t n) {
    if (!t) return Tensor();
    check_vec(op, name, *t, n, c.dtype, ax);
    return t->contiguous();
  };
  c.b_ih = vec(b_ih, "b_ih", c.GH);
  c.b_hh = vec(b_hh, "b_hh", c.GH);
  c.ln_ih = vec(ln_ih, "ln_ih", c.GH);
  c.ln_hh = vec(ln_hh, "ln_hh", c.GH);
  c.ln_c_weight = vec(ln_c_weight, "ln_c_weight", c.H);
  c.ln_c_bias = vec(ln_c_bias, "ln_c_bias", c.H);
  if (zoneout_h) {
    check_rows(op, "zoneout_h", *zoneout_h, c.B, c.H, c.dtype, ax);
    c.zoneout_h = rows(*zoneout_h);
  }
  if (zoneout_c) {
    check_rows(op, "zoneout_c", *zoneout_c, c.B, c.H, c.dtype, ax);
    c.zoneout_c = rows(*zoneout_c);
  }
  if (valid) {
    check_vec(op, "valid", *valid, c.B, at::kBool, ax);
    c.valid = valid->contiguous();
  }
  return c;
}

template <typename P>
const void* ptr(const P& t) {
  return t.defined() ? t.const_data_ptr() : nullptr;
}

ExtRows kernel_args(const Call& c) {
  ExtRows a{};
  a.lstm = c.lstm ? 1 : 0;
  a.B = static_cast<int>(c.B);
  a.H = static_cast<int>(c.H);
  a.ax = c.ax.const_data_ptr();
  a.ax_stride = c.ax.stride(0);
  a.ah = c.ah.const_data_ptr();
  a.ah_stride = c.ah.stride(0);
  a.b_ih = ptr(c.b_ih);
  a.b_hh = ptr(c.b_hh);
  a.ln_ih = ptr(c.ln_ih);
  a.ln_hh = ptr(c.ln_hh);
  a.ln_c_weight = ptr(c.ln_c_weight);
  a.ln_c_bias = ptr(c.ln_c_bias);
  a.h_prev = c.h_prev.const_data_ptr();
  a.h_prev_stride = c.h_prev.stride(0);
  if (c.lstm) {
    a.c_prev = c.c_prev.const_data_ptr();
    a.c_prev_stride = c.c_prev.stride(0);
  }
  if (c.zoneout_h.defined()) {
    a.zoneout_h = c.zoneout_h.const_data_ptr();
    a.zoneout_h_stride = c.zoneout_h.stride(0);
  }
  if (c.zoneout_c.defined()) {
    a.zoneout_c = c.zoneout_c.const_data_ptr();
    a.zoneout_c_stride = c.zoneout_c.stride(0);
  }
  a.valid = c.valid.defined() ? reinterpret_cast<const uint8_t*>(c.valid.const_data_ptr<bool>()) : nullptr;
  return a;
}

// The row cache: shared memory when it fits the device, else (returned) a global fp32 scratch, set in a.scratch.
Tensor row_cache(const Call& c, bool backward, ExtRows& a) {
  const CacheLayout l = ext_cache_layout(c.lstm, c.ln_ih.defined(), c.ln_c_weight.defined(), c.H, backward);
  const int device = c.ax.is_cpu() ? 0 : c.ax.get_device();
  if (ext_cache_in_smem(l.floats, smem_optin(device))) return Tensor();
  Tensor scratch = at::empty({ext_grid(c.B), l.floats}, c.ax.options().dtype(at::kFloat));
  a.scratch = scratch.mutable_data_ptr<float>();
  return scratch;
}

std::tuple<Tensor, Tensor, Tensor> ext_forward_rows(const std::string& cell, const Tensor& ax, const Tensor& ah,
                                                    const OptTensor& b_ih, const OptTensor& b_hh,
                                                    const OptTensor& ln_ih, const OptTensor& ln_hh,
                                                    const OptTensor& ln_c_weight, const OptTensor& ln_c_bias,
                                                    const Tensor& h_prev, const OptTensor& c_prev,
                                                    const OptTensor& zoneout_h, const OptTensor& zoneout_c,
                                                    const OptTensor& valid) {
  const Call c = make_call(EXT_FWD, cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev,
                           zoneout_h, zoneout_c, valid);
  const c10::cuda::CUDAGuard guard(ax.device());
  const auto opts = ax.options();
  Tensor h_new = at::empty({c.B, c.H}, opts), y = at::empty({c.B, c.H}, opts);
  Tensor c_new = c.lstm ? at::empty({c.B, c.H}, opts) : at::empty({0}, opts);
  if (c.B == 0 || c.H == 0) return {h_new, c_new, y};
  ExtRows a = kernel_args(c);
  a.h_new = h_new.mutable_data_ptr();
  a.y = y.mutable_data_ptr();
  a.c_new = c.lstm ? c_new.mutable_data_ptr() : nullptr;
  const Tensor scratch = row_cache(c, false, a);
  const int device = ax.is_cpu() ? 0 : ax.get_device();
  C10_CUDA_CHECK(launch_ext_forward_rows(c.dt, a, smem_optin(device), c10::cuda::getCurrentCUDAStream()));
  return {h_new, c_new, y};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ext_backward_rows(
    const std::string& cell, const Tensor& ax, const Tensor& ah, const OptTensor& b_ih, const OptTensor& b_hh,
    const OptTensor& ln_ih, const OptTensor& ln_hh, const OptTensor& ln_c_weight, const OptTensor& ln_c_bias,
    const Tensor& h_prev, const OptTensor& c_prev, const OptTensor& zoneout_h, const OptTensor& zoneout_c,
    const OptTensor& valid, const Tensor& grad_h, const Tensor& grad_y, const OptTensor& grad_c, const Tensor& acc) {
  const Call c = make_call(EXT_BWD, cell, ax, ah, b_ih, b_hh, ln_ih, ln_hh, ln_c_weight, ln_c_bias, h_prev, c_prev,
                           zoneout_h, zoneout_c, valid);
  const char* op = EXT_BWD;
  const at::ScalarType acc_type = at::kFloat;  // the acc dtype of fp32, fp16 and bf16 (fp64 is refused)
  check_rows(op, "grad_h", grad_h, c.B, c.H, acc_type, ax);
  check_rows(op, "grad_y", grad_y, c.B, c.H, c.dtype, ax);
  Tensor grad_c_rows;
  if (c.lstm) {
    TORCH_CHECK(grad_c.has_value(), op, "grad_c is required for lstm");
    check_rows(op, "grad_c", *grad_c, c.B, c.H, acc_type, ax);
    grad_c_rows = rows(*grad_c);
  } else {
    TORCH_CHECK(!grad_c, op, "grad_c must be None for gru");
  }
  const int64_t P = 4 * c.GH + (c.lstm ? 2 * c.H : 0);
  check_rows(op, "acc", acc, c.B, P, acc_type, ax);
  const Tensor grad_h_rows = rows(grad_h), grad_y_rows = rows(grad_y);
  const Tensor acc_rows = rows(acc);  // a copy only for an acc without unit inner stride; copied back below

  const c10::cuda::CUDAGuard guard(ax.device());
  const auto opts = ax.options();
  Tensor d_ax = at::empty({c.B, c.GH}, opts), d_ah = at::empty({c.B, c.GH}, opts);
  Tensor grad_h_prev = at::empty({c.B, c.H}, opts.dtype(acc_type));
  Tensor grad_c_prev = c.lstm ? at::empty({c.B, c.H}, opts.dtype(acc_type)) : at::empty({0}, opts.dtype(acc_type));
  if (c.B == 0 || c.H == 0) return {d_ax, d_ah, grad_h_prev, grad_c_prev};
  ExtRows a = kernel_args(c);
  a.grad_h = grad_h_rows.const_data_ptr<float>();
  a.grad_h_stride = grad_h_rows.stride(0);
  a.grad_y = grad_y_rows.const_data_ptr();
  a.grad_y_stride = grad_y_rows.stride(0);
  if (c.lstm) {
    a.grad_c = grad_c_rows.const_data_ptr<float>();
    a.grad_c_stride = grad_c_rows.stride(0);
    a.grad_c_prev = grad_c_prev.mutable_data_ptr<float>();
  }
  a.acc = acc_rows.mutable_data_ptr<float>();
  a.acc_stride = acc_rows.stride(0);
  a.d_ax = d_ax.mutable_data_ptr();
  a.d_ah = d_ah.mutable_data_ptr();
  a.grad_h_prev = grad_h_prev.mutable_data_ptr<float>();
  const Tensor scratch = row_cache(c, true, a);
  const int device = ax.is_cpu() ? 0 : ax.get_device();
  C10_CUDA_CHECK(launch_ext_backward_rows(c.dt, a, smem_optin(device), c10::cuda::getCurrentCUDAStream()));
  if (!acc_rows.is_same(acc)) acc.copy_(acc_rows);
  return {d_ax, d_ah, grad_h_prev, grad_c_prev};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def(FUSEDRNN_CUDA_OP("ext_forward_rows(str cell, Tensor ax, Tensor ah, Tensor? b_ih, Tensor? b_hh, Tensor? ln_ih, "
        "Tensor? ln_hh, Tensor? ln_c_weight, Tensor? ln_c_bias, Tensor h_prev, Tensor? c_prev, Tensor? zoneout_h, "
        "Tensor? zoneout_c, Tensor? valid) -> (Tensor, Tensor, Tensor)"));
  m.def(FUSEDRNN_CUDA_OP("ext_backward_rows(str cell, Tensor ax, Tensor ah, Tensor? b_ih, Tensor? b_hh, Tensor? ln_ih, "
        "Tensor? ln_hh, Tensor? ln_c_weight, Tensor? ln_c_bias, Tensor h_prev, Tensor? c_prev, Tensor? zoneout_h, "
        "Tensor? zoneout_c, Tensor? valid, Tensor grad_h, Tensor grad_y, Tensor? grad_c, Tensor(a!) acc) "
        "-> (Tensor, Tensor, Tensor, Tensor)"));
}

TORCH_LIBRARY_IMPL(fusedrnn, FUSEDRNN_CUDA_KEY, m) {
  m.impl(FUSEDRNN_CUDA_OP("ext_forward_rows"), &ext_forward_rows);
  m.impl(FUSEDRNN_CUDA_OP("ext_backward_rows"), &ext_backward_rows);
}

}  // namespace fusedrnn::cuda::ext

#endif  // FUSEDRNN_WITH_CUDA || FUSEDRNN_EMU
