// Small GEMM for the per-step recurrence of the CPU kernels:  C[m, n] = beta*C + A[m, k] @ B[k, n], with B
// packed once per layer call (the recurrent weights do not change across the T steps).
//
// Why not BLAS: a recurrent step is a skinny product (m = batch, often 1-16) called T times in a row. On the
// project's 2-core AMD EPYC, torch's MKL runs its generic ("def") kernels: [16x256]@[256x1024] takes ~130 us
// single-threaded, and milliseconds once its OpenMP team waits on a busy core. Here B is packed into column
// panels of NR contiguous values per row (so the k-loop streams memory instead of striding 4 KB, which
// aliases L1 sets), an MR x NR tile of C stays in vector registers, and the kernel is compiled for AVX-512,
// AVX2 and a generic target (GCC target_clones picks one at load time).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define FUSEDRNN_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FUSEDRNN_MULTIVERSION
#endif
// Callees of a multiversioned function must be inlined into it to get its instruction set.
#if defined(__GNUC__)
#define FUSEDRNN_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define FUSEDRNN_ALWAYS_INLINE inline
#endif

namespace fusedrnn::cpu {

// Panel width: two 64-byte vectors (32 fp32 / 16 fp64 columns).
template <typename T>
constexpr int64_t kPanel = 128 / static_cast<int64_t>(sizeof(T));

// B[k, n] with B[p][j] = src[p * stride_p + j * stride_j], packed as ceil(n / NR) panels [k, NR] (zero-padded).
template <typename T>
struct PackedB {
  int64_t k = 0, n = 0;
  int64_t ld = kPanel<T>;  // panel row stride
  at::Tensor storage;
  const T* data() const { return storage.data_ptr<T>(); }
};

template <typename T>
PackedB<T> pack_b(const T* src, int64_t k, int64_t n, int64_t stride_p, int64_t stride_j) {
  constexpr int64_t NR = kPanel<T>;
  const int64_t panels = (n + NR - 1) / NR;
  PackedB<T> packed;
  packed.k = k;
  packed.n = n;
  packed.storage = at::zeros({panels * k * NR}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* out = packed.storage.template data_ptr<T>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t j0 = panel * NR, width = std::min(NR, n - j0);
      for (int64_t p = 0; p < k; ++p) {
        T* row = out + (panel * k + p) * NR;
        for (int64_t jj = 0; jj < width; ++jj) row[jj] = src[p * stride_p + (j0 + jj) * stride_j];
      }
    }
  });
  return packed;
}

// GCC vector extensions: one 64-byte vector (zmm with AVX-512, 2 ymm with AVX2, 4 xmm otherwise). Written
// with explicit vectors because GCC's auto-vectorizer turned the plain-array version of this loop into
// shuffles at 4.7 GFLOP/s; this form runs at ~70 GFLOP/s ([16x256]@[256x1024], one Zen 4 core, AVX-512).
template <typename T>
struct Vec64;
template <>
struct Vec64<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec64<double> {
  typedef double type __attribute__((vector_size(64)));
};

// One MR x NR tile of C over the full k (NR = two vectors): panel is [k, NR], row stride ld_panel.
template <typename T, int MR>
FUSEDRNN_ALWAYS_INLINE void gemm_tile(int64_t k, const T* a, int64_t lda, const T* panel, int64_t ld_panel, T beta,
                                      T* c, int64_t ldc, int64_t nr) {
  using V = typename Vec64<T>::type;
  constexpr int W = 64 / static_cast<int>(sizeof(T));
  V acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = V{};
  for (int64_t p = 0; p < k; ++p) {
    V b0, b1;
    __builtin_memcpy(&b0, panel + p * ld_panel, sizeof(V));
    __builtin_memcpy(&b1, panel + p * ld_panel + W, sizeof(V));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T av = a[r * lda + p];
      acc[r][0] += av * b0;
      acc[r][1] += av * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    T out[2 * W];
    __builtin_memcpy(out, &acc[r][0], sizeof(V));
    __builtin_memcpy(out + W, &acc[r][1], sizeof(V));
    T* crow = c + r * ldc;
    if (beta == T(0)) {
      for (int64_t j = 0; j < nr; ++j) crow[j] = out[j];
    } else {
      for (int64_t j = 0; j < nr; ++j) crow[j] = beta * crow[j] + out[j];
    }
  }
}

template <typename T>
FUSEDRNN_MULTIVERSION void gemm_panels(int64_t m, int64_t panel_begin, int64_t panel_end, const T* a,
                                       const PackedB<T>& b, T beta, T* c) {
  constexpr int NR = static_cast<int>(kPanel<T>);
  const int64_t k = b.k, n = b.n;
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    const T* pb = b.data() + panel * k * NR;
    const int64_t j = panel * NR, nr = std::min<int64_t>(NR, n - j);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) gemm_tile<T, 4>(k, a + i * k, k, pb, b.ld, beta, c + i * n + j, n, nr);
    for (; i < m; ++i) gemm_tile<T, 1>(k, a + i * k, k, pb, b.ld, beta, c + i * n + j, n, nr);
  }
}

// C[m, n] = beta*C + A[m, k] @ B, A and C row-major contiguous.
template <typename T>
inline void gemm_packed(int64_t m, const T* a, const PackedB<T>& b, T beta, T* c) {
  if (m == 0 || b.n == 0) return;
  constexpr int64_t NR = kPanel<T>;
  const int64_t panels = (b.n + NR - 1) / NR;
  // Split panels across threads only when each gets >= 2^18 multiply-adds (~10 us): waking the OpenMP team
  // costs ~5-10 us, and far more when the other core is busy.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(m * b.k * NR, 1));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    gemm_panels<T>(m, begin, end, a, b, beta, c);
  });
}


}  // namespace fusedrnn::cpu
