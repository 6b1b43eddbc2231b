// Row-major GEMM for the per-step recurrence of the CPU kernels, straight into BLAS.
//
// Why not at::mm_out: a per-step GEMM at B=1, H=256 takes ~10 us, and going through the ATen dispatcher
// (output checks, resize, TensorIterator-free but still ~3-5 us of overhead) would add a third to it. torch's
// CPU builds export the Fortran BLAS symbols sgemm_/dgemm_ (MKL on x86-64); they are declared weak here so
// the extension still loads on a build without them, and then the ATen path is used instead.
#pragma once

#include <ATen/ATen.h>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace fusedrnn::cpu {

// C[m, n] = beta * C + A[m, k] @ op(B), all row-major and contiguous, op(B) = B^T when B is [n, k]
// (b_transposed) or B when B is [k, n].
template <typename T>
inline void gemm_rowmajor(int64_t m, int64_t n, int64_t k, const T* a, const T* b, bool b_transposed, T beta,
                          T* c) {
  if (m == 0 || n == 0) return;
  // Row-major C = A op(B)  <=>  column-major C^T = op(B)^T A^T: BLAS sees B first.
  const char tb = b_transposed ? 'T' : 'N';
  const char ta = 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int ldb = static_cast<int>(b_transposed ? k : n), lda = static_cast<int>(k), ldc = static_cast<int>(n);
  const T one = T(1);
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&tb, &ta, &M, &N, &K, &one, b, &ldb, a, &lda, &beta, c, &ldc);
      return;
    }
  } else if constexpr (std::is_same_v<T, double>) {
    if (dgemm_ != nullptr) {
      dgemm_(&tb, &ta, &M, &N, &K, &one, b, &ldb, a, &lda, &beta, c, &ldc);
      return;
    }
  }
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto A = at::from_blob(const_cast<T*>(a), {m, k}, opts);
  auto B = b_transposed ? at::from_blob(const_cast<T*>(b), {n, k}, opts).t()
                        : at::from_blob(const_cast<T*>(b), {k, n}, opts);
  auto C = at::from_blob(c, {m, n}, opts);
  if (beta == T(0)) {
    at::mm_out(C, A, B);
  } else {
    C.mul_(beta).addmm_(A, B);
  }
}

}  // namespace fusedrnn::cpu
