// Backend "cuda": one layer, one direction of every cell, forward and BPTT backward, on CUDA tensors.
//
//   fusedrnn::cuda_rnn_layer(..., str path)           -> (y, h_n, c_n, workspace)   contract of fusedrnn::rnn_layer
//   fusedrnn::cuda_rnn_layer_backward(..., str path)  -> grads of (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
//   fusedrnn::cuda_rnn_path_reason(...)               -> "" when a path can take a call on a device, else why not
//   fusedrnn::cuda_rnn_persistent_plan(...)           -> (reason, plan) for given device limits (no GPU needed)
//
// path: "alternating" (cuBLAS GEMM + one fused pointwise kernel per step, every feature), "persistent" (one
// cooperative launch for all steps, per-CTA step flags), "cluster" (one launch, thread-block clusters, sm_90). The
// structure follows csrc/cpu/rnn_layer.cpp: the input projection of all steps is one GEMM before the loop; the
// backward produces only gate gradients in its loop, and dx, dW_ih, dW_hh, dW_hr, the biases are one GEMM or
// reduction each afterwards. Workspace layout: fusedrnn/backends/base.py. Kernels: rnn_pointwise.cu,
// rnn_persistent.cu (no torch headers there; this file is their only door).
// Built twice: for CUDA tensors (FUSEDRNN_WITH_CUDA), and as the cuda-emu backend on CPU tensors (FUSEDRNN_EMU,
// csrc/emu/: ops cuda_emu_*, the kernels emulated, cuBLAS on at::mm through csrc/emu/torch_shim.h).
#if defined(FUSEDRNN_WITH_CUDA) || defined(FUSEDRNN_EMU)

#include <ATen/Context.h>

#include "cuda/op_glue.h"

#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#ifndef FUSEDRNN_EMU
#include "cuda/rnn_cublas.h"
#endif
#include "cuda/rnn_kernels.h"
#include "fusedrnn/cell_math.h"
#include "fusedrnn/layer_args.h"

