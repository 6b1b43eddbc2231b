// Every inline-PTX instruction of the CUDA kernels, as named wrappers, each with its emulated twin beside it
// (FUSEDRNN_EMU: the kernels built as host C++ for the cuda-emu backend, csrc/emu/). Kernels call these, never
// `asm` directly, so one source runs on the GPU and on the CPU. The twins follow the PTX ISA's semantics (fragment
// layouts, rounding, deferred cp.async); bench/emu_conformance.py compares the two bit for bit on a GPU.
// Also here: the launch and dynamic-shared-memory macros (the two other places where CUDA syntax is not C++).
#pragma once

#include <cstdint>

#ifdef FUSEDRNN_EMU
#include "emu/cuda_emu.h"
#endif

namespace fusedrnn::cuda::ptx {

// ---- tensor cores: D = A B + C, fp32 accumulators c[0..3] (PTX ISA "mma.sync ... m16n8k16" / "m16n8k8") ----
// A fragment a0..a3 (row-major 16 x K), B fragment b0, b1 (column-major K x 8), two 16-bit or one tf32 element
// per 32-bit register; the layouts are the ISA's (csrc/emu/mma.h spells them out).
__device__ __forceinline__ void mma_m16n8k16_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
#ifndef FUSEDRNN_EMU
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  ::emu::mma_m16n8k16(::emu::MmaType::F16, c, a0, a1, a2, a3, b0, b1);
#endif
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
#ifndef FUSEDRNN_EMU
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  ::emu::mma_m16n8k16(::emu::MmaType::BF16, c, a0, a1, a2, a3, b0, b1);
#endif
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
#ifndef FUSEDRNN_EMU
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  ::emu::mma_m16n8k8_tf32(c, a0, a1, a2, a3, b0, b1);
#endif
}

// ---- cvt.rna.tf32.f32: round to 10 mantissa bits, ties away from zero; the bits of a tf32 in an fp32 ----
__device__ __forceinline__ uint32_t cvt_rna_tf32(float v) {
  uint32_t r;
#ifndef FUSEDRNN_EMU
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
#else
  r = ::emu::cvt_rna_tf32(v);
#endif
  return r;
}

// ---- ld.acquire.gpu.global.u32: a load no later load or store of this thread moves above ----
// On sm_90 it is LDG.E.STRONG.GPU followed by CCTL.IVALL (the L1 invalidated, so that later L1-cached loads see
// what the releasing thread published): spin with ld_relaxed_gpu and acquire once.
__device__ __forceinline__ unsigned ld_acquire_gpu(const unsigned* p) {
  unsigned v;
#ifndef FUSEDRNN_EMU
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
#else
  v = ::emu::ld_acquire(p);  // and lets the other threads run: callers spin on it
#endif
  return v;
}

// ---- ld.relaxed.gpu.global.u32: a coherent load (from L2, never a stale L1 line) that orders nothing ----
// LDG.E.STRONG.GPU alone: the poll of a spin loop.
__device__ __forceinline__ unsigned ld_relaxed_gpu(const unsigned* p) {
  unsigned v;
#ifndef FUSEDRNN_EMU
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
#else
  v = ::emu::ld_relaxed(p);  // and lets the other threads run: callers spin on it
#endif
  return v;
}

// ---- st.release.gpu.global.u32: a store no earlier load or store of this thread (nor, through a preceding
// bar.sync, of its CTA) moves below; an ld.acquire.gpu that reads it sees all of them ----
// MEMBAR.ALL.GPU + STG.E.STRONG.GPU on sm_90: the fence waits for the stores issued before it, so issue the
// stores nobody waits for after it.
__device__ __forceinline__ void st_release_gpu(unsigned* p, unsigned v) {
#ifndef FUSEDRNN_EMU
  asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
#else
  ::emu::st_release(p, v);
#endif
}

