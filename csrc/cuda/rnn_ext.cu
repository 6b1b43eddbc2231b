// The two fused row kernels of fusedrnn::rnn_layer_ext (LayerNorm LSTM / GRU, zoneout; issue #18), forward and
// backward of one step for all B rows. Contract: the module doc of fusedrnn/backends/ext.py (ReferenceRows is the
// same in PyTorch ops); interface and row-cache layout: rnn_ext.h; per-element math: cell_math.h.
//
// Why one CTA per row: both layer norms reduce over the whole G*H row and the LSTM's cell-state norm over its H
// units, between the per-element passes (the backward: up to five reductions, each waiting on the pass before),
// so a row must live in one program; a CTA keeps its reductions in shared memory and __syncthreads. Threads =
// H/2 rounded up to a warp, 32..256 (two units, i.e. 2G elements of each [G*H] row, per thread up to H = 512;
// more units per thread beyond: H = 1024 -> 4). A small row is then one warp: H <= 64 -> a 32-thread CTA whose
// reductions are shuffles only (block_sum skips shared memory and barriers), and an H100 holds 32 such CTAs per
// SM, i.e. 4224 rows in flight -- more than any batch, so packing several rows into one CTA would gain nothing.
// A large row with a small batch is the weak case: B = 1, H = 1024 is one CTA of 256 threads on one SM.
// (256, not 512, threads at most: under __launch_bounds__(512) ptxas caps the kernels at 64 registers and
// spills around the fp32 division slow path of the sigmoids on sm_80; at 256 they take 40-78, no spills.)
//
// Work split (rnn_ext.h): thread t owns units j = t + k*threads and the elements g*H + j of every gate g. Each
// pass reads back only its own thread's earlier writes, so the row cache needs no barrier; block_sum's two
// barriers are the only synchronisation. Every value is computed in fp32 (inputs converted on load, rounded once
// on store); the backward recomputes the forward with the same functions, thread split and reduction order.
#include "cuda/rnn_device.cuh"
#include "cuda/rnn_ext.h"

namespace fusedrnn::cuda::ext {
namespace {

constexpr int kMaxWarps = kMaxThreads / 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // the butterfly adds the same pairs in every lane: every lane holds the same sum
}

// N row sums at once; every thread gets the totals. red: [N * kMaxWarps] shared. Called by every thread of the CTA.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* red) {
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  const int warps = static_cast<int>(blockDim.x) >> 5;
  if (warps == 1) return;
  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = static_cast<int>(threadIdx.x) & 31;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) red[i * kMaxWarps + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(lane < warps ? red[i * kMaxWarps + lane] : 0.f);
  __syncthreads();  // red is free again for the next block_sum
}

struct Stats {
  float mean = 0.f, rstd = 0.f;
};

// One row of the step: the pre-activation parts px = LN(ax)*ln_ih + b_ih and ph = LN(ah)*ln_hh + b_hh (without
// norms ax + b_ih, ah + b_hh), from the row cache (cx, ch: ax, ah in fp32) when there are norms.
template <typename T>
struct Row {
  const T* ax;
  const T* ah;
  const T* b_ih;
  const T* b_hh;
  const T* ln_ih;
  const T* ln_hh;
  float* cx;
  float* ch;
  Stats sx, sh;

  __device__ __forceinline__ float nx(int e) const { return (cx[e] - sx.mean) * sx.rstd; }
  __device__ __forceinline__ float nh(int e) const { return (ch[e] - sh.mean) * sh.rstd; }
  __device__ __forceinline__ float px(int e) const {
    const float v = ln_ih != nullptr ? nx(e) * to_f(ln_ih[e]) : to_f(ax[e]);
    return b_ih != nullptr ? v + to_f(b_ih[e]) : v;
  }
  __device__ __forceinline__ float ph(int e) const {
    const float v = ln_hh != nullptr ? nh(e) * to_f(ln_hh[e]) : to_f(ah[e]);
    return b_hh != nullptr ? v + to_f(b_hh[e]) : v;
  }
};