namespace fusedrnn::cuda {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum class Path { Alternating, Persistent, Cluster };

Path parse_path(const std::string& name) {
  if (name == "alternating") return Path::Alternating;
  if (name == "persistent") return Path::Persistent;
  if (name == "cluster") return Path::Cluster;
  TORCH_CHECK(false, "fusedrnn cuda: path must be one of alternating, persistent, cluster, got '", name, "'");
}

// Empty when the CUDA kernels take this dtype.
std::string dtype_reason(at::ScalarType t) {
  if (t == at::kFloat || t == at::kHalf || t == at::kBFloat16) return "";
  return std::string("dtype ") + c10::toString(t) + " not supported (float32, float16, bfloat16 only)";
}

DType to_dtype(at::ScalarType t) {
  const std::string why = dtype_reason(t);
  TORCH_CHECK(why.empty(), "fusedrnn cuda: ", why);
  return t == at::kFloat ? DType::F32 : t == at::kHalf ? DType::F16 : DType::BF16;
}

cudaDataType_t blas_type(DType t) {
  return t == DType::F32 ? CUDA_R_32F : t == DType::F16 ? CUDA_R_16F : CUDA_R_16BF;
}

struct Dims : LayerDims {
  at::ScalarType scalar;
  DType dt;
};

Dims make_dims(Cell cell, const Tensor& x, const Tensor& w_hh, const Tensor& h0, bool proj, bool bias, bool reverse) {
  Dims d;
  static_cast<LayerDims&>(d) = layer_dims(cell, x, w_hh, h0, proj, bias, reverse);
  d.scalar = x.scalar_type();
  d.dt = to_dtype(d.scalar);
  return d;
}

void check_args(const Dims& d, const Tensor& x, const Tensor& h0, const OptTensor& c0, const Tensor& w_ih,
                const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                const OptTensor& lengths) {
  check_layer_shapes("cuda", d, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  // T, B, H, H_out (and the step t) travel to the kernels as int fields (rnn_kernels.h); every offset there is int64.
  const std::pair<const char*, int64_t> sizes[] = {{"T", d.T}, {"B", d.B}, {"H", d.H}, {"H_out", d.H_out}};
  for (const auto& [name, value] : sizes) {
    TORCH_CHECK(value <= std::numeric_limits<int>::max(), "fusedrnn cuda: ", name, "=", value,
                ": the CUDA kernels take it as a 32-bit int (at most ", std::numeric_limits<int>::max(), ")");
  }
  for (const OptTensor& t : {OptTensor(x), OptTensor(h0), c0, OptTensor(w_ih), OptTensor(w_hh), b_ih, b_hh, w_hr}) {
    TORCH_CHECK(!t || (on_kernel_device(*t) && t->device() == x.device() && t->scalar_type() == x.scalar_type()),
                "fusedrnn cuda: all tensors must be " FUSEDRNN_CUDA_TENSORS " of x's dtype on x's device");
  }
  if (lengths) {
    TORCH_CHECK(lengths->device() == x.device() && lengths->scalar_type() == at::kLong && lengths->numel() == d.B,
                "fusedrnn cuda: lengths must be an int64 tensor [B] on x's device");
  }
}

Tensor contig(const Tensor& t) { return t.contiguous(); }
OptTensor contig(const OptTensor& t) { return t ? OptTensor(t->contiguous()) : std::nullopt; }

template <typename P>
const void* cptr(const P& t) {
  return t ? t->data_ptr() : nullptr;
}

const int64_t* lengths_ptr(const OptTensor& lengths) {
  return lengths ? lengths->data_ptr<int64_t>() : nullptr;
}

// The step of processing order s (0..T-1).
inline int64_t step_time(const Dims& d, int64_t s) { return d.reverse ? d.T - 1 - s : s; }

Tensor fp32_copy(const Tensor& t) { return t.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous(); }

// x_gates [T*B, G*H] = x W_ih^T + b_ih + b_hh, except GRU's b_hn (applied inside the reset product by the kernels).
Tensor input_projection(const Dims& d, const Tensor& x, const Tensor& w_ih, const OptTensor& b_ih,
                        const OptTensor& b_hh) {
  Tensor x2 = x.view({d.T * d.B, d.I});
  if (!d.bias) return at::mm(x2, w_ih.t());
  Tensor bias = b_ih->clone();
  const int64_t folded = d.cell == Cell::GRU ? 2 * d.H : d.G * d.H;
  bias.narrow(0, 0, folded).add_(b_hh->narrow(0, 0, folded));
  return at::addmm(bias, x2, w_ih.t());
}

const void* b_hn_ptr(const Dims& d, const OptTensor& b_hh) {
  if (d.cell != Cell::GRU || !b_hh) return nullptr;
  return static_cast<const char*>(b_hh->data_ptr()) + 2 * d.H * b_hh->element_size();
}

// C[m, n] (fp32) = beta * C + A[m, k] @ op(B), row-major; op(B) = B^T when B is [n, k] (b_transposed), else B is
// [k, n]. A and B of the layer dtype; fp32 accumulation (TF32 for fp32 only when torch allows it for matmuls).
void gemm_f32out(const Dims& d, int64_t m, int64_t n, int64_t k, const void* a, const void* b, bool b_transposed,
                 float beta, float* c) {
  // Row-major C = A op(B)  <=>  column-major C^T = op(B)^T A^T: cuBLAS sees B first.
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle(/*setup=*/true);
  const float alpha = 1.f;
  const cudaDataType_t t = blas_type(d.dt);
  const cublasComputeType_t compute = d.dt == DType::F32 && at::globalContext().allowTF32CuBLAS()
                                          ? CUBLAS_COMPUTE_32F_FAST_TF32
                                          : CUBLAS_COMPUTE_32F;
  const cublasStatus_t status =
      cublasGemmEx(handle, b_transposed ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n),
                   static_cast<int>(m), static_cast<int>(k), &alpha, b, t, static_cast<int>(b_transposed ? k : n), a, t,
                   static_cast<int>(k), &beta, c, CUDA_R_32F, static_cast<int>(n), compute, CUBLAS_GEMM_DEFAULT);
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "fusedrnn cuda: cublasGemmEx failed with status ", static_cast<int>(status),
              " (m=", m, " n=", n, " k=", k, ")");
}

