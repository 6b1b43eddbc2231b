// fusedrnn::cuda_emu_beam_topk: the CUDA beam_topk kernels (emulated) on CPU tensors.
#include "cuda/beam_topk_registration.cpp"