// The statistics of both norms (cell_math.h: mean, then the mean of the centred squares). Caches ax, ah in fp32.
template <typename T>
__device__ __forceinline__ void norm_stats(Row<T>& r, int H, int G, float* red) {
  const int GH = G * H;
  float s[2] = {0.f, 0.f};
  for (int j = threadIdx.x; j < H; j += blockDim.x) {
    for (int e = j; e < GH; e += H) {
      const float a = to_f(r.ax[e]), h = to_f(r.ah[e]);
      r.cx[e] = a;
      r.ch[e] = h;
      s[0] += a;
      s[1] += h;
    }
  }
  block_sum(s, red);
  r.sx.mean = s[0] / static_cast<float>(GH);
  r.sh.mean = s[1] / static_cast<float>(GH);
  float q[2] = {0.f, 0.f};
  for (int j = threadIdx.x; j < H; j += blockDim.x) {
    for (int e = j; e < GH; e += H) {
      const float a = r.cx[e] - r.sx.mean, h = r.ch[e] - r.sh.mean;
      q[0] += a * a;
      q[1] += h * h;
    }
  }
  block_sum(q, red);
  r.sx.rstd = layer_norm_rstd(q[0] / static_cast<float>(GH));
  r.sh.rstd = layer_norm_rstd(q[1] / static_cast<float>(GH));
}

// The LSTM cell-state norm's statistics over the cached c [H].
__device__ __forceinline__ Stats cell_stats(const float* c, int H, float* red) {
  float s[1] = {0.f};
  for (int j = threadIdx.x; j < H; j += blockDim.x) s[0] += c[j];
  block_sum(s, red);
  Stats st;
  st.mean = s[0] / static_cast<float>(H);
  float q[1] = {0.f};
  for (int j = threadIdx.x; j < H; j += blockDim.x) {
    const float d = c[j] - st.mean;
    q[0] += d * d;
  }
  block_sum(q, red);
  st.rstd = layer_norm_rstd(q[0] / static_cast<float>(H));
  return st;
}

template <typename T>
__device__ __forceinline__ LstmState<float> lstm_unit(const Row<T>& r, int H, int j, float c_prev) {
  return lstm_state_forward<float>(r.px(j) + r.ph(j), r.px(H + j) + r.ph(H + j), r.px(2 * H + j) + r.ph(2 * H + j),
                                   r.px(3 * H + j) + r.ph(3 * H + j), c_prev);
}

template <typename T>
__device__ __forceinline__ GruState<float> gru_unit(const Row<T>& r, int H, int j, float h_prev, float* h_n) {
  *h_n = r.ph(2 * H + j);
  return gru_forward<float>(r.px(j) + r.ph(j), r.px(H + j) + r.ph(H + j), r.px(2 * H + j), *h_n, h_prev);
}

template <typename T>
__device__ __forceinline__ float keep_of(const T* mask, int j) {
  return mask != nullptr ? to_f(mask[j]) : 0.f;
}

template <typename T>
__device__ __forceinline__ Row<T> row_of(const ExtRows& p, int64_t b, float* cache) {
  Row<T> r;
  r.ax = static_cast<const T*>(p.ax) + b * p.ax_stride;
  r.ah = static_cast<const T*>(p.ah) + b * p.ah_stride;
  r.b_ih = static_cast<const T*>(p.b_ih);
  r.b_hh = static_cast<const T*>(p.b_hh);
  r.ln_ih = static_cast<const T*>(p.ln_ih);
  r.ln_hh = static_cast<const T*>(p.ln_hh);
  r.cx = p.cache.x >= 0 ? cache + p.cache.x : nullptr;
  r.ch = p.cache.h >= 0 ? cache + p.cache.h : nullptr;
  return r;
}

