// Small GEMMs of the CPU kernels:  C[m, cols] = beta*C + A[m, k] @ B[k, cols], with B packed once per layer
// call (the weights do not change across the T steps), and the thread team the layer loops run on.
//
// Why not BLAS: a recurrent step is a skinny product (m = batch, often 1-16) called T times in a row. On the
// project's 2-core AMD EPYC (Zen 4), torch's MKL runs its generic ("def") kernels: [16x256]@[256x1024] takes
// ~130 us single-threaded, and milliseconds once its OpenMP team waits on a busy core. Here B is packed into
// column panels of NR contiguous values per row (the k-loop streams memory instead of striding 4 KB, which
// aliases L1 sets) and an MR x NR tile of C stays in vector registers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__linux__)
#include <sched.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <thread>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/isa.h"

namespace fusedrnn::cpu {

// ---------------------------------------------------------------------------------------------------
// Thread team. The layer loops run the whole sequence inside ONE parallel region and meet at a barrier per
// step, instead of forking a team per step: forking costs ~5-10 us, a spinning barrier well under 1 us, and
// each core keeps its half of W_hh in its own 1 MB L2 (LSTM H=256, B=1: 15.3 us/step on one core, 6.5 on
// two; standalone measurement).
// ---------------------------------------------------------------------------------------------------
struct Team {
  int id = 0, size = 1;
};

// [begin, end) of part `id` when n items are split into `parts` near-equal ranges.
inline std::pair<int64_t, int64_t> split_range(int64_t n, int id, int parts) {
  return {n * id / parts, n * (id + 1) / parts};
}

// Threads a team may use: torch's setting, but never more than the CPUs this process may run on (or
// $FUSEDRNN_CPU_TEAM_MAX: tests use it to split 3 ways on 2 cores). A team meets at a barrier every step, so a
// thread beyond the cores waits for a time slice at each one.
inline int team_threads() {
  static const int cpus = [] {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  }();
  const char* cap = std::getenv("FUSEDRNN_CPU_TEAM_MAX");
  const int limit = cap && std::atoi(cap) > 0 ? std::atoi(cap) : cpus;
  return std::max(1, std::min(at::get_num_threads(), limit));
}

// Runs body(Team) on `threads` threads (1: on the caller). body must not throw: the whole call is prepared
// (allocated, checked) before the region starts.
template <typename F>
void run_team(int threads, const F& body) {
#ifdef _OPENMP
  if (threads > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(threads)
    body(Team{omp_get_thread_num(), omp_get_num_threads()});
    return;
  }
#endif
  body(Team{});
}

inline void team_barrier(const Team& team) {
#ifdef _OPENMP
  if (team.size > 1) {
#pragma omp barrier
  }
#endif
}

// ---------------------------------------------------------------------------------------------------
// Scratch memory
// ---------------------------------------------------------------------------------------------------
// Buffers that live for one op call (packed weights, gate pre-activations, per-step rows) are kept per
// calling thread and reused. Fresh allocations of a few MB come from mmap: each call then paid ~500 page
// faults, and munmap with the team's second thread alive costs a TLB-shootdown IPI; a batch-1 LSTM layer
// (T=1, H=256, 2 threads) spent 5 of its 6 s over 5000 calls in the kernel. Slots above 64 MB are not kept.
enum class Scratch : int { kPackIn, kPackRec, kPackProj, kGates, kStepGates, kStepProj, kStepRows, kWorkspace,
                           kGradGates, kGradGatesH, kGradOut, kPrevState, kCount };

inline at::Tensor scratch(Scratch slot, at::IntArrayRef shape, at::ScalarType dtype) {
  constexpr int64_t kKeepBytes = int64_t(64) << 20;
  thread_local at::Tensor slots[static_cast<int>(Scratch::kCount)];
  const int64_t numel = c10::multiply_integers(shape);
  const int64_t bytes = std::max<int64_t>(numel, 1) * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes > kKeepBytes) return at::empty(shape, at::TensorOptions().dtype(dtype));
  at::Tensor& buf = slots[static_cast<int>(slot)];
  if (!buf.defined() || buf.nbytes() < static_cast<size_t>(bytes)) {
    buf = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  }
  // A tensor over the slot's first bytes that keeps the slot's storage alive (as a view would, should the slot
  // be regrown while it is in use), made without the dispatcher: the narrow/view chain it replaces was 4
  // dispatched ops per slot, ~7 slots a forward call -- ~40 us of an LSTM T=2 B=1 H=1 call's ~120.
  return at::from_blob(buf.data_ptr(), shape, [keep = buf.storage()](void*) mutable { keep = c10::Storage(); },
                       at::TensorOptions().dtype(dtype));
}