// [T, B, H_out]: the state each valid step started from, read back from y (fusedrnn/backends/base.py,
// previous_states). Rows of invalid steps are h0 (they only meet zero gate gradients).
Tensor previous_states(const Tensor& y, const Tensor& h0, bool reverse, const OptTensor& lengths) {
  const int64_t T = y.size(0);
  Tensor init = h0.unsqueeze(0);
  if (!reverse) return at::cat({init, y.narrow(0, 0, T - 1)}, 0);
  Tensor shifted = at::cat({y.narrow(0, 1, T - 1), init}, 0);
  if (!lengths) return shifted;
  Tensor steps = at::arange(1, T + 1, lengths->options()).unsqueeze(1);
  Tensor follows_valid = (steps < lengths->unsqueeze(0)).unsqueeze(-1);
  return at::where(follows_valid, shifted, init).contiguous();
}

// Empty when `path` can run this call on `device`, else why not (resources, occupancy, features). For the
// persistent paths `plan` (when given) receives the layout.
std::string path_reason(Path path, bool backward, Cell cell, at::ScalarType dtype, int64_t B, int64_t H, bool proj,
                        bool allow_tf32, int device, PersistentPlan* plan = nullptr) {
  std::string why = dtype_reason(dtype);
  if (!why.empty() || path == Path::Alternating) return why;
  const char* name = path == Path::Persistent ? "persistent" : "cluster";
  const std::string prefix = std::string("the ") + name + (backward ? " backward" : " forward") + " kernel ";
  if (proj) return prefix + "has no projection (proj_size): that runs on the alternating path";
  if (dtype == at::kFloat && !allow_tf32) {
    return prefix + "runs float32 on TF32 tensor cores only: set torch.backends.cuda.matmul.allow_tf32 = True";
  }
  const Exchange ex = path == Path::Persistent ? Exchange::Grid : Exchange::Cluster;
  PersistentPlan local;
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));  // the occupancy queries are per device
  why = plan_persistent_for_device(ex, backward, static_cast<int>(cell), to_dtype(dtype), static_cast<int>(B),
                                   static_cast<int>(H), device, plan != nullptr ? plan : &local);
  return why.empty() ? why : prefix + why;
}

// The plan of a persistent path, after every check path_reason makes (so a forced path fails with its reason).
PersistentPlan persistent_plan(Path path, bool backward, const Dims& d, int device) {
  PersistentPlan plan;
  const std::string why = path_reason(path, backward, d.cell, d.scalar, d.B, d.H, d.proj,
                                      at::globalContext().allowTF32CuBLAS(), device, &plan);
  TORCH_CHECK(why.empty(), "fusedrnn cuda: ", why);
  return plan;
}

