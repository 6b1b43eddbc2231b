// Small row-major GEMM for the per-step recurrence of the CPU kernels:  C[m, n] = beta*C + A[m, k] @ B[k, n].
//
// Why not BLAS: a recurrent step is a skinny product (m = batch, often 1-16) called T times in a row. On
// the project's 2-core AMD EPYC, MKL's sgemm takes 60 us for [8x128]@[128x512] single-threaded (17 GFLOP/s)
// and milliseconds once its OpenMP team waits on a busy core; this register-blocked kernel streams B once
// per call, keeps an MR x NR tile of C in vector registers, and is compiled for AVX-512, AVX2 and a generic
// target (GCC target_clones picks one at load time). Large products (m > kSmallM) still go to at::mm.
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

constexpr int64_t kSmallM = 64;  // above this, MKL/oneDNN through at::mm is as fast and scales better

// C tile [MR x NR] at (i0, j0) over the full k. NR is a compile-time width so the accumulators are registers.
template <typename T, int MR, int NR>
FUSEDRNN_ALWAYS_INLINE void gemm_tile(int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc,
                      int64_t nr) {
  T acc[MR][NR] = {};
  for (int64_t p = 0; p < k; ++p) {
    const T* brow = b + p * ldb;
    T bv[NR];
    if (nr == NR) {
#pragma GCC unroll 64
      for (int j = 0; j < NR; ++j) bv[j] = brow[j];
    } else {
      for (int j = 0; j < NR; ++j) bv[j] = j < nr ? brow[j] : T(0);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T av = a[r * lda + p];
#pragma GCC unroll 64
      for (int j = 0; j < NR; ++j) acc[r][j] += av * bv[j];
    }
  }
  for (int r = 0; r < MR; ++r) {
    T* crow = c + r * ldc;
    for (int64_t j = 0; j < nr; ++j) crow[j] = (beta == T(0) ? T(0) : beta * crow[j]) + acc[r][j];
  }
}

template <typename T>
FUSEDRNN_MULTIVERSION void gemm_columns(int64_t m, int64_t j_begin, int64_t j_end, int64_t k, const T* a,
                                        const T* b, int64_t n, T beta, T* c) {
  constexpr int NR = 64 / static_cast<int>(sizeof(T)) * 2;  // two 64-byte vectors per row: 32 fp32, 16 fp64
  for (int64_t j = j_begin; j < j_end; j += NR) {
    const int64_t nr = std::min<int64_t>(NR, j_end - j);
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) gemm_tile<T, 4, NR>(k, a + i * k, k, b + j, n, beta, c + i * n + j, n, nr);
    for (; i < m; ++i) gemm_tile<T, 1, NR>(k, a + i * k, k, b + j, n, beta, c + i * n + j, n, nr);
  }
}

// C[m, n] = beta*C + A[m, k] @ B[k, n], all row-major and contiguous.
template <typename T>
inline void gemm_rowmajor(int64_t m, int64_t n, int64_t k, const T* a, const T* b, T beta, T* c) {
  if (m == 0 || n == 0) return;
  if (m > kSmallM) {
    auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    auto A = at::from_blob(const_cast<T*>(a), {m, k}, opts);
    auto B = at::from_blob(const_cast<T*>(b), {k, n}, opts);
    auto C = at::from_blob(c, {m, n}, opts);
    if (beta == T(0)) {
      at::mm_out(C, A, B);
    } else {
      C.mul_(beta).addmm_(A, B);
    }
    return;
  }
  // Split columns across threads only when each gets >= 2^18 multiply-adds (~20 us): waking the OpenMP
  // team costs ~5-10 us, and far more when the other core is busy.
  constexpr int64_t kColumnBlock = 64;
  const int64_t work_per_block = m * k * kColumnBlock;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(work_per_block, 1));
  const int64_t blocks = (n + kColumnBlock - 1) / kColumnBlock;
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    gemm_columns<T>(m, begin * kColumnBlock, std::min(n, end * kColumnBlock), k, a, b, n, beta, c);
  });
}

}  // namespace fusedrnn::cpu
