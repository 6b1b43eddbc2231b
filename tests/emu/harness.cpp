// A small driver of representative emulated kernels for the sanitizer job (tests/emu/run_sanitizers.sh): the
// persistent kernels on the grid and cluster exchanges (forward and backward, multi-CTA, every dtype, reverse with
// lengths), the alternating pointwise kernels and beam_topk, plus self-tests of the emulator's detectors.
//
//   harness kernels    run the kernels; exit 0 if every launch succeeded and the grid and cluster exchanges agree
//   harness deadlock   a CTA whose threads wait at __syncthreads for one that exited: must fail at once
//   harness hang       a grid barrier nobody completes: the watchdog must cancel it (FUSEDRNN_EMU_WATCHDOG_S)
//   harness race       two threads write one shared word without a barrier: ThreadSanitizer must report it
//   harness oob-smem   a write one element past the dynamic shared memory: AddressSanitizer must report it
//   harness oob-global a write one element past a cudaMalloc'd buffer: AddressSanitizer must report it
//
// Built without torch, from the same sources as fusedrnn._C_emu (csrc/emu/*_emu.cpp, csrc/emu/emu.cpp).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/beam_topk.h"
#include "cuda/ptx.cuh"
#include "cuda/rnn_kernels.h"

using namespace fusedrnn::cuda;

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++failures;
  }
}

template <typename T>
T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}
template <typename T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}
template <typename T>
DType dtype_of() {
  return std::is_same_v<T, float> ? DType::F32 : std::is_same_v<T, __half> ? DType::F16 : DType::BF16;
}

template <typename T>
std::vector<T> random_vec(size_t n, float scale, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<T> v(n);
  for (auto& e : v) e = from_float<T>(u(rng));
  return v;
}

// Plans for a small GPU (few SMs, little shared memory), so that tiny layers -- affordable under TSan -- still
// spread over several CTAs, batch groups (lstm backward: 2 x 3 CTAs), several chunks per CTA (rnn_tanh: 17 rows in
// chunks of 8) and clusters of several CTAs.

struct LayerResult {
  std::vector<float> y, grad_xg;
};

