// Backend "cuda" of fusedrnn::beam_topk: log_softmax + beam score + top-k for beam search in one pass over
// the logits; no [B*K, V] log-prob tensor. Semantics: fusedrnn/reference_decoding.py.
//
// A candidate is one uint64 key, ordered(x) << 32 | (2^32-1 - token): ordered() maps fp32 to uint32
// monotonically, so "larger key" is exactly (raw logit desc, token asc), the per-row order of the spec.
// Empty slots are key 0, below every real key (ordered(-inf) = 0x007FFFFF).
//
// Stage 1, grid (rows, vocab slices), 4 warps: each thread keeps the online max m and sum s of exp(x - m) of
// its logits; each warp keeps the top-k keys of its logits in a sorted list distributed over its lanes (E
// = ceil(k/32) registers each). A tile is 512 logits, 4 per thread, loaded before use; a logit is offered
// to the list only if it beats the list's k-th key (ballot, then one warp-wide insertion per winner: for
// random logits ~k(1 + ln(n/k)) insertions per n logits). Then the 4 warps merge lists and (m, s).
// Stage 2, grid (batch items), 1 warp: per beam, merge its slices (top-k of their keys, log-sum-exp),
// score ((x - m) - log s) + beam score, and keep the k best by ordered(score) << 32 | (2^32-1 - slot) with
// slot = beam * k + row rank, i.e. (score desc, beam asc, rank asc); NaN scores get the top key.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/beam_topk.h"
#include "cuda/ptx.cuh"

namespace fusedrnn::cuda::beam {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = kPartialThreads / 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ uint32_t ordered(float x) {
  const uint32_t b = __float_as_uint(x == 0.0f ? 0.0f : x);  // -0.0 ties +0.0
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float unordered(uint32_t o) {
  return __uint_as_float((o & 0x80000000u) ? (o ^ 0x80000000u) : ~o);
}

__device__ __forceinline__ uint64_t make_key(uint32_t high, uint32_t index) {
  return (static_cast<uint64_t>(high) << 32) | static_cast<uint64_t>(0xffffffffu - index);
}

__device__ __forceinline__ uint32_t key_index(uint64_t key) {
  return 0xffffffffu - static_cast<uint32_t>(key & 0xffffffffull);
}

// (m, s) of two parts: s = s1 exp(m1 - m) + s2 exp(m2 - m); parts with m = -inf have s = 0.
__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty
  s = (m == -INFINITY ? 0.0f : s * __expf(m - mn)) + (m2 == -INFINITY ? 0.0f : s2 * __expf(m2 - mn));
  m = mn;
}

__device__ __forceinline__ void warp_combine(float& m, float& s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(kFull, m, off);
    const float s2 = __shfl_xor_sync(kFull, s, off);
    combine(m, s, m2, s2);
  }
}

// The k largest keys seen by a warp, sorted descending, entry g = lane * E + j in lane's e[j].
// Every method is warp-collective (all 32 lanes, same arguments except `key` in offer).
template <int E>
struct WarpTopK {
  uint64_t e[E];
  uint64_t thresh;  // the k-th key (0 while fewer than k)
  int k;

  __device__ void init(int k_) {
    k = k_;
#pragma unroll
    for (int j = 0; j < E; ++j) e[j] = 0;
    thresh = 0;
  }

  // Entry k-1. Masks, not `if (j == ...)`: nvcc folds the latter into e[(k-1) % E], a dynamic index that
  // sends the whole list to local memory (32-48 bytes of stack per thread at E = 2, 4).
  __device__ __forceinline__ uint64_t kth() const {
    const int g = k - 1;
    uint64_t mine = 0;
#pragma unroll
    for (int j = 0; j < E; ++j) mine |= e[j] & (0ull - static_cast<uint64_t>(j == g % E));
    return __shfl_sync(kFull, mine, g / E);
  }

  // v > thresh, warp-uniform: v enters at rank p = #entries > v, the entries from p on shift down one.
  __device__ __forceinline__ void insert(uint64_t v, int lane) {
    int above = 0;
#pragma unroll
    for (int j = 0; j < E; ++j) above += e[j] > v ? 1 : 0;
    const int p = __reduce_add_sync(kFull, above);
    const uint64_t prev_last = __shfl_up_sync(kFull, e[E - 1], 1);
#pragma unroll
    for (int j = E - 1; j >= 0; --j) {
      const int g = lane * E + j;
      if (g > p) {
        e[j] = j > 0 ? e[j > 0 ? j - 1 : 0] : prev_last;  // (the inner guard keeps j - 1 >= 0 to compile)
      } else if (g == p) {
        e[j] = v;
      }
    }
    thresh = kth();
  }