// ---------------------------------------------------------------------------------------------------
// Packed B
// ---------------------------------------------------------------------------------------------------
// Panel width: two 64-byte vectors (32 fp32 / 16 fp64 columns).
template <typename T>
constexpr int64_t kPanel = 128 / static_cast<int64_t>(sizeof(T));

// B's columns come in `groups` groups of `group_width` (the gates of a cell: G groups of H). Panel q holds
// block q / groups of group q % groups, so the panels of one hidden-unit block -- every gate of units
// [32u, 32u+32) -- are adjacent: a thread that owns some units computes exactly the gate columns its
// pointwise pass needs, with no barrier in between.
template <typename T>
struct PackedB {
  int64_t k = 0, groups = 1, group_width = 0;
  int64_t blocks = 0;  // panels per group
  at::Tensor storage;  // [groups * blocks] panels of k * NR values, zero-padded, slice by slice (pack_panel_body)
  const T* panel(int64_t q) const { return storage.data_ptr<T>() + q * k * kPanel<T>; }
  int64_t panels() const { return groups * blocks; }
  int64_t col(int64_t q) const { return (q % groups) * group_width + (q / groups) * kPanel<T>; }
  int64_t width(int64_t q) const { return std::min(kPanel<T>, group_width - (q / groups) * kPanel<T>); }
};

// GCC vector extensions, VB bytes (one register at that ISA level: cpu/isa.h). Written with explicit vectors
// because GCC's auto-vectorizer turned the plain-array version of the GEMM loop into shuffles at 4.7 GFLOP/s.
template <typename T, int VB>
struct Simd {
  typedef T type __attribute__((vector_size(VB)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> lane_int;
  typedef lane_int mask __attribute__((vector_size(VB)));  // shuffle masks
  static constexpr int lanes = VB / static_cast<int>(sizeof(T));
};

// Transposes a W x W block in registers (W = lanes): rows[i] <- column i. log2(W) rounds of two-source
// shuffles, each swapping the off-diagonal s x s blocks of every 2s x 2s block (s = W/2, ..., 1).
template <typename T, int VB, int s>
FUSEDRNN_ALWAYS_INLINE void transpose_rounds(typename Simd<T, VB>::type* rows) {
  using M = typename Simd<T, VB>::mask;
  constexpr int W = Simd<T, VB>::lanes;
  M lo{}, hi{};
  for (int e = 0; e < W; ++e) {
    const int g = e / (2 * s), w = e % (2 * s);
    lo[e] = w < s ? g * 2 * s + w : W + g * 2 * s + (w - s);
    hi[e] = lo[e] + s;
  }
  for (int i0 = 0; i0 < W; i0 += 2 * s) {
    for (int i = i0; i < i0 + s; ++i) {
      const auto a = rows[i], b = rows[i + s];
      rows[i] = __builtin_shuffle(a, b, lo);
      rows[i + s] = __builtin_shuffle(a, b, hi);
    }
  }
  if constexpr (s > 1) transpose_rounds<T, VB, s / 2>(rows);
}

// One panel: B[p][jj] = src[p * stride_p + jj * stride_j] for p < k, jj < width; zero for jj >= width. Stored
// slice by slice (panel_slice_offset): the GEMM tile of each level reads one slice of 2 vectors' columns,
// and its k rows must be contiguous -- read at the panel's 128-byte row stride, the baseline's 32-byte slices
// used a quarter of every line fetched and ran at 8 GFLOP/s (rnn_relu T=16, B=64, H=512, Zen 3).
// A transposed source (stride_p == 1: the weights as stored) goes through register transposes of W x W
// blocks: element by element it took ~0.9 ns per value and a fifth of a batch-1 LSTM call (H = 256).
template <typename T, Isa isa>
FUSEDRNN_ALWAYS_INLINE void pack_panel_body(const T* __restrict__ src, int64_t k, int64_t width, int64_t stride_p,
                                            int64_t stride_j, T* __restrict__ dst) {
  constexpr int VB = kVectorBytes<isa>;
  using V = typename Simd<T, VB>::type;
  constexpr int64_t NR = kPanel<T>, W = Simd<T, VB>::lanes, S = 2 * W;
  const auto at = [k](int64_t p, int64_t jj) { return (jj / S) * k * S + p * S + jj % S; };
  int64_t p_done = 0;
  if (stride_p == 1 && width == NR) {
    p_done = k / W * W;
    for (int64_t p0 = 0; p0 < p_done; p0 += W) {
      for (int64_t jj0 = 0; jj0 < NR; jj0 += W) {
        V rows[W];
        for (int i = 0; i < W; ++i) __builtin_memcpy(&rows[i], src + (jj0 + i) * stride_j + p0, sizeof(V));
        transpose_rounds<T, VB, W / 2>(rows);
        for (int i = 0; i < W; ++i) __builtin_memcpy(dst + at(p0 + i, jj0), &rows[i], sizeof(V));
      }
    }
  }
  for (int64_t p = p_done; p < k; ++p) {
    for (int64_t jj = 0; jj < width; ++jj) dst[at(p, jj)] = src[p * stride_p + jj * stride_j];
    for (int64_t jj = width; jj < NR; ++jj) dst[at(p, jj)] = T(0);
  }
}
FUSEDRNN_ISA_LEVELS(pack_panel, (const T* __restrict__ src, int64_t k, int64_t width, int64_t stride_p,
                                 int64_t stride_j, T* __restrict__ dst),
                    (src, k, width, stride_p, stride_j, dst))

// B[p][j] = src[p * stride_p + j * stride_j] for p < k, j < groups * group_width.
template <typename T>
PackedB<T> pack_b(Scratch slot, const T* src, int64_t k, int64_t groups, int64_t group_width, int64_t stride_p,
                  int64_t stride_j) {
  constexpr int64_t NR = kPanel<T>;
  PackedB<T> b;
  b.k = k;
  b.groups = groups;
  b.group_width = group_width;
  b.blocks = (group_width + NR - 1) / NR;
  b.storage = scratch(slot, {b.panels() * k * NR}, c10::CppTypeToScalarType<T>::value);
  T* out = b.storage.template data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(k * NR, 1));
  at::parallel_for(0, b.panels(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      pack_panel<T>(src + b.col(q) * stride_j, k, b.width(q), stride_p, stride_j, out + q * k * NR);
    }
  });
  return b;
}