// One persistent forward + backward of `cell` (0 lstm, 1 gru, 2 rnn_tanh) on exchange `ex`.
template <typename T>
LayerResult persistent_layer(Exchange ex, int cell, int T_, int B, int H, bool reverse, const DeviceLimits& lim,
                             PersistentPlan* plan_fwd, PersistentPlan* plan_bwd) {
  std::mt19937 rng(1234);
  const int G = cell == 0 ? 4 : cell == 1 ? 3 : 1;
  const int W = cell == 0 ? 5 * H : cell == 1 ? 4 * H : 0;
  PersistentPlan pf, pb;
  std::string why = plan_persistent(ex, false, cell, dtype_of<T>(), B, H, lim, &pf);
  check(why.empty(), "forward plan: " + why);
  why = plan_persistent(ex, true, cell, dtype_of<T>(), B, H, lim, &pb);
  check(why.empty(), "backward plan: " + why);
  *plan_fwd = pf;
  *plan_bwd = pb;
  std::vector<int64_t> lengths(B);
  for (int b = 0; b < B; ++b) lengths[b] = b == 1 ? 0 : T_ - (b % T_);
  auto x_gates = random_vec<T>(static_cast<size_t>(T_) * B * G * H, 1.f, rng);
  auto w_hh = random_vec<T>(static_cast<size_t>(G) * H * H, 1.f / std::sqrt(static_cast<float>(H)), rng);
  auto b_hn = random_vec<T>(static_cast<size_t>(H), 0.1f, rng);
  std::vector<float> h_state(static_cast<size_t>(B) * H, 0.1f), c_state(static_cast<size_t>(B) * H, -0.2f);
  std::vector<T> y(static_cast<size_t>(T_) * B * H), ws(static_cast<size_t>(T_) * B * std::max(W, 1)), h_n(B * H), c_n(B * H);
  std::vector<T> exchange(static_cast<size_t>(2) * B * std::max(pf.k_padded, pb.k_padded), from_float<T>(0.f));
  std::vector<unsigned> flags(static_cast<size_t>(std::max(pf.groups * pf.ctas, pb.groups * pb.ctas)), 0u);

  PersistentForward f{};
  f.cell = cell;
  f.T = T_;
  f.B = B;
  f.H = H;
  f.reverse = reverse;
  f.lengths = lengths.data();
  f.x_gates = x_gates.data();
  f.w_hh = w_hh.data();
  f.b_hn = cell == 1 ? b_hn.data() : nullptr;
  f.h_state = h_state.data();
  f.c_state = cell == 0 ? c_state.data() : nullptr;
  f.y = y.data();
  f.ws = W > 0 ? ws.data() : nullptr;
  f.h_n = h_n.data();
  f.c_n = cell == 0 ? c_n.data() : nullptr;
  f.exchange = exchange.data();
  f.flags = flags.data();
  cudaError_t err = launch_persistent_forward(ex, dtype_of<T>(), pf, f, nullptr);
  check(err == cudaSuccess, std::string("persistent forward: ") + cudaGetErrorString(err));

  // Backward on the forward's outputs (h_prev for GRU: y shifted; values need not be consistent to test safety).
  auto grad_y = random_vec<T>(static_cast<size_t>(T_) * B * H, 1.f, rng);
  std::vector<T> c0(static_cast<size_t>(B) * H, from_float<T>(-0.2f));
  std::vector<float> grad_h(static_cast<size_t>(B) * H, 0.3f), grad_c(static_cast<size_t>(B) * H, 0.1f);
  std::vector<T> grad_xg(static_cast<size_t>(T_) * B * G * H), grad_hg(static_cast<size_t>(T_) * B * G * H), grad_h0(B * H),
      grad_c0(B * H);
  std::fill(exchange.begin(), exchange.end(), from_float<T>(0.f));
  std::fill(flags.begin(), flags.end(), 0u);
  PersistentBackward p{};
  p.cell = cell;
  p.T = T_;
  p.B = B;
  p.H = H;
  p.reverse = reverse;
  p.lengths = lengths.data();
  p.w_hh = w_hh.data();
  p.ws = W > 0 ? ws.data() : nullptr;
  p.y = y.data();
  p.h_prev = y.data();
  p.c0 = c0.data();
  p.grad_y = grad_y.data();
  p.grad_h = grad_h.data();
  p.grad_c = cell == 0 ? grad_c.data() : nullptr;
  p.grad_xg = grad_xg.data();
  p.grad_hg = cell == 1 ? grad_hg.data() : nullptr;
  p.grad_h0 = grad_h0.data();
  p.grad_c0 = cell == 0 ? grad_c0.data() : nullptr;
  p.exchange = exchange.data();
  p.flags = flags.data();
  err = launch_persistent_backward(ex, dtype_of<T>(), pb, p, nullptr);
  check(err == cudaSuccess, std::string("persistent backward: ") + cudaGetErrorString(err));

  LayerResult r;
  for (const T& v : y) r.y.push_back(to_float(v));
  for (const T& v : grad_xg) r.grad_xg.push_back(to_float(v));
  return r;
}

float max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = a.size() == b.size() ? 0.f : INFINITY;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

