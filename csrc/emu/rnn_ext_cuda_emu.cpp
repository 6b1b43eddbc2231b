// fusedrnn::cuda_emu_ext_forward_rows / cuda_emu_ext_backward_rows: the op glue of the rnn_layer_ext row kernels
// (csrc/cuda/rnn_ext_cuda.cpp) on CPU tensors, the kernels emulated (csrc/emu/rnn_ext_emu.cpp).
#include "cuda/rnn_ext_cuda.cpp"
