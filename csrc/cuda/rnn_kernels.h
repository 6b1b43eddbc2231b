// Backend "cuda": the plain C++ interface between the kernels (rnn_*.cu, compiled by nvcc without torch
// headers) and their registration (rnn_layer_cuda.cpp). Raw pointers, sizes, a dtype tag, a cudaStream_t.
//
// Two paths run one layer, one direction:
//   alternating  per step one cuBLAS GEMM for the recurrent term (issued by rnn_layer_cuda.cpp) and ONE fused
//                pointwise kernel (rnn_pointwise.cu): biases, cell math (cell_math.h), state update, length
//                masking, y and workspace writes.
//   persistent   one launch for all T steps (rnn_persistent.cu): each CTA keeps its slice of W_hh in shared
//                memory and multiplies it on tensor cores (mma.sync); h (forward) or the gate gradients
//                (backward) are exchanged every step, either through global memory and per-CTA step flags
//                (exchange "grid", cooperative launch) or through distributed shared memory and a split cluster
//                barrier (exchange "cluster", sm_90).
// Inputs x_gates = x W_ih^T + b_ih + b_hh are precomputed by one GEMM, except GRU's b_hn, which the kernels add
// to W_hn h (it sits inside the reset product).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace fusedrnn::cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline int dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

// ---------------------------------------------------------------------------------------------------
// Alternating path: one pointwise kernel per step. Shapes per call: [B, H] elements (proj kernels [B, H_out]).
// Row-major, contiguous. `T*` arguments are of the layer dtype, `float*` are fp32 scratch.
// ---------------------------------------------------------------------------------------------------
struct AltForwardStep {
  int cell, B, H, H_out, t;
  const int64_t* lengths;  // [B] or null
  const void* x_gates;     // [T, B, G*H]  x W_ih^T + biases (b_hn excluded)
  const float* h_gates;    // [B, G*H]     W_hh h_{t-1}
  const void* b_hn;        // GRU: b_hh + 2H, or null
  float* h_state;          // [B, H_out]   fp32 state (no projection: updated here)
  void* h_gemm;            // [B, H_out]   dtype copy of the state for the next GEMM; null for fp32
  float* c_state;          // [B, H]       LSTM
  void* y;                 // [T, B, H_out] (with a projection written by the proj kernel)
  void* ws;                // [T, B, W] or null
  void* r_out;             // LSTM projection: r = o * tanh(c) [B, H], dtype, input of the projection GEMM
};

struct AltProjForwardStep {  // after h_proj = r W_hr^T: mask, update the state, write y
  int B, H_out, t;
  const int64_t* lengths;
  const float* h_proj;  // [B, H_out]
  float* h_state;
  void* h_gemm;
  void* y;
};

struct AltBackwardStep {
  int cell, B, H, H_out, T, t, reverse;
  const int64_t* lengths;
  const void* ws;          // [T, B, W]
  const void* y;           // [T, B, H_out]
  const void* h_prev;      // GRU: [T, B, H] state each step started from
  const void* c0;          // LSTM: [B, H]
  const void* grad_y;      // [T, B, H_out]
  const float* grad_h;     // [B, H_out] dL/dh_t carried from step t+1 (no projection)
  const float* grad_r;     // with a projection: dL/dr_t [B, H] (GEMM of grad_out with W_hr), else null
  float* grad_c;           // LSTM [B, H], carried and updated
  float* grad_h_next;      // [B, H_out]: the direct part of dL/dh_{t-1}; the GEMM adds grad_hg W_hh to it
                           // (with a projection the proj kernel initialises it)
  void* grad_xg;           // [T, B, G*H] gradients of the x-side pre-activations
  void* grad_hg;           // GRU: [T, B, G*H] gradients of the h-side ones (r, z, W_hn h + b_hn); else = grad_xg
};

struct AltProjBackwardStep {  // grad_out = dL/dh_t for valid rows; grad_h_next = carried rows
  int B, H_out, t;
  const int64_t* lengths;
  const void* grad_y;
  const float* grad_h;
  void* grad_out;     // [T, B, H_out] dtype, row t written (input of the W_hr GEMMs)
  float* grad_h_next;
};