// ---------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------
void forward_alternating(const Dims& d, const Tensor& x_gates, const Tensor& h0, const OptTensor& c0,
                         const Tensor& w_hh, const OptTensor& b_hh, const OptTensor& w_hr, const OptTensor& lengths,
                         Tensor& y, Tensor& ws, bool need_workspace, Tensor& h_n, Tensor& c_n) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = x_gates.options().dtype(at::kFloat);
  Tensor h_state = fp32_copy(h0);
  // fp32 runs the GEMM on the state itself; half types on a rounded copy, the state staying fp32.
  Tensor h_gemm = d.dt == DType::F32 ? Tensor() : h0.clone();
  Tensor c_state = c0 ? fp32_copy(*c0) : Tensor();
  Tensor h_gates = at::empty({d.B, d.G * d.H}, f32);
  Tensor r_buf = d.proj ? at::empty({d.B, d.H}, x_gates.options()) : Tensor();
  Tensor h_proj = d.proj ? at::empty({d.B, d.H_out}, f32) : Tensor();
  const void* gemm_in = d.dt == DType::F32 ? h_state.data_ptr() : h_gemm.data_ptr();

  AltForwardStep p{};
  p.cell = static_cast<int>(d.cell);
  p.B = static_cast<int>(d.B);
  p.H = static_cast<int>(d.H);
  p.H_out = static_cast<int>(d.H_out);
  p.lengths = lengths_ptr(lengths);
  p.x_gates = x_gates.data_ptr();
  p.h_gates = h_gates.data_ptr<float>();
  p.b_hn = b_hn_ptr(d, b_hh);
  p.h_state = h_state.data_ptr<float>();
  p.h_gemm = d.dt == DType::F32 ? nullptr : h_gemm.data_ptr();
  p.c_state = c0 ? c_state.data_ptr<float>() : nullptr;
  p.y = y.data_ptr();
  p.ws = need_workspace && d.ws > 0 ? ws.data_ptr() : nullptr;
  p.r_out = d.proj ? r_buf.data_ptr() : nullptr;
  AltProjForwardStep pp{};
  if (d.proj) {
    pp.B = p.B;
    pp.H_out = p.H_out;
    pp.lengths = p.lengths;
    pp.h_proj = h_proj.data_ptr<float>();
    pp.h_state = p.h_state;
    pp.h_gemm = p.h_gemm;
    pp.y = p.y;
  }
  for (int64_t s = 0; s < d.T; ++s) {
    p.t = pp.t = static_cast<int>(step_time(d, s));
    gemm_f32out(d, d.B, d.G * d.H, d.H_out, gemm_in, w_hh.data_ptr(), /*b_transposed=*/true, 0.f, h_gates.data_ptr<float>());
    C10_CUDA_CHECK(launch_alt_forward_step(d.dt, p, stream));
    if (d.proj) {
      gemm_f32out(d, d.B, d.H_out, d.H, r_buf.data_ptr(), w_hr->data_ptr(), /*b_transposed=*/true, 0.f, h_proj.data_ptr<float>());
      C10_CUDA_CHECK(launch_alt_proj_forward_step(d.dt, pp, stream));
    }
  }
  h_n.copy_(h_state);
  if (c0) c_n.copy_(c_state);
}

