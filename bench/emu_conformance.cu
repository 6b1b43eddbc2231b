// Conformance of the CUDA emulator (csrc/emu) with the hardware: every PTX wrapper of csrc/cuda/ptx.cuh and every
// warp collective / cluster operation the kernels use, on fixed inputs, through a C entry point per check. Built
// twice by bench/emu_conformance.py: with nvcc for the GPU, and as host C++ with the emulator; the script compares
// the two outputs bit for bit where the hardware is exact.
//
//   int conf_<name>(const uint32_t* in, uint32_t* out)   host pointers, kIn / kOut words; returns a cudaError_t
#include "cuda/ptx.cuh"

#include <cooperative_groups.h>  // the emulated build finds csrc/emu/include's
#include <cuda_runtime.h>

#include <cstdint>

namespace cg = cooperative_groups;
using namespace fusedrnn::cuda;

constexpr int kIn = 8192, kOut = 8192;  // words

// ---- mma.sync: each lane passes its 6 operand registers (in[lane*6..]) and c (in[192 + lane*4..]) ----
template <int kKind>  // 0 f16 m16n8k16, 1 bf16 m16n8k16, 2 tf32 m16n8k8
__global__ void mma_kernel(const uint32_t* in, uint32_t* out) {
  const int lane = threadIdx.x;
  const uint32_t* r = in + lane * 6;
  float c[4];
  for (int i = 0; i < 4; ++i) c[i] = __uint_as_float(in[192 + lane * 4 + i]);
  if (kKind == 0) ptx::mma_m16n8k16_f16(c, r[0], r[1], r[2], r[3], r[4], r[5]);
  if (kKind == 1) ptx::mma_m16n8k16_bf16(c, r[0], r[1], r[2], r[3], r[4], r[5]);
  if (kKind == 2) ptx::mma_m16n8k8_tf32(c, r[0], r[1], r[2], r[3], r[4], r[5]);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = __float_as_uint(c[i]);
}

// ---- cvt.rna.tf32.f32 on 4096 values ----
__global__ void cvt_kernel(const uint32_t* in, uint32_t* out) {
  for (int i = threadIdx.x; i < 4096; i += blockDim.x) out[i] = ptx::cvt_rna_tf32(__uint_as_float(in[i]));
}

// ---- ld.acquire.gpu, cp.async (+ its wait) through shared memory, prefetch ----
__global__ void memory_kernel(const uint32_t* in, uint32_t* out) {
  FUSEDRNN_DYNAMIC_SMEM(uint32_t, s);
  for (int i = threadIdx.x; i < 1024 / 4; i += blockDim.x) {
    ptx::prefetch_global_l2(in + i * 4);
    ptx::cp_async_cg_16(s + i * 4, in + i * 4);
  }
  ptx::cp_async_wait_all();
  __syncthreads();
  for (int i = threadIdx.x; i < 1024; i += blockDim.x) out[i] = s[1023 - i] ^ ptx::ld_acquire_gpu(&in[i]);
}

// ---- warp collectives: 32 lanes, values in[lane], in[32 + lane] ----
__global__ void warp_kernel(const uint32_t* in, uint32_t* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t v = in[warp * 32 + lane];
  const uint64_t w = (static_cast<uint64_t>(v) << 32) | in[64 + lane];
  uint32_t* o = out + warp * 32 * 8 + lane * 8;
  o[0] = __shfl_sync(0xffffffffu, v, static_cast<int>(in[128 + warp] % 32));
  o[1] = __shfl_xor_sync(0xffffffffu, v, 5);
  const uint64_t up = __shfl_up_sync(0xffffffffu, w, 3);
  o[2] = static_cast<uint32_t>(up);
  o[3] = static_cast<uint32_t>(up >> 32);
  o[4] = __ballot_sync(0xffffffffu, v & 1);
  o[5] = __any_sync(0xffffffffu, v == 0x12345678u);
  o[6] = static_cast<uint32_t>(__reduce_add_sync(0xffffffffu, static_cast<int>(v & 0xffff)));
  o[7] = __float_as_uint(__shfl_xor_sync(0xffffffffu, __uint_as_float(v & 0x3fffffffu), 17));
}