cudaError_t launch_alt_forward_step(DType dt, const AltForwardStep& p, cudaStream_t stream);
cudaError_t launch_alt_proj_forward_step(DType dt, const AltProjForwardStep& p, cudaStream_t stream);
cudaError_t launch_alt_backward_step(DType dt, const AltBackwardStep& p, cudaStream_t stream);
cudaError_t launch_alt_proj_backward_step(DType dt, const AltProjBackwardStep& p, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------
// Persistent path: planning (pure host arithmetic, testable without a GPU) and launch.
// ---------------------------------------------------------------------------------------------------
enum class Exchange : int { Grid = 0, Cluster = 1 };

struct DeviceLimits {
  int sm_count;        // multiprocessors
  int smem_per_block;  // opt-in shared memory per block, bytes (227 KB on H100, 163 KB on A100)
  int cc_major;
};

constexpr int kPersistentThreads = 256;  // 8 warps per CTA, one CTA per SM
// State items (batch row, hidden unit) one thread keeps in registers for all T steps: a CTA holds at most
// kPersistentSlots * kPersistentThreads of them (its batch rows x its units), a limit of the plan.
constexpr int kPersistentSlots = 4;

// How one call is laid out on the GPU. Forward: each CTA owns `units` hidden units, i.e. G*units rows of W_hh
// (its A operand, M = gate rows, K = H); backward: the same units as columns of W_hh, i.e. W_hh[:, units]^T
// (M = units, K = G*H). N = batch: `groups` independent groups of `group_rows` rows (the last one partial), each
// run by `ctas` CTAs that exchange only among themselves, in chunks of `chunk` rows. The grid is groups x ctas.
struct PersistentPlan {
  int ctas = 0;           // CTAs sharing one recurrence (one group of the grid, or one cluster)
  int groups = 0;         // independent batch groups (clusters, or sets of CTAs with their own flags)
  int group_rows = 0;     // batch rows per group (cluster: = chunk)
  int units = 0;          // hidden units per CTA
  int hidden_padded = 0;  // ctas * units: gate stride of the backward exchange
  int m_tiles = 0;        // 16-row MMA tiles of A per CTA
  int warps_m = 0, warps_k = 0;  // 8 warps = warps_m (over m-tiles) x warps_k (split K, reduced in smem)
  int k_padded = 0;       // K rounded up to 32 (zero-filled)
  int chunk = 0;          // batch rows per chunk: multiple of 8, <= 32
  int a_stride = 0, b_stride = 0;  // shared-memory row strides, bytes
  int smem_a = 0, smem_b = 0, smem_red = 0, smem_stage = 0, smem_park = 0, smem_bytes = 0;
};

// Empty string when the persistent kernel with this exchange can take the call on a device with these limits,
// else why not. `backward`: plan the backward kernel. Pure arithmetic: no occupancy (see below).
std::string plan_persistent(Exchange ex, bool backward, int cell, DType dt, int B, int H, const DeviceLimits& lim,
                            PersistentPlan* plan);

// plan_persistent for device `device` (the current device), and whether the planned grid is co-resident there
// next to its register and shared-memory use (cudaOccupancyMaxActiveBlocksPerMultiprocessor x SMs >= every CTA of
// the grid exchange; cudaOccupancyMaxActiveClusters >= every cluster). Memoised per (device, call shape); the
// first call for a kernel on a device sets its attributes (dynamic shared memory up to the device's limit, 16-CTA
// clusters), once: launch only plans returned from here.
std::string plan_persistent_for_device(Exchange ex, bool backward, int cell, DType dt, int B, int H, int device,
                                       PersistentPlan* plan);

struct PersistentForward {
  int cell, T, B, H, reverse;
  const int64_t* lengths;
  const void* x_gates;   // [T, B, G*H]
  const void* w_hh;      // [G*H, H]
  const void* b_hn;      // GRU: b_hh + 2H, or null
  const float* h_state;  // [B, H] fp32 h0 (read once: the state lives in registers)
  const float* c_state;  // [B, H] fp32 c0 (LSTM)
  void* y;               // [T, B, H]
  void* ws;              // [T, B, W] or null
  void* h_n;             // [B, H]
  void* c_n;             // [B, H] (LSTM)
  void* exchange;        // grid: [2, B, k_padded] dtype, zeroed; cluster: unused
  unsigned* flags;       // grid: [groups * ctas] per-CTA step flags, zeroed; cluster: unused
};

struct PersistentBackward {
  int cell, T, B, H, reverse;
  const int64_t* lengths;
  const void* w_hh;      // [G*H, H]
  const void* ws;        // [T, B, W]
  const void* y;         // [T, B, H]
  const void* h_prev;    // GRU: [T, B, H]
  const void* c0;        // LSTM: [B, H]
  const void* grad_y;    // [T, B, H]
  const float* grad_h;   // [B, H] fp32 grad_h_n (read once: the running gradients live in registers)
  const float* grad_c;   // [B, H] fp32 grad_c_n (LSTM)
  void* grad_xg;         // [T, B, G*H]
  void* grad_hg;         // GRU: [T, B, G*H]; else null (= grad_xg)
  void* grad_h0;         // [B, H]
  void* grad_c0;         // [B, H] (LSTM)
  void* exchange;        // grid: [2, B, k_padded] dtype, zeroed; cluster: unused
  unsigned* flags;       // grid: [groups * ctas] per-CTA step flags, zeroed; cluster: unused
};

cudaError_t launch_persistent_forward(Exchange ex, DType dt, const PersistentPlan& plan, const PersistentForward& p,
                                      cudaStream_t stream);
cudaError_t launch_persistent_backward(Exchange ex, DType dt, const PersistentPlan& plan,
                                       const PersistentBackward& p, cudaStream_t stream);

}  // namespace fusedrnn::cuda