void forward_persistent(Path path, const Dims& d, const Tensor& x_gates, const Tensor& h0, const OptTensor& c0,
                        const Tensor& w_hh, const OptTensor& b_hh, const OptTensor& lengths, Tensor& y, Tensor& ws,
                        bool need_workspace, Tensor& h_n, Tensor& c_n) {
  const int device = x_gates.get_device();
  const PersistentPlan plan = persistent_plan(path, /*backward=*/false, d, device);
  const Exchange ex = path == Path::Persistent ? Exchange::Grid : Exchange::Cluster;
  Tensor h_state = fp32_copy(h0);
  Tensor c_state = c0 ? fp32_copy(*c0) : Tensor();
  Tensor exchange = ex == Exchange::Grid ? at::zeros({2, d.B, plan.k_padded}, x_gates.options()) : Tensor();
  Tensor flags = ex == Exchange::Grid ? at::zeros({plan.groups * plan.ctas}, x_gates.options().dtype(at::kInt)) : Tensor();

  PersistentForward p{};
  p.cell = static_cast<int>(d.cell);
  p.T = static_cast<int>(d.T);
  p.B = static_cast<int>(d.B);
  p.H = static_cast<int>(d.H);
  p.reverse = d.reverse;
  p.lengths = lengths_ptr(lengths);
  p.x_gates = x_gates.data_ptr();
  p.w_hh = w_hh.data_ptr();
  p.b_hn = b_hn_ptr(d, b_hh);
  p.h_state = h_state.data_ptr<float>();
  p.c_state = c0 ? c_state.data_ptr<float>() : nullptr;
  p.y = y.data_ptr();
  p.ws = need_workspace && d.ws > 0 ? ws.data_ptr() : nullptr;
  p.h_n = h_n.data_ptr();
  p.c_n = c0 ? c_n.data_ptr() : nullptr;
  p.exchange = exchange.defined() ? exchange.data_ptr() : nullptr;
  p.flags = flags.defined() ? reinterpret_cast<unsigned*>(flags.data_ptr<int>()) : nullptr;
  C10_CUDA_CHECK(launch_persistent_forward(ex, d.dt, plan, p, c10::cuda::getCurrentCUDAStream()));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cuda_rnn_layer(
    const std::string& cell_name, const Tensor& x_, const Tensor& h0_, const OptTensor& c0_, const Tensor& w_ih_,
    const Tensor& w_hh_, const OptTensor& b_ih_, const OptTensor& b_hh_, const OptTensor& w_hr_,
    const OptTensor& lengths_, bool reverse, bool need_workspace, const std::string& path_name) {
  const Cell cell = parse_cell(cell_name, "cuda");
  const Path path = parse_path(path_name);
  c10::cuda::CUDAGuard guard(x_.device());
  Tensor x = contig(x_), h0 = contig(h0_), w_ih = contig(w_ih_), w_hh = contig(w_hh_);
  OptTensor c0 = contig(c0_), b_ih = contig(b_ih_), b_hh = contig(b_hh_), w_hr = contig(w_hr_),
            lengths = contig(lengths_);
  const Dims d = make_dims(cell, x, w_hh, h0, w_hr.has_value(), b_ih.has_value(), reverse);
  check_args(d, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);

  Tensor x_gates = input_projection(d, x, w_ih, b_ih, b_hh);
  auto opts = x.options();
  Tensor y = at::empty({d.T, d.B, d.H_out}, opts);
  Tensor ws = need_workspace ? at::empty({d.T, d.B, d.ws}, opts) : at::empty({0}, opts);
  Tensor h_n = at::empty({d.B, d.H_out}, opts);
  Tensor c_n = c0 ? at::empty({d.B, d.H}, opts) : at::empty({0}, opts);
  if (d.B == 0) return {y, h_n, c_n, ws};  // nothing to run (and no kernel may launch an empty grid)
  if (path == Path::Alternating) {
    forward_alternating(d, x_gates, h0, c0, w_hh, b_hh, w_hr, lengths, y, ws, need_workspace, h_n, c_n);
  } else {
    forward_persistent(path, d, x_gates, h0, c0, w_hh, b_hh, lengths, y, ws, need_workspace, h_n, c_n);
  }
  return {y, h_n, c_n, ws};
}

// ---------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------
struct BackwardState {
  Tensor grad_xg, grad_hg;  // [T, B, G*H]; grad_hg aliases grad_xg except for GRU
  Tensor grad_out_all;      // projection: [T, B, H_out] dL/dh_t of valid steps
  Tensor grad_h, grad_c;    // fp32 [B, H_out], [B, H]: the gradients of h0 and c0 at the end
};

void backward_alternating(const Dims& d, const Tensor& w_hh, const OptTensor& w_hr, const OptTensor& lengths,
                          const Tensor& y, const Tensor& ws, const Tensor& h_prev_all, const OptTensor& c0,
                          const Tensor& grad_y, BackwardState& st) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t GH = d.G * d.H;
  const auto f32 = y.options().dtype(at::kFloat);
  Tensor grad_h_next = at::empty({d.B, d.H_out}, f32);
  Tensor grad_r = d.proj ? at::empty({d.B, d.H}, f32) : Tensor();
  const int64_t es = y.element_size();

  AltBackwardStep p{};
  p.cell = static_cast<int>(d.cell);
  p.B = static_cast<int>(d.B);
  p.H = static_cast<int>(d.H);
  p.H_out = static_cast<int>(d.H_out);
  p.T = static_cast<int>(d.T);
  p.reverse = d.reverse;
  p.lengths = lengths_ptr(lengths);
  p.ws = d.ws > 0 ? ws.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.h_prev = h_prev_all.data_ptr();
  p.c0 = cptr(c0);
  p.grad_y = grad_y.data_ptr();
  p.grad_r = d.proj ? grad_r.data_ptr<float>() : nullptr;
  p.grad_c = d.cell == Cell::LSTM ? st.grad_c.data_ptr<float>() : nullptr;
  p.grad_xg = st.grad_xg.data_ptr();
  p.grad_hg = st.grad_hg.data_ptr();
  AltProjBackwardStep pp{};
  pp.B = p.B;
  pp.H_out = p.H_out;
  pp.lengths = p.lengths;
  pp.grad_y = p.grad_y;
  pp.grad_out = d.proj ? st.grad_out_all.data_ptr() : nullptr;

  Tensor grad_h = st.grad_h;
  for (int64_t s = d.T - 1; s >= 0; --s) {
    const int64_t t = step_time(d, s);
    p.t = pp.t = static_cast<int>(t);
    p.grad_h = grad_h.data_ptr<float>();
    p.grad_h_next = grad_h_next.data_ptr<float>();
    if (d.proj) {  // dL/dr = grad_out W_hr
      pp.grad_h = p.grad_h;
      pp.grad_h_next = p.grad_h_next;
      C10_CUDA_CHECK(launch_alt_proj_backward_step(d.dt, pp, stream));
      const char* gout_t = static_cast<const char*>(st.grad_out_all.data_ptr()) + t * d.B * d.H_out * es;
      gemm_f32out(d, d.B, d.H, d.H_out, gout_t, w_hr->data_ptr(), /*b_transposed=*/false, 0.f, grad_r.data_ptr<float>());
    }
    C10_CUDA_CHECK(launch_alt_backward_step(d.dt, p, stream));
    // dL/dh_{t-1} = direct part + grad_hg W_hh (invalid rows: zero gate gradients, carried direct part).
    const char* ghg_t = static_cast<const char*>(st.grad_hg.data_ptr()) + t * d.B * GH * es;
    gemm_f32out(d, d.B, d.H_out, GH, ghg_t, w_hh.data_ptr(), /*b_transposed=*/false, 1.f, p.grad_h_next);
    std::swap(grad_h, grad_h_next);
  }
  st.grad_h = grad_h;
}