  // Each lane offers one key (0 = nothing).
  __device__ __forceinline__ void offer(uint64_t key, int lane) {
    unsigned winners = __ballot_sync(kFull, key > thresh);
    while (winners) {
      const int src = __ffs(winners) - 1;
      winners &= winners - 1;
      const uint64_t v = __shfl_sync(kFull, key, src);
      if (v > thresh) insert(v, lane);
    }
  }
};

template <typename T, int E>
__global__ void __launch_bounds__(kPartialThreads)
beam_topk_partial(const T* __restrict__ logits, int64_t row_stride, int64_t V, int64_t chunk, int k,
                  uint64_t* __restrict__ part_keys, float* __restrict__ part_m, float* __restrict__ part_s,
                  int* __restrict__ part_bad) {
  __shared__ uint64_t other_keys[kWarps - 1][kMaxK];
  __shared__ float red_m[kWarps], red_s[kWarps];
  __shared__ int red_bad[kWarps];

  const int64_t row = blockIdx.x;
  const int split = blockIdx.y, num_splits = gridDim.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < V ? begin + chunk : V;
  const T* x = logits + row * row_stride;

  WarpTopK<E> list;
  list.init(k);
  float m = -INFINITY, s = 0.0f;
  bool bad = false;
  constexpr int U = kPartialUnroll;
  for (int64_t base = begin; base < end; base += kPartialThreads * U) {
    float v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * kPartialThreads + threadIdx.x;
      v[u] = i < end ? to_float(x[i]) : -INFINITY;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * kPartialThreads + threadIdx.x;
      const bool valid = i < end;
      const bool nonfinite_up = !(v[u] < INFINITY);  // NaN or +inf poisons the row
      bad |= valid && nonfinite_up;
      const float xc = nonfinite_up ? -INFINITY : v[u];
      if (xc > m) {
        s = s * __expf(m - xc) + 1.0f;  // m = -inf: s is 0 and exp(-inf) = 0
        m = xc;
      } else if (xc != -INFINITY) {
        s += __expf(xc - m);
      }
      list.offer(valid ? make_key(ordered(v[u]), static_cast<uint32_t>(i)) : 0ull, lane);
    }
  }

  // block: (m, s, bad) and the warps' lists
  warp_combine(m, s);
  bad = __any_sync(kFull, bad);
  if (lane == 0) {
    red_m[warp] = m;
    red_s[warp] = s;
    red_bad[warp] = bad ? 1 : 0;
  }
  if (warp > 0) {
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const int g = lane * E + j;
      if (g < k) other_keys[warp - 1][g] = list.e[j];
    }
  }
  __syncthreads();
  if (warp != 0) return;
  for (int w = 0; w < kWarps - 1; ++w) {
    for (int g0 = 0; g0 < k; g0 += 32) {
      list.offer(g0 + lane < k ? other_keys[w][g0 + lane] : 0ull, lane);
    }
  }
  const int64_t part = row * num_splits + split;
#pragma unroll
  for (int j = 0; j < E; ++j) {
    const int g = lane * E + j;
    if (g < k) part_keys[part * k + g] = list.e[j];
  }
  if (lane == 0) {
    float bm = red_m[0], bs = red_s[0];
    int bb = red_bad[0];
    for (int w = 1; w < kWarps; ++w) {
      combine(bm, bs, red_m[w], red_s[w]);
      bb |= red_bad[w];
    }
    part_m[part] = bm;
    part_s[part] = bs;
    part_bad[part] = bb;
  }
}

