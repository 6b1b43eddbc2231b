// The two cuBLAS entry points of the alternating path, declared here instead of included.
//
// Why: pip's CUDA 13 wheels (nvidia-cublas) install cublas_v2.h under site-packages/nvidia/cu13/include, which the
// extension build (torch.utils.cpp_extension with CUDA_HOME=/usr/local/cuda, a toolkit without cuBLAS) does not
// put on the include path; ATen/cuda/CUDAContext.h, which declares ATen's handle, needs cublas_v2.h and
// cusparse.h from there too. The declarations below copy cuBLAS's C API (cublas_api.h, stable across cuBLAS 11-13);
// the symbols resolve at load time through libtorch_cuda, which links libcublas.so.13. Only this header's users
// (rnn_layer_cuda.cpp) see them; with cublas_v2.h on the include path it could replace this file.
#pragma once

#include <library_types.h>  // cudaDataType (CUDA runtime headers)

extern "C" {
struct cublasContext;
typedef struct cublasContext* cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_TF32 = 77 } cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo);
}

namespace at::cuda {
// ATen's cuBLAS handle of the current device, bound to the current stream, with ATen's workspace (setup=true).
cublasHandle_t getCurrentCUDABlasHandle(bool setup);
}  // namespace at::cuda