void backward_persistent(Path path, const Dims& d, const Tensor& w_hh, const OptTensor& lengths, const Tensor& y,
                         const Tensor& ws, const Tensor& h_prev_all, const OptTensor& c0, const Tensor& grad_y,
                         BackwardState& st, Tensor& grad_h0, Tensor& grad_c0) {
  const int device = y.get_device();
  const PersistentPlan plan = persistent_plan(path, /*backward=*/true, d, device);
  const Exchange ex = path == Path::Persistent ? Exchange::Grid : Exchange::Cluster;
  Tensor exchange = ex == Exchange::Grid ? at::zeros({2, d.B, plan.k_padded}, y.options()) : Tensor();
  Tensor flags = ex == Exchange::Grid ? at::zeros({plan.groups * plan.ctas}, y.options().dtype(at::kInt)) : Tensor();

  PersistentBackward p{};
  p.cell = static_cast<int>(d.cell);
  p.T = static_cast<int>(d.T);
  p.B = static_cast<int>(d.B);
  p.H = static_cast<int>(d.H);
  p.reverse = d.reverse;
  p.lengths = lengths_ptr(lengths);
  p.w_hh = w_hh.data_ptr();
  p.ws = d.ws > 0 ? ws.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.h_prev = h_prev_all.data_ptr();
  p.c0 = cptr(c0);
  p.grad_y = grad_y.data_ptr();
  p.grad_h = st.grad_h.data_ptr<float>();
  p.grad_c = d.cell == Cell::LSTM ? st.grad_c.data_ptr<float>() : nullptr;
  p.grad_xg = st.grad_xg.data_ptr();
  p.grad_hg = d.cell == Cell::GRU ? st.grad_hg.data_ptr() : nullptr;
  p.grad_h0 = grad_h0.data_ptr();
  p.grad_c0 = d.cell == Cell::LSTM ? grad_c0.data_ptr() : nullptr;
  p.exchange = exchange.defined() ? exchange.data_ptr() : nullptr;
  p.flags = flags.defined() ? reinterpret_cast<unsigned*>(flags.data_ptr<int>()) : nullptr;
  C10_CUDA_CHECK(launch_persistent_backward(ex, d.dt, plan, p, c10::cuda::getCurrentCUDAStream()));
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cuda_rnn_layer_backward(
    const std::string& cell_name, const Tensor& x_, const Tensor& h0_, const OptTensor& c0_, const Tensor& w_ih_,
    const Tensor& w_hh_, const OptTensor& b_ih_, const OptTensor& b_hh_, const OptTensor& w_hr_,
    const OptTensor& lengths_, bool reverse, const Tensor& y_, const Tensor& ws_, const Tensor& grad_y_,
    const Tensor& grad_h_n, const OptTensor& grad_c_n, const std::string& path_name) {
  const Cell cell = parse_cell(cell_name, "cuda");
  const Path path = parse_path(path_name);
  c10::cuda::CUDAGuard guard(x_.device());
  Tensor x = contig(x_), h0 = contig(h0_), w_ih = contig(w_ih_), w_hh = contig(w_hh_);
  OptTensor c0 = contig(c0_), b_ih = contig(b_ih_), b_hh = contig(b_hh_), w_hr = contig(w_hr_),
            lengths = contig(lengths_);
  Tensor y = contig(y_), ws = contig(ws_), grad_y = contig(grad_y_);
  const Dims d = make_dims(cell, x, w_hh, h0, w_hr.has_value(), b_ih.has_value(), reverse);
  check_args(d, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths);
  TORCH_CHECK(ws.numel() == d.T * d.B * d.ws,
              "fusedrnn cuda: workspace of ", ws.numel(), " elements does not match this call (expected ",
              d.T * d.B * d.ws, "): was the forward run with need_workspace=True?");
  TORCH_CHECK(y.device() == x.device() && grad_y.device() == x.device() && grad_h_n.device() == x.device(),
              "fusedrnn cuda: y, workspace and the gradients must be on x's device");
  auto opts = x.options();
  const int64_t GH = d.G * d.H;
  if (d.B == 0) {  // an empty batch contributes nothing to any gradient
    auto zeros_or_empty = [&](const OptTensor& t) { return t ? at::zeros_like(*t) : at::empty({0}, opts); };
    return {at::zeros_like(x), at::zeros_like(h0), zeros_or_empty(c0), at::zeros_like(w_ih), at::zeros_like(w_hh),
            zeros_or_empty(b_ih), zeros_or_empty(b_hh), zeros_or_empty(w_hr)};
  }

  BackwardState st;
  st.grad_h = fp32_copy(grad_h_n);
  st.grad_c = cell == Cell::LSTM ? (grad_c_n ? fp32_copy(*grad_c_n) : at::zeros({d.B, d.H}, opts.dtype(at::kFloat)))
                                 : Tensor();
  st.grad_xg = at::empty({d.T, d.B, GH}, opts);
  st.grad_hg = cell == Cell::GRU ? at::empty({d.T, d.B, GH}, opts) : st.grad_xg;
  st.grad_out_all = d.proj ? at::empty({d.T, d.B, d.H_out}, opts) : Tensor();
  Tensor h_prev_all = previous_states(y, h0, reverse, lengths);

  Tensor grad_h0, grad_c0 = at::empty({0}, opts);
  if (path == Path::Alternating) {
    backward_alternating(d, w_hh, w_hr, lengths, y, ws, h_prev_all, c0, grad_y, st);
    grad_h0 = st.grad_h.to(x.scalar_type());
    if (cell == Cell::LSTM) grad_c0 = st.grad_c.to(x.scalar_type());
  } else {
    grad_h0 = at::empty({d.B, d.H_out}, opts);
    if (cell == Cell::LSTM) grad_c0 = at::empty({d.B, d.H}, opts);
    backward_persistent(path, d, w_hh, lengths, y, ws, h_prev_all, c0, grad_y, st, grad_h0, grad_c0);
  }

  // Everything off the recurrence: one GEMM / reduction each over all T*B rows.
  Tensor gx2 = st.grad_xg.view({d.T * d.B, GH});
  Tensor gh2 = st.grad_hg.view({d.T * d.B, GH});
  Tensor grad_x = at::mm(gx2, w_ih).view({d.T, d.B, d.I});
  Tensor grad_w_ih = at::mm(gx2.t(), x.view({d.T * d.B, d.I}));
  Tensor grad_w_hh = at::mm(gh2.t(), h_prev_all.view({d.T * d.B, d.H_out}));
  Tensor grad_b_ih = d.bias ? gx2.sum(0) : at::empty({0}, opts);
  Tensor grad_b_hh = d.bias ? gh2.sum(0) : at::empty({0}, opts);
  Tensor grad_w_hr = at::empty({0}, opts);
  if (d.proj) {
    Tensor r_all = ws.view({d.T * d.B, d.ws}).narrow(1, 5 * d.H, d.H);
    grad_w_hr = at::mm(st.grad_out_all.view({d.T * d.B, d.H_out}).t(), r_all);
  }
  return {grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr};
}

// ---------------------------------------------------------------------------------------------------
// Path support, for the Python backend's refusal reasons and heuristic
// ---------------------------------------------------------------------------------------------------
std::string cuda_rnn_path_reason(const std::string& path, const std::string& direction, const std::string& cell,
                                 at::ScalarType dtype, int64_t batch, int64_t hidden, bool proj, bool allow_tf32,
                                 at::Device device) {
  TORCH_CHECK(direction == "forward" || direction == "backward",
              "fusedrnn cuda: direction must be forward or backward, got '", direction, "'");
  TORCH_CHECK(is_kernel_device(device), "fusedrnn cuda: device must hold " FUSEDRNN_CUDA_TENSORS ", got ", device);
  const int index = device.has_index() ? device.index() : c10::cuda::current_device();
  return path_reason(parse_path(path), direction == "backward", parse_cell(cell, "cuda"), dtype, batch, hidden, proj,
                     allow_tf32, index);
}

// The plan for hypothetical device limits [sm_count, smem_per_block_bytes, cc_major]; plan fields: ctas, groups,
// units, m_tiles, warps_m, warps_k, k_padded, chunk, smem_bytes, group_rows (empty when refused).
std::tuple<std::string, std::vector<int64_t>> cuda_rnn_persistent_plan(const std::string& path,
                                                                      const std::string& direction,
                                                                      const std::string& cell, at::ScalarType dtype,
                                                                      int64_t batch, int64_t hidden,
                                                                      std::vector<int64_t> limits) {
  TORCH_CHECK(limits.size() == 3, "fusedrnn cuda: limits must be [sm_count, smem_per_block, cc_major]");
  const Path p = parse_path(path);
  TORCH_CHECK(p != Path::Alternating, "fusedrnn cuda: the alternating path has no persistent plan");
  const DeviceLimits lim{static_cast<int>(limits[0]), static_cast<int>(limits[1]), static_cast<int>(limits[2])};
  PersistentPlan plan;
  const std::string why =
      plan_persistent(p == Path::Persistent ? Exchange::Grid : Exchange::Cluster, direction == "backward",
                      static_cast<int>(parse_cell(cell, "cuda")), to_dtype(dtype), static_cast<int>(batch),
                      static_cast<int>(hidden), lim, &plan);
  if (!why.empty()) return {why, {}};
  return {why,
          {plan.ctas, plan.groups, plan.units, plan.m_tiles, plan.warps_m, plan.warps_k, plan.k_padded, plan.chunk,
           plan.smem_bytes, plan.group_rows}};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def(FUSEDRNN_CUDA_OP("rnn_layer(str cell, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
        "Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, bool need_workspace, str path) "
        "-> (Tensor, Tensor, Tensor, Tensor)"));
  m.def(FUSEDRNN_CUDA_OP("rnn_layer_backward(str cell, Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
        "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? lengths, bool reverse, Tensor y, Tensor workspace, "
        "Tensor grad_y, Tensor grad_h_n, Tensor? grad_c_n, str path) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"));
  m.def(FUSEDRNN_CUDA_OP("rnn_path_reason(str path, str direction, str cell, ScalarType dtype, int batch, int hidden, "
        "bool proj, bool allow_tf32, Device device) -> str"),
        &cuda_rnn_path_reason);
  m.def(FUSEDRNN_CUDA_OP("rnn_persistent_plan(str path, str direction, str cell, ScalarType dtype, int batch, int hidden, "
        "int[] limits) -> (str, int[])"),
        &cuda_rnn_persistent_plan);
}

TORCH_LIBRARY_IMPL(fusedrnn, FUSEDRNN_CUDA_KEY, m) {
  m.impl(FUSEDRNN_CUDA_OP("rnn_layer"), &cuda_rnn_layer);
  m.impl(FUSEDRNN_CUDA_OP("rnn_layer_backward"), &cuda_rnn_layer_backward);
}

}  // namespace fusedrnn::cuda

#endif  // FUSEDRNN_WITH_CUDA || FUSEDRNN_EMU
