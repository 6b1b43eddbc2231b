// csrc/cuda/rnn_ext.cu compiled as host C++ for the cuda-emu backend (csrc/emu/cuda_emu.h).
#include "emu/cuda_emu.h"
#include "cuda/rnn_ext.cu"