template <typename T>
__global__ __launch_bounds__(kMaxThreads) void ext_forward_rows_kernel(const ExtRows p) {
  FUSEDRNN_DYNAMIC_SMEM(float, smem);
  __shared__ float red[2 * kMaxWarps];  // (kStaticSmem bounds both kernels' static shared memory)
  const bool lstm = p.lstm != 0, ln = p.ln_ih != nullptr, ln_c = lstm && p.ln_c_weight != nullptr;
  const int H = p.H, G = lstm ? 4 : 3;
  float* cache = p.scratch != nullptr ? p.scratch + static_cast<int64_t>(blockIdx.x) * p.cache.floats : smem;
  const T* w_c = static_cast<const T*>(p.ln_c_weight);
  const T* b_c = static_cast<const T*>(p.ln_c_bias);
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {  // uniform per CTA: every branch below is too
    const T* h_prev = static_cast<const T*>(p.h_prev) + b * p.h_prev_stride;
    const T* c_prev = lstm ? static_cast<const T*>(p.c_prev) + b * p.c_prev_stride : nullptr;
    const T* zh = p.zoneout_h != nullptr ? static_cast<const T*>(p.zoneout_h) + b * p.zoneout_h_stride : nullptr;
    const T* zc = p.zoneout_c != nullptr ? static_cast<const T*>(p.zoneout_c) + b * p.zoneout_c_stride : nullptr;
    T* h_new = static_cast<T*>(p.h_new) + b * H;
    T* c_new = lstm ? static_cast<T*>(p.c_new) + b * H : nullptr;
    T* y = static_cast<T*>(p.y) + b * H;
    if (p.valid != nullptr && p.valid[b] == 0) {  // the row keeps its state and writes y = 0
      for (int j = threadIdx.x; j < H; j += blockDim.x) {
        h_new[j] = h_prev[j];
        y[j] = from_f<T>(0.f);
        if (lstm) c_new[j] = c_prev[j];
      }
      continue;
    }
    Row<T> r = row_of<T>(p, b, cache);
    if (ln) norm_stats(r, H, G, red);
    auto store_h = [&](int j, float h) {
      const float out = zoneout(keep_of(zh, j), to_f(h_prev[j]), h);
      h_new[j] = from_f<T>(out);
      y[j] = from_f<T>(out);
    };
    for (int j = threadIdx.x; j < H; j += blockDim.x) {
      if (lstm) {
        const float cp = to_f(c_prev[j]);
        const LstmState<float> st = lstm_unit(r, H, j, cp);
        c_new[j] = from_f<T>(zoneout(keep_of(zc, j), cp, st.c));
        if (ln_c) {  // h needs the row statistics of c first
          cache[p.cache.c + j] = st.c;
          cache[p.cache.o + j] = st.o;
        } else {
          store_h(j, st.o * tanh_(st.c));
        }
      } else {
        float h_n;
        const GruState<float> st = gru_unit(r, H, j, to_f(h_prev[j]), &h_n);
        store_h(j, st.h);
      }
    }
    if (ln_c) {
      const float* c = cache + p.cache.c;
      const Stats sc = cell_stats(c, H, red);
      for (int j = threadIdx.x; j < H; j += blockDim.x) {
        const float nc = (c[j] - sc.mean) * sc.rstd;
        store_h(j, cache[p.cache.o + j] * tanh_(nc * to_f(w_c[j]) + to_f(b_c[j])));
      }
    }
  }
}