template <typename T>
void persistent_case(const char* name, int cell, int T_, int B, int H, bool reverse, DeviceLimits lim, float tol) {
  const auto start = std::chrono::steady_clock::now();
  PersistentPlan gf, gb, cf, cb;
  LayerResult grid = persistent_layer<T>(Exchange::Grid, cell, T_, B, H, reverse, lim, &gf, &gb);
  LayerResult cluster = persistent_layer<T>(Exchange::Cluster, cell, T_, B, H, reverse, lim, &cf, &cb);
  const float dy = max_diff(grid.y, cluster.y), dg = max_diff(grid.grad_xg, cluster.grad_xg);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // groups x CTAs (forward rows per group / chunk)
  std::printf("%-34s grid %dx%d (%d/%d) / %dx%d, cluster %dx%d / %dx%d: |y| diff %.2g, |grad| diff %.2g  (%.1f s)\n",
              name, gf.groups, gf.ctas, gf.group_rows, gf.chunk, gb.groups, gb.ctas, cf.groups, cf.ctas, cb.groups, cb.ctas,
              dy, dg, s);
  check(dy <= tol && dg <= tol, std::string(name) + ": the grid and cluster exchanges disagree");
  check(gf.ctas > 1 && gb.ctas > 1 && cf.ctas > 1, std::string(name) + ": meant to run multi-CTA grids and clusters");
}

void alternating_case() {
  std::mt19937 rng(7);
  const int B = 5, H = 70, T_ = 3, G = 4;
  auto x_gates = random_vec<__half>(static_cast<size_t>(T_) * B * G * H, 1.f, rng);
  std::vector<float> h_gates(static_cast<size_t>(B) * G * H, 0.25f), h_state(B * H, 0.f), c_state(B * H, 0.f);
  std::vector<__half> h_gemm(B * H), y(static_cast<size_t>(T_) * B * H), ws(static_cast<size_t>(T_) * B * 5 * H);
  std::vector<int64_t> lengths{3, 0, 1, 2, 3};
  AltForwardStep p{};
  p.cell = 0;
  p.B = B;
  p.H = H;
  p.H_out = H;
  p.lengths = lengths.data();
  p.x_gates = x_gates.data();
  p.h_gates = h_gates.data();
  p.h_state = h_state.data();
  p.h_gemm = h_gemm.data();
  p.c_state = c_state.data();
  p.y = y.data();
  p.ws = ws.data();
  for (int t = 0; t < T_; ++t) {
    p.t = t;
    const cudaError_t err = launch_alt_forward_step(DType::F16, p, nullptr);
    check(err == cudaSuccess, std::string("alternating forward: ") + cudaGetErrorString(err));
  }
  std::printf("%-34s ok\n", "alternating lstm fp16 B5-H70");
}

void beam_case(int R, int K, int64_t V, int k) {
  std::mt19937 rng(11);
  std::vector<float> logits(static_cast<size_t>(R) * V);
  std::uniform_int_distribution<int> d(-16, 15);
  for (auto& v : logits) v = d(rng) / 4.f;
  logits[3] = NAN;
  std::vector<float> beams(R, -1.f);
  beam::BeamTopkArgs a{};
  a.logits = logits.data();
  a.row_stride = V;
  a.dtype = beam::LogitsType::F32;
  a.beam_scores = beams.data();
  a.R = R;
  a.V = V;
  a.K = K;
  a.k = k;
  beam::choose_splits(R, V, 132, &a.num_splits, &a.chunk);
  std::vector<uint64_t> keys(static_cast<size_t>(R) * a.num_splits * k);
  std::vector<float> m(R * a.num_splits), s(R * a.num_splits), scores(R / K * k);
  std::vector<int> bad(R * a.num_splits);
  std::vector<int64_t> row_tokens(R * k), tokens(R / K * k), parents(R / K * k);
  a.part_keys = keys.data();
  a.part_m = m.data();
  a.part_s = s.data();
  a.part_bad = bad.data();
  a.row_tokens = row_tokens.data();
  a.scores = scores.data();
  a.tokens = tokens.data();
  a.parents = parents.data();
  const cudaError_t err = beam::launch_beam_topk(a, nullptr);
  check(err == cudaSuccess, std::string("beam_topk: ") + cudaGetErrorString(err));
  std::printf("beam_topk R%d K%d V%lld k%d: %d slices per row, ok\n", R, K, static_cast<long long>(V), k, a.num_splits);
}