// ---- barrier.cluster.arrive.release.aligned / barrier.cluster.wait.acquire.aligned (sm_90) ----
// The two halves of a cluster barrier, executed by every thread of the cluster (warp-uniformly): arrive
// releases this thread's earlier writes (distributed shared memory included); wait blocks until every thread of
// the cluster has arrived in the current phase and acquires what they released. Work placed between the two
// overlaps the barrier. A thread alternates them: arrive, wait, arrive, ...
__device__ __forceinline__ void cluster_arrive_release() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // no clusters before sm_90 (the planner never launches the cluster kernels there)
#elif !defined(FUSEDRNN_EMU)
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#else
  ::emu::cluster_arrive();
#endif
}

__device__ __forceinline__ void cluster_wait_acquire() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // no clusters before sm_90 (the planner never launches the cluster kernels there)
#elif !defined(FUSEDRNN_EMU)
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  ::emu::cluster_wait();
#endif
}

// ---- cp.async.cg.shared.global (16 bytes, through L2 only) and its completion ----
// The copy may land any time before the wait: the emulator performs it AT the wait, so a read of the
// destination before cp_async_wait_all sees stale data, as it may on the GPU.
__device__ __forceinline__ void cp_async_cg_16(void* smem_dst, const void* gmem_src) {
#ifndef FUSEDRNN_EMU
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  ::emu::cp_async16(smem_dst, gmem_src);
#endif
}

// cp.async.commit_group; cp.async.wait_group 0: every copy this thread issued has landed.
__device__ __forceinline__ void cp_async_wait_all() {
#ifndef FUSEDRNN_EMU
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#else
  ::emu::cp_async_wait_all();
#endif
}

// ---- prefetch.global.L2: a hint (no effect on values; nothing to emulate) ----
__device__ __forceinline__ void prefetch_global_l2(const void* p) {
#ifndef FUSEDRNN_EMU
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
#else
  (void)p;
#endif
}

}  // namespace fusedrnn::cuda::ptx

// ---- launches and dynamic shared memory ----
// FUSEDRNN_LAUNCH(grid, block, smem, stream, kernel)(args...)  is  kernel<<<grid, block, smem, stream>>>(args...)
//   (the kernel last: its template arguments may hold commas)
// FUSEDRNN_DYNAMIC_SMEM(type, name)                            is  extern __shared__ __align__(128) type name[]
// launch_cooperative / launch_cluster: cudaLaunchCooperativeKernel / cudaLaunchKernelEx with typed arguments
// (the emulator must call the kernel, so it needs its signature rather than void** arguments).
#ifndef FUSEDRNN_EMU
#define FUSEDRNN_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define FUSEDRNN_DYNAMIC_SMEM(type, name) extern __shared__ __align__(128) type name[]
namespace fusedrnn::cuda {
template <typename... Params, typename... Args>
cudaError_t launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                               Args&... args) {
  void* ptrs[] = {const_cast<void*>(static_cast<const void*>(&args))...};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid, block, ptrs, smem, stream);
}
template <typename... Params, typename... Args>
cudaError_t launch_cluster(const cudaLaunchConfig_t& cfg, void (*kernel)(Params...), Args&&... args) {
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Args&&>(args)...);
}
}  // namespace fusedrnn::cuda
#else
#define FUSEDRNN_LAUNCH(grid, block, smem, stream, ...) \
  ::emu::launcher(__VA_ARGS__, #__VA_ARGS__, dim3(grid), dim3(block), smem)
#define FUSEDRNN_DYNAMIC_SMEM(type, name) type* name = ::emu::dynamic_smem<type>()
namespace fusedrnn::cuda {
template <typename... Params, typename... Args>
cudaError_t launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                               Args&... args) {
  return ::emu::launch(kernel, "cooperative kernel", grid, block, smem, ::emu::LaunchKind::Cooperative, 1, args...);
}
template <typename... Params, typename... Args>
cudaError_t launch_cluster(const cudaLaunchConfig_t& cfg, void (*kernel)(Params...), Args&&... args) {
  return ::emu::launch_ex(cfg, kernel, "cluster kernel", args...);
}
}  // namespace fusedrnn::cuda
#endif