template <typename T>
__global__ __launch_bounds__(kMaxThreads) void ext_backward_rows_kernel(const ExtRows p) {
  FUSEDRNN_DYNAMIC_SMEM(float, smem);
  __shared__ float red[4 * kMaxWarps];
  const bool lstm = p.lstm != 0, ln = p.ln_ih != nullptr, ln_c = lstm && p.ln_c_weight != nullptr;
  const bool bias = p.b_ih != nullptr;
  const int H = p.H, G = lstm ? 4 : 3, GH = G * H;
  float* cache = p.scratch != nullptr ? p.scratch + static_cast<int64_t>(blockIdx.x) * p.cache.floats : smem;
  const T* w_c = static_cast<const T*>(p.ln_c_weight);
  const T* b_c = static_cast<const T*>(p.ln_c_bias);
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {  // uniform per CTA: every branch below is too
    const T* h_prev = static_cast<const T*>(p.h_prev) + b * p.h_prev_stride;
    const T* c_prev = lstm ? static_cast<const T*>(p.c_prev) + b * p.c_prev_stride : nullptr;
    const T* zh = p.zoneout_h != nullptr ? static_cast<const T*>(p.zoneout_h) + b * p.zoneout_h_stride : nullptr;
    const T* zc = p.zoneout_c != nullptr ? static_cast<const T*>(p.zoneout_c) + b * p.zoneout_c_stride : nullptr;
    const float* grad_h = p.grad_h + b * p.grad_h_stride;
    const T* grad_y = static_cast<const T*>(p.grad_y) + b * p.grad_y_stride;
    const float* grad_c = lstm ? p.grad_c + b * p.grad_c_stride : nullptr;
    T* d_ax = static_cast<T*>(p.d_ax) + b * GH;
    T* d_ah = static_cast<T*>(p.d_ah) + b * GH;
    float* grad_h_prev = p.grad_h_prev + b * H;
    float* grad_c_prev = lstm ? p.grad_c_prev + b * H : nullptr;
    if (p.valid != nullptr && p.valid[b] == 0) {  // nothing happened: gradients pass through, none is produced
      for (int j = threadIdx.x; j < H; j += blockDim.x) {
        grad_h_prev[j] = grad_h[j];
        if (lstm) grad_c_prev[j] = grad_c[j];
        for (int e = j; e < GH; e += H) {
          d_ax[e] = from_f<T>(0.f);
          d_ah[e] = from_f<T>(0.f);
        }
      }
      continue;
    }
    float* acc = p.acc + b * p.acc_stride;
    Row<T> r = row_of<T>(p, b, cache);
    if (ln) norm_stats(r, H, G, red);
    float* d_cache = ln ? cache + p.cache.d : nullptr;  // d_px (= d_ph but for GRU's n part)
    float* dhn_cache = ln && !lstm ? cache + p.cache.dhn : nullptr;
    // Gradients dx of px and dh of ph at element e: the biases' and gains' shares into acc (this row's line:
    // no other thread or CTA touches it), then d_ax, d_ah at once without norms, else cached for the norms'
    // backward, whose row sums (of g = d * gain and g * normed, x and h) go to `sums`.
    float sums[4] = {0.f, 0.f, 0.f, 0.f};
    auto gate_grad = [&](int e, float dx, float dh) {
      if (bias) {
        acc[e] += dx;
        acc[GH + e] += dh;
      }
      if (!ln) {
        d_ax[e] = from_f<T>(dx);
        d_ah[e] = from_f<T>(dh);
        return;
      }
      const float nx = r.nx(e), nh = r.nh(e);
      acc[2 * GH + e] += dx * nx;
      acc[3 * GH + e] += dh * nh;
      const float gx = dx * to_f(r.ln_ih[e]), gh = dh * to_f(r.ln_hh[e]);
      sums[0] += gx;
      sums[1] += gx * nx;
      sums[2] += gh;
      sums[3] += gh * nh;
      d_cache[e] = dx;
    };
    if (lstm) {
      Stats sc;
      float mean_g = 0.f, mean_gn = 0.f;  // the cell norm's backward: means of g = d_n * w and g * normed
      float* c = ln_c ? cache + p.cache.c : nullptr;
      float* dc = ln_c ? cache + p.cache.dc : nullptr;
      if (ln_c) {
        for (int j = threadIdx.x; j < H; j += blockDim.x) c[j] = lstm_unit(r, H, j, to_f(c_prev[j])).c;
        sc = cell_stats(c, H, red);
        float m[2] = {0.f, 0.f};
        for (int j = threadIdx.x; j < H; j += blockDim.x) {
          const LstmState<float> st = lstm_unit(r, H, j, to_f(c_prev[j]));
          const float nc = (c[j] - sc.mean) * sc.rstd, w = to_f(w_c[j]);
          const float tanh_n = tanh_(nc * w + to_f(b_c[j]));
          const float d_h = zoneout(keep_of(zh, j), 0.f, grad_h[j] + to_f(grad_y[j]));
          const LstmOutputGrad<float> out = lstm_output_backward(st.o, tanh_n, d_h);
          acc[4 * GH + j] += out.n * nc;
          acc[4 * GH + H + j] += out.n;
          const float g = out.n * w;
          m[0] += g;
          m[1] += g * nc;
          dc[j] = g;
          d_cache[3 * H + j] = out.o;  // d_o, cached until the pass below hands it to gate_grad
        }
        block_sum(m, red);
        mean_g = m[0] / static_cast<float>(H);
        mean_gn = m[1] / static_cast<float>(H);
      }
      for (int j = threadIdx.x; j < H; j += blockDim.x) {
        const float cp = to_f(c_prev[j]);
        const LstmState<float> st = lstm_unit(r, H, j, cp);
        const float grad_out = grad_h[j] + to_f(grad_y[j]);
        const float keep_h = keep_of(zh, j), keep_c = keep_of(zc, j);
        float d_o, d_c = zoneout(keep_c, 0.f, grad_c[j]);  // gradient of c~ through zoneout's select
        if (ln_c) {
          d_o = d_cache[3 * H + j];
          d_c += layer_norm_backward(dc[j], (c[j] - sc.mean) * sc.rstd, sc.rstd, mean_g, mean_gn);
        } else {
          const LstmOutputGrad<float> out = lstm_output_backward(st.o, tanh_(st.c), zoneout(keep_h, 0.f, grad_out));
          d_o = out.o;
          d_c += out.n;
        }
        const LstmGrad<float> d = lstm_state_backward(st.i, st.f, st.g, cp, d_c);
        grad_h_prev[j] = zoneout(keep_h, grad_out, 0.f);  // h_{t-1} reaches h_t only where zoneout kept it
        grad_c_prev[j] = zoneout(keep_c, grad_c[j], 0.f) + d.c_prev;
        gate_grad(j, d.i, d.i);
        gate_grad(H + j, d.f, d.f);
        gate_grad(2 * H + j, d.g, d.g);
        gate_grad(3 * H + j, d_o, d_o);
      }
    } else {
      for (int j = threadIdx.x; j < H; j += blockDim.x) {
        const float hp = to_f(h_prev[j]);
        float h_n;
        const GruState<float> st = gru_unit(r, H, j, hp, &h_n);
        const float grad_out = grad_h[j] + to_f(grad_y[j]);
        const float keep_h = keep_of(zh, j);
        const GruGrad<float> d = gru_backward(st.r, st.z, st.n, h_n, hp, zoneout(keep_h, 0.f, grad_out));
        grad_h_prev[j] = zoneout(keep_h, grad_out, 0.f) + d.h_prev;
        gate_grad(j, d.r, d.r);
        gate_grad(H + j, d.z, d.z);
        gate_grad(2 * H + j, d.n, d.h_n);
        if (ln) dhn_cache[j] = d.h_n;
      }
    }
    if (ln) {  // the norms' backward: d_ax = rstd (g - mean(g) - nx mean(g nx)), g = d_px * ln_ih; d_ah likewise
      block_sum(sums, red);
      const float mgx = sums[0] / static_cast<float>(GH), mgnx = sums[1] / static_cast<float>(GH);
      const float mgh = sums[2] / static_cast<float>(GH), mgnh = sums[3] / static_cast<float>(GH);
      for (int j = threadIdx.x; j < H; j += blockDim.x) {
        for (int e = j; e < GH; e += H) {
          const float dx = d_cache[e];
          const float dh = (!lstm && e >= 2 * H) ? dhn_cache[j] : dx;
          d_ax[e] = from_f<T>(layer_norm_backward(dx * to_f(r.ln_ih[e]), r.nx(e), r.sx.rstd, mgx, mgnx));
          d_ah[e] = from_f<T>(layer_norm_backward(dh * to_f(r.ln_hh[e]), r.nh(e), r.sh.rstd, mgh, mgnh));
        }
      }
    }
  }
}

