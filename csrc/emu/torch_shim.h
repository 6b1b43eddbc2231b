// The thin layer under the cuda backend's op code (csrc/cuda/rnn_layer_cuda.cpp, beam_topk_registration.cpp) when
// it is built as the cuda-emu backend: CPU tensors stand for device memory, so the CUDA device guard and stream
// are no-ops, cuBLAS GEMMs are at::mm on views of the same memory (fp32 accumulation, as cuBLAS's
// CUBLAS_COMPUTE_32F), and the runtime's device queries are answered by csrc/emu/emu.cpp as an H100 would.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Device.h>
#include <cuda_runtime.h>
#include <library_types.h>

#include <cstdint>

// Op names and dispatch key: the emulated ops live beside the real ones (both are built in CI).
#define FUSEDRNN_CUDA_OP(name) "cuda_emu_" name
#define FUSEDRNN_CUDA_KEY CPU
#define FUSEDRNN_CUDA_TENSORS "CPU tensors (backend cuda-emu)"

namespace fusedrnn::cuda {
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
inline bool is_kernel_device(const c10::Device& d) { return d.is_cpu(); }
}  // namespace fusedrnn::cuda

#define C10_CUDA_CHECK(expr)                                                                          \
  do {                                                                                                \
    const cudaError_t fusedrnn_err_ = (expr);                                                         \
    TORCH_CHECK(fusedrnn_err_ == cudaSuccess, "fusedrnn cuda-emu: ", cudaGetErrorString(fusedrnn_err_)); \
  } while (0)

namespace c10::cuda {
struct CUDAGuard {  // one emulated device
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct EmulatedStream {
  operator cudaStream_t() const { return nullptr; }
};
inline EmulatedStream getCurrentCUDAStream() { return {}; }
inline c10::DeviceIndex current_device() { return 0; }
}  // namespace c10::cuda

// ---- cuBLAS: the two names rnn_cublas.h declares, on CPU memory ----
struct cublasContext;
typedef struct cublasContext* cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7 } cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_TF32 = 77 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;

namespace at::cuda {
inline cublasHandle_t getCurrentCUDABlasHandle(bool) { return nullptr; }
}  // namespace at::cuda

namespace fusedrnn::emu_shim {
inline bool scalar_of(cudaDataType t, at::ScalarType* out) {
  switch (t) {
    case CUDA_R_32F: *out = at::kFloat; return true;
    case CUDA_R_16F: *out = at::kHalf; return true;
    case CUDA_R_16BF: *out = at::kBFloat16; return true;
    default: return false;
  }
}
// A column-major rows x cols matrix at p with leading dimension ld, as a (strided) CPU tensor.
inline at::Tensor column_major(const void* p, at::ScalarType t, int rows, int cols, int ld) {
  return at::from_blob(const_cast<void*>(p), {rows, cols}, {1, ld}, at::TensorOptions().dtype(t));
}
}  // namespace fusedrnn::emu_shim

// C = alpha op(A) op(B) + beta C, column-major, fp32 alpha/beta/C (the only form rnn_layer_cuda.cpp uses).
// The fp32 compute types both run in fp32 here (TF32 is the GPU's rounding, not emulated for cuBLAS).
inline cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                                   int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                                   cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                                   cublasComputeType_t, cublasGemmAlgo_t) {
  using namespace fusedrnn::emu_shim;
  at::ScalarType ta, tb, tc;
  if (!scalar_of(Atype, &ta) || !scalar_of(Btype, &tb) || !scalar_of(Ctype, &tc) || tc != at::kFloat) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (m <= 0 || n <= 0) return CUBLAS_STATUS_SUCCESS;
  const at::Tensor a = transa == CUBLAS_OP_N ? column_major(A, ta, m, k, lda) : column_major(A, ta, k, m, lda).t();
  const at::Tensor b = transb == CUBLAS_OP_N ? column_major(B, tb, k, n, ldb) : column_major(B, tb, n, k, ldb).t();
  at::Tensor c = column_major(C, at::kFloat, m, n, ldc);
  at::Tensor prod = k > 0 ? at::mm(a.to(at::kFloat), b.to(at::kFloat)) : at::zeros({m, n}, c.options());
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  if (al != 1.f) prod.mul_(al);
  if (be == 0.f) {
    c.copy_(prod);  // beta = 0: C is not read (it may hold NaN garbage)
  } else {
    c.mul_(be).add_(prod);
  }
  return CUBLAS_STATUS_SUCCESS;
}
