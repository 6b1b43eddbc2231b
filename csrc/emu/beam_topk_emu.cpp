// csrc/cuda/beam_topk.cu compiled as host C++ for the cuda-emu backend (csrc/emu/cuda_emu.h).
#include "emu/cuda_emu.h"
#include "cuda/beam_topk.cu"
