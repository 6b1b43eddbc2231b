// The cuda backend's op layer (csrc/cuda/rnn_layer_cuda.cpp) as the cuda-emu backend: ops fusedrnn::cuda_emu_*
// on CPU tensors, through csrc/emu/torch_shim.h.
#include "cuda/rnn_layer_cuda.cpp"
