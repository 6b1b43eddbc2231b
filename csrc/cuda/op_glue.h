// What every CUDA op registration file (rnn_layer_cuda.cpp, rnn_ext_cuda.cpp, beam_topk_registration.cpp) opens
// with. Each is built twice: for CUDA tensors (FUSEDRNN_WITH_CUDA: ops "cuda_*" on the CUDA dispatch key, c10's
// device guard and stream) and as the cuda-emu backend (FUSEDRNN_EMU: ops "cuda_emu_*" on CPU tensors, the same
// names given by emu/torch_shim.h).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>
#ifdef FUSEDRNN_EMU
#include "emu/torch_shim.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define FUSEDRNN_CUDA_OP(name) "cuda_" name
#define FUSEDRNN_CUDA_KEY CUDA
#define FUSEDRNN_CUDA_TENSORS "CUDA tensors"
namespace fusedrnn::cuda {
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
inline bool is_kernel_device(const c10::Device& d) { return d.is_cuda(); }
}  // namespace fusedrnn::cuda
#endif

#include <cuda_runtime_api.h>