// ---- detector self-tests ----
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x == 5) return;  // exits: the others wait at __syncthreads for it
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void never_released_kernel(unsigned* flag) {
  if (threadIdx.x == 0) {
    while (fusedrnn::cuda::ptx::ld_acquire_gpu(flag) == 0) {
    }
  }
  __syncthreads();
}

__global__ void racy_kernel(int* out) {
  FUSEDRNN_DYNAMIC_SMEM(int, s);
  s[0] = static_cast<int>(threadIdx.x);  // every thread writes, no barrier, then thread 0 reads
  if (threadIdx.x == 0) out[0] = s[0];
}

__global__ void oob_kernel(int* buf, int n) {
  FUSEDRNN_DYNAMIC_SMEM(int, s);
  if (threadIdx.x == 0) {
    if (buf == nullptr) {
      s[n] = 1;  // n = the dynamic shared memory's size in ints
    } else {
      buf[n] = 1;  // n = the buffer's size in ints
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "kernels";
  if (mode == "deadlock") {
    std::vector<int> out(64);
    FUSEDRNN_LAUNCH(1, 64, 0, nullptr, divergent_barrier_kernel)(out.data());
    const cudaError_t err = cudaGetLastError();
    std::printf("divergent __syncthreads: %s\n", cudaGetErrorString(err));
    return err != cudaSuccess && std::strstr(cudaGetErrorString(err), "deadlock") != nullptr ? 0 : 1;
  }
  if (mode == "hang") {
    unsigned flag = 0;
    const auto start = std::chrono::steady_clock::now();
    unsigned* flag_ptr = &flag;
    const cudaError_t err = launch_cooperative(never_released_kernel, dim3(2), dim3(64), 0, nullptr, flag_ptr);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("spin nobody releases: %s (after %.1f s)\n", cudaGetErrorString(err), s);
    return err != cudaSuccess && std::strstr(cudaGetErrorString(err), "watchdog") != nullptr ? 0 : 1;
  }
  if (mode == "oob-smem") {
    FUSEDRNN_LAUNCH(1, 32, 1024, nullptr, oob_kernel)(static_cast<int*>(nullptr), 256);
    return cudaGetLastError() == cudaSuccess ? 0 : 1;  // the verdict is AddressSanitizer's
  }
  if (mode == "oob-global") {
    int* buf = nullptr;
    cudaMalloc(reinterpret_cast<void**>(&buf), 100 * sizeof(int));
    FUSEDRNN_LAUNCH(1, 32, 0, nullptr, oob_kernel)(buf, 100);
    cudaFree(buf);
    return cudaGetLastError() == cudaSuccess ? 0 : 1;
  }
  if (mode == "race") {
    std::vector<int> out(1);
    FUSEDRNN_LAUNCH(1, 64, 64, nullptr, racy_kernel)(out.data());
    return cudaGetLastError() == cudaSuccess ? 0 : 1;  // the verdict is ThreadSanitizer's
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  persistent_case<__half>("persistent lstm fp16 T3-B9-H40 rev", 0, 3, 9, 40, true, {6, 40 * 1024, 9}, 2e-2f);
  persistent_case<__nv_bfloat16>("persistent gru bf16 T3-B5-H40", 1, 3, 5, 40, false, {4, 34 * 1024, 9}, 1e-1f);
  persistent_case<float>("persistent rnn_tanh tf32 T3-B17-H40", 2, 3, 17, 40, true, {4, 20 * 1024, 9}, 1e-2f);  // chunks of 8 rows
  alternating_case();
  beam_case(4, 2, 3000, 64);
  beam_case(2, 2, 300, 128);
  std::printf(failures == 0 ? "all OK\n" : "%d FAILURES\n", failures);
  return failures == 0 ? 0 : 1;
}