template <int E>
__global__ void __launch_bounds__(32)
beam_topk_merge(const uint64_t* __restrict__ part_keys, const float* __restrict__ part_m,
                const float* __restrict__ part_s, const int* __restrict__ part_bad,
                const float* __restrict__ beam_scores, int64_t V, int K, int num_splits, int k,
                int64_t* __restrict__ row_tokens, float* __restrict__ out_scores, int64_t* __restrict__ out_tokens,
                int64_t* __restrict__ out_parents) {
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x;
  const int kk = V < k ? static_cast<int>(V) : k;  // candidates per row
  WarpTopK<E> best;
  best.init(k);
  for (int r = 0; r < K; ++r) {
    const int64_t row = b * K + r;
    float m = -INFINITY, s = 0.0f;
    bool bad = false;
    for (int j = lane; j < num_splits; j += 32) {
      combine(m, s, part_m[row * num_splits + j], part_s[row * num_splits + j]);
      bad |= part_bad[row * num_splits + j] != 0;
    }
    warp_combine(m, s);
    const float beam = beam_scores[row];
    const bool poisoned = __any_sync(kFull, bad) || isnan(beam) || beam == INFINITY;
    const bool dead = m == -INFINITY;
    const float log_s = dead ? 0.0f : logf(s);

    WarpTopK<E> rl;  // the row's top-kk over its slices
    rl.init(kk);
    const int64_t n = static_cast<int64_t>(num_splits) * k;
    for (int64_t i0 = 0; i0 < n; i0 += 32) {
      rl.offer(i0 + lane < n ? part_keys[row * n + i0 + lane] : 0ull, lane);
    }
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const int g = lane * E + j;
      uint64_t fkey = 0;
      if (g < kk) {
        uint32_t sord;
        int64_t token;
        if (poisoned) {
          sord = 0xffffffffu;  // NaN: above every number
          token = g;
        } else {
          const float x = unordered(static_cast<uint32_t>(rl.e[j] >> 32));
          const float score = dead ? -INFINITY : ((x - m) - log_s) + beam;
          sord = ordered(score);
          token = key_index(rl.e[j]);
        }
        row_tokens[row * k + g] = token;
        fkey = make_key(sord, static_cast<uint32_t>(r * k + g));
      }
      best.offer(fkey, lane);
    }
  }
  __syncwarp();  // row_tokens written by other lanes
#pragma unroll
  for (int j = 0; j < E; ++j) {
    const int g = lane * E + j;
    if (g < k) {
      const uint32_t slot = key_index(best.e[j]);
      const int beam = static_cast<int>(slot / k), rank = static_cast<int>(slot % k);
      out_scores[b * k + g] = unordered(static_cast<uint32_t>(best.e[j] >> 32));
      out_tokens[b * k + g] = row_tokens[(b * K + beam) * k + rank];
      out_parents[b * k + g] = beam;
    }
  }
}

template <typename T, int E>
cudaError_t launch_typed(const BeamTopkArgs& a, cudaStream_t stream) {
  const dim3 grid1(static_cast<unsigned>(a.R), static_cast<unsigned>(a.num_splits));
  FUSEDRNN_LAUNCH(grid1, kPartialThreads, 0, stream, beam_topk_partial<T, E>)(
      static_cast<const T*>(a.logits), a.row_stride, a.V, a.chunk, a.k, a.part_keys, a.part_m, a.part_s,
      a.part_bad);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  FUSEDRNN_LAUNCH(static_cast<unsigned>(a.R / a.K), 32, 0, stream, beam_topk_merge<E>)(
      a.part_keys, a.part_m, a.part_s, a.part_bad, a.beam_scores, a.V, a.K, a.num_splits, a.k, a.row_tokens,
      a.scores, a.tokens, a.parents);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_k(const BeamTopkArgs& a, cudaStream_t stream) {
  if (a.k <= 32) return launch_typed<T, 1>(a, stream);
  if (a.k <= 64) return launch_typed<T, 2>(a, stream);
  return launch_typed<T, 4>(a, stream);
}

}  // namespace

void choose_splits(int64_t R, int64_t V, int num_sms, int* num_splits, int64_t* chunk) {
  // ~4 blocks per SM in stage 1, slices of at least 4 tiles (2048 logits), at most 65535 (grid.y)
  const int64_t tile = static_cast<int64_t>(kPartialThreads) * kPartialUnroll;
  int64_t ns = (4 * static_cast<int64_t>(num_sms) + R - 1) / R;
  const int64_t max_by_size = (V + 4 * tile - 1) / (4 * tile);
  ns = ns < max_by_size ? ns : max_by_size;
  ns = ns < 1 ? 1 : (ns > 65535 ? 65535 : ns);
  int64_t c = (V + ns - 1) / ns;
  c = (c + 127) / 128 * 128;  // slices start 512-byte aligned for fp32 rows
  *chunk = c;
  *num_splits = static_cast<int>((V + c - 1) / c);
}

cudaError_t launch_beam_topk(const BeamTopkArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case LogitsType::F32:
      return launch_for_k<float>(a, stream);
    case LogitsType::F16:
      return launch_for_k<__half>(a, stream);
    case LogitsType::BF16:
      return launch_for_k<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fusedrnn::cuda::beam