template <typename T>
cudaError_t launch(bool backward, const ExtRows& args, int smem_optin, cudaStream_t stream) {
  ExtRows a = args;
  a.cache = ext_cache_layout(a.lstm != 0, a.ln_ih != nullptr, a.ln_c_weight != nullptr, a.H, backward);
  if (a.scratch == nullptr && !ext_cache_in_smem(a.cache.floats, smem_optin)) {
    return cudaErrorInvalidValue;  // the glue gives a scratch instead
  }
  const int64_t bytes = a.scratch != nullptr ? 0 : a.cache.floats * static_cast<int64_t>(sizeof(float));
  const void* kernel = backward ? reinterpret_cast<const void*>(&ext_backward_rows_kernel<T>)
                                : reinterpret_cast<const void*>(&ext_forward_rows_kernel<T>);
  if (bytes > kDefaultSmem) {  // per call: a host-side attribute write, cheaper than tracking it per device
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  const unsigned grid = static_cast<unsigned>(ext_grid(a.B)), threads = static_cast<unsigned>(ext_threads(a.H));
  if (backward) {
    FUSEDRNN_LAUNCH(grid, threads, static_cast<size_t>(bytes), stream, ext_backward_rows_kernel<T>)(a);
  } else {
    FUSEDRNN_LAUNCH(grid, threads, static_cast<size_t>(bytes), stream, ext_forward_rows_kernel<T>)(a);
  }
  return cudaGetLastError();
}

cudaError_t dispatch(bool backward, DType dt, const ExtRows& a, int smem_optin, cudaStream_t stream) {
  switch (dt) {
    case DType::F32: return launch<float>(backward, a, smem_optin, stream);
    case DType::F16: return launch<__half>(backward, a, smem_optin, stream);
    case DType::BF16: return launch<__nv_bfloat16>(backward, a, smem_optin, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_ext_forward_rows(DType dt, const ExtRows& a, int smem_optin, cudaStream_t stream) {
  return dispatch(false, dt, a, smem_optin, stream);
}
cudaError_t launch_ext_backward_rows(DType dt, const ExtRows& a, int smem_optin, cudaStream_t stream) {
  return dispatch(true, dt, a, smem_optin, stream);
}

}  // namespace fusedrnn::cuda::ext