// ---- clusters (sm_90): each CTA writes into its right neighbour's shared memory, then cluster.sync ----
__global__ void cluster_kernel(const uint32_t* in, uint32_t* out) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  FUSEDRNN_DYNAMIC_SMEM(uint32_t, s);
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), n = cluster.num_blocks();
  for (int i = threadIdx.x; i < 256; i += blockDim.x) s[i] = 0;
  cluster.sync();
  uint32_t* right = cluster.map_shared_rank(s, (rank + 1) % n);
  for (int i = threadIdx.x; i < 256; i += blockDim.x) right[i] = in[rank * 256 + i] + rank;
  cluster.sync();
  for (int i = threadIdx.x; i < 256; i += blockDim.x) out[blockIdx.x * 256 + i] = s[i];
  cluster.sync();  // no CTA exits while another may still write into its shared memory
#endif
}

namespace {
template <typename Launch>
int with_buffers(const uint32_t* in, uint32_t* out, Launch launch) {
  uint32_t *din = nullptr, *dout = nullptr;
  cudaError_t err = cudaMalloc(reinterpret_cast<void**>(&din), kIn * 4);
  if (err == cudaSuccess) err = cudaMalloc(reinterpret_cast<void**>(&dout), kOut * 4);
  if (err == cudaSuccess) err = cudaMemcpy(din, in, kIn * 4, cudaMemcpyHostToDevice);
  if (err == cudaSuccess) err = cudaMemset(dout, 0, kOut * 4);
  if (err == cudaSuccess) err = launch(din, dout);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err == cudaSuccess) err = cudaMemcpy(out, dout, kOut * 4, cudaMemcpyDeviceToHost);
  cudaFree(din);
  cudaFree(dout);
  return static_cast<int>(err);
}
}  // namespace

extern "C" {
int conf_mma_f16(const uint32_t* in, uint32_t* out) {
  return with_buffers(in, out, [](const uint32_t* i, uint32_t* o) {
    FUSEDRNN_LAUNCH(1, 32, 0, nullptr, mma_kernel<0>)(i, o);
    return cudaSuccess;
  });
}
int conf_mma_bf16(const uint32_t* in, uint32_t* out) {
  return with_buffers(in, out, [](const uint32_t* i, uint32_t* o) {
    FUSEDRNN_LAUNCH(1, 32, 0, nullptr, mma_kernel<1>)(i, o);
    return cudaSuccess;
  });
}
int conf_mma_tf32(const uint32_t* in, uint32_t* out) {
  return with_buffers(in, out, [](const uint32_t* i, uint32_t* o) {
    FUSEDRNN_LAUNCH(1, 32, 0, nullptr, mma_kernel<2>)(i, o);
    return cudaSuccess;
  });
}
int conf_cvt_tf32(const uint32_t* in, uint32_t* out) {
  return with_buffers(in, out, [](const uint32_t* i, uint32_t* o) {
    FUSEDRNN_LAUNCH(1, 256, 0, nullptr, cvt_kernel)(i, o);
    return cudaSuccess;
  });
}
int conf_memory(const uint32_t* in, uint32_t* out) {
  return with_buffers(in, out, [](const uint32_t* i, uint32_t* o) {
    FUSEDRNN_LAUNCH(1, 128, 4096, nullptr, memory_kernel)(i, o);
    return cudaSuccess;
  });
}
int conf_warp(const uint32_t* in, uint32_t* out) {
  return with_buffers(in, out, [](const uint32_t* i, uint32_t* o) {
    FUSEDRNN_LAUNCH(1, 64, 0, nullptr, warp_kernel)(i, o);
    return cudaSuccess;
  });
}
int conf_cluster(const uint32_t* in, uint32_t* out) {
  return with_buffers(in, out, [](const uint32_t* i, uint32_t* o) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(8);
    cfg.blockDim = dim3(128);
    cfg.dynamicSmemBytes = 1024;
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = 4;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    return launch_cluster(cfg, cluster_kernel, i, o);
  });
}
}