// ---------------------------------------------------------------------------------------------------
// Kernel
// ---------------------------------------------------------------------------------------------------
// One MR x (2 vectors) tile of C over the full k: `slice` is one slice of a packed panel ([k, 2 vectors]);
// nr <= 2 * lanes columns are stored. A's values come from `a` (row stride lda), or with kBroadcastA already
// broadcast into vectors: ab[p * MR + r] = {a[r][p], ...} (gemm_rows_panels says when).
template <typename T, int VB, int MR, bool kBroadcastA = false>
FUSEDRNN_ALWAYS_INLINE void gemm_tile(int64_t k, const T* a, int64_t lda, const typename Simd<T, VB>::type* ab,
                                      const T* slice, T beta, T* c, int64_t ldc, int64_t nr) {
  using V = typename Simd<T, VB>::type;
  constexpr int W = Simd<T, VB>::lanes;
  V acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = V{};
  for (int64_t p = 0; p < k; ++p) {
    V b0, b1;
    __builtin_memcpy(&b0, slice + p * 2 * W, sizeof(V));
    __builtin_memcpy(&b1, slice + p * 2 * W + W, sizeof(V));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      if constexpr (kBroadcastA) {
        const V av = ab[p * MR + r];
        acc[r][0] += av * b0;
        acc[r][1] += av * b1;
      } else {
        const T av = a[r * lda + p];
        acc[r][0] += av * b0;
        acc[r][1] += av * b1;
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    T* crow = c + r * ldc;
    if (nr == 2 * W) {  // full tile: vector stores (a scalar store loop cost ~6% at k = 256)
      if (beta != T(0)) {
        V c0, c1;
        __builtin_memcpy(&c0, crow, sizeof(V));
        __builtin_memcpy(&c1, crow + W, sizeof(V));
        acc[r][0] += beta * c0;
        acc[r][1] += beta * c1;
      }
      __builtin_memcpy(crow, &acc[r][0], sizeof(V));
      __builtin_memcpy(crow + W, &acc[r][1], sizeof(V));
      continue;
    }
    T out[2 * W];
    __builtin_memcpy(out, &acc[r][0], sizeof(V));
    __builtin_memcpy(out + W, &acc[r][1], sizeof(V));
    if (beta == T(0)) {
      for (int64_t j = 0; j < nr; ++j) crow[j] = out[j];
    } else {
      for (int64_t j = 0; j < nr; ++j) crow[j] = beta * crow[j] + out[j];
    }
  }
}

// Every slice of panels [q0, q1) with the rows [i, i1) of one row block: fn(slice, C columns, width).
template <typename T, int VB, typename F>
FUSEDRNN_ALWAYS_INLINE void for_each_slice(int64_t q0, int64_t q1, const PackedB<T>& b, T* c, const F& fn) {
  constexpr int64_t S = 2 * Simd<T, VB>::lanes;
  for (int64_t q = q0; q < q1; ++q) {
    const T* panel = b.panel(q);
    const int64_t width = b.width(q);
    for (int64_t s0 = 0; s0 < width; s0 += S) fn(panel + s0 * b.k, c + b.col(q) + s0, std::min(S, width - s0));
  }
}

// Rows [0, m) x panels [q0, q1), in blocks of 64 rows so that a block of A stays in L1/L2 while every panel
// streams past it: panel-outer order re-read A from memory once per panel and ran the [8192x512]@[512x2048]
// input projection at 76 GFLOP/s, row blocks at 110 (one Zen 4 core, AVX-512). A panel (128 bytes of
// columns) is one slice (tile width) with AVX-512, 2 with AVX2 and 4 with 16-byte vectors.
// kBroadcastA (x86 baseline, SSE2): SSE has no broadcast instruction, and a movss + shufps per row and k step
// took the ports the multiplies and adds need; each full tile's A is broadcast into vectors once and serves
// every panel (standalone 48x512 @ 512x2048, Zen 3: 27.6 -> 35.3 GFLOP/s).
template <typename T, int VB, int MR, bool kBroadcastA>
FUSEDRNN_ALWAYS_INLINE void gemm_rows_panels(int64_t m, int64_t q0, int64_t q1, const T* a, int64_t lda,
                                             const PackedB<T>& b, T beta, T* c, int64_t ldc) {
  using V = typename Simd<T, VB>::type;
  constexpr int64_t kRowBlock = 64;
  // Leftover rows in 4-, 2- and 1-row tiles: one row alone keeps only two FMA chains in flight
  // (LSTM B=4, H=128: ~20% faster per step than four 1-row tiles).
  const auto leftover_rows = [&](int64_t i, int64_t i1, const T* slice, T* cs, int64_t nr) FUSEDRNN_INLINE_LAMBDA {
    if (MR > 4 && i + 4 <= i1) {
      gemm_tile<T, VB, 4>(b.k, a + i * lda, lda, nullptr, slice, beta, cs + i * ldc, ldc, nr);
      i += 4;
    }
    if (i + 2 <= i1) {
      gemm_tile<T, VB, 2>(b.k, a + i * lda, lda, nullptr, slice, beta, cs + i * ldc, ldc, nr);
      i += 2;
    }
    if (i < i1) gemm_tile<T, VB, 1>(b.k, a + i * lda, lda, nullptr, slice, beta, cs + i * ldc, ldc, nr);
  };
  for (int64_t i0 = 0; i0 < m; i0 += kRowBlock) {
    const int64_t i1 = std::min(m, i0 + kRowBlock);
    const int64_t i_rest = i0 + (i1 - i0) / MR * MR;  // rows left after the full MR-row tiles
    if constexpr (kBroadcastA) {
      thread_local std::vector<V> broadcast;
      if (static_cast<int64_t>(broadcast.size()) < b.k * MR) broadcast.resize(b.k * MR);
      V* ab = broadcast.data();
      for (int64_t i = i0; i < i_rest; i += MR) {
        for (int64_t p = 0; p < b.k; ++p) {
          for (int r = 0; r < MR; ++r) ab[p * MR + r] = V{} + a[(i + r) * lda + p];
        }
        for_each_slice<T, VB>(q0, q1, b, c + i * ldc, [&](const T* slice, T* cs, int64_t nr) FUSEDRNN_INLINE_LAMBDA {
          gemm_tile<T, VB, MR, true>(b.k, nullptr, 0, ab, slice, beta, cs, ldc, nr);
        });
      }
      if (i_rest < i1) {
        for_each_slice<T, VB>(q0, q1, b, c, [&](const T* slice, T* cs, int64_t nr) FUSEDRNN_INLINE_LAMBDA {
          leftover_rows(i_rest, i1, slice, cs, nr);
        });
      }
    } else {  // every row of the block per slice: the slice stays in L1 across the block's tiles
      for_each_slice<T, VB>(q0, q1, b, c, [&](const T* slice, T* cs, int64_t nr) FUSEDRNN_INLINE_LAMBDA {
        for (int64_t i = i0; i < i_rest; i += MR) {
          gemm_tile<T, VB, MR>(b.k, a + i * lda, lda, nullptr, slice, beta, cs + i * ldc, ldc, nr);
        }
        leftover_rows(i_rest, i1, slice, cs, nr);
      });
    }
  }
}

// Rows per tile: 2 vectors x MR accumulators + 2 B vectors + 1 broadcast must fit the register file.
// AVX-512 (32 registers): 8 rows ran at 112-115 GFLOP/s where 4 reached 100-110 (m = 16-64, k = 256-512).
// AVX2 and 16-byte vectors (16 registers): 6 rows use 15.
template <typename T, Isa isa>
FUSEDRNN_ALWAYS_INLINE void gemm_panels_isa_body(int64_t m, int64_t q0, int64_t q1, const T* a, int64_t lda,
                                             const PackedB<T>& b, T beta, T* c, int64_t ldc) {
  constexpr bool kBroadcastA = FUSEDRNN_X86 && isa == Isa::kBaseline;
  gemm_rows_panels<T, kVectorBytes<isa>, isa == Isa::kAvx512 ? 8 : 6, kBroadcastA>(m, q0, q1, a, lda, b, beta, c,
                                                                                    ldc);
}
FUSEDRNN_ISA_LEVELS(gemm_panels_isa, (int64_t m, int64_t q0, int64_t q1, const T* a, int64_t lda,
                                      const PackedB<T>& b, T beta, T* c, int64_t ldc),
                    (m, q0, q1, a, lda, b, beta, c, ldc))

// C[:m, cols of panels q0..q1) = beta*C + A[m, k] @ B; A row stride lda, C row stride ldc. Single-threaded:
// callers inside a team pass their own panel range.
template <typename T>
inline void gemm_panels(int64_t m, int64_t q0, int64_t q1, const T* a, int64_t lda, const PackedB<T>& b, T beta,
                        T* c, int64_t ldc) {
  if (m <= 0 || q1 <= q0) return;
  gemm_panels_isa<T>(m, q0, q1, a, lda, b, beta, c, ldc);
}

// Threads worth using for `macs` multiply-adds: one below 2^18 (~3 us; a fork costs ~5-10 us).
inline int threads_for(int64_t macs) {
  return macs >= (int64_t(1) << 18) ? team_threads() : 1;
}

// C[m, n] = beta*C + A[m, k] @ B, A and C row-major contiguous, split over the team by rows (by panels when
// there are too few rows to give each thread a full tile).
template <typename T>
void gemm_packed(int64_t m, const T* a, const PackedB<T>& b, T beta, T* c) {
  const int64_t n = b.groups * b.group_width;
  if (m == 0 || n == 0) return;
  run_team(threads_for(m * b.k * n), [&](Team team) {
    if (m >= 8 * team.size) {
      auto [i0, i1] = split_range(m / 8, team.id, team.size);  // whole 8-row tiles per thread
      i0 *= 8;
      i1 = team.id + 1 == team.size ? m : i1 * 8;
      gemm_panels<T>(i1 - i0, 0, b.panels(), a + i0 * b.k, b.k, b, beta, c + i0 * n, n);
    } else {
      auto [q0, q1] = split_range(b.panels(), team.id, team.size);
      gemm_panels<T>(m, q0, q1, a, b.k, b, beta, c, n);
    }
  });
}

}  // namespace fusedrnn::cpu
