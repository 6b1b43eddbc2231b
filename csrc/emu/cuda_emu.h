// The CUDA execution model on the CPU: what a kernel source (csrc/cuda/*.cu) needs to compile and run as host
// C++ (g++ -DFUSEDRNN_EMU, the cuda-emu backend and tests/emu/). Included before the kernel source; the runtime
// behind it is csrc/emu/emu.cpp.
//
// Model. A launch runs every CTA at once on its own OS thread (so all CTAs are co-resident: grid barriers and
// clusters work; a cooperative or cluster launch guarantees nothing more). Inside a CTA every CUDA thread is a
// fiber (Boost.Context, or ucontext without boost), run round-robin by the CTA's scheduler and switched ONLY at
// synchronisation points: __syncthreads, warp collectives, mma.sync, cluster barriers, spins on ld.acquire / ld.relaxed.
// Between two such points a thread runs alone, so every data race the GPU could show is a missing
// happens-before edge that ThreadSanitizer sees (fibers are TSan fibers, synchronisation is annotated).
//   shared memory   dynamic: one buffer per CTA (FUSEDRNN_DYNAMIC_SMEM); static __shared__: thread_local,
//                   i.e. per CTA (one OS thread each)
//   warp            collectives (shfl, ballot, any, reduce_add, syncwarp, mma.sync) are one rendezvous of the
//                   warp's 32 fibers: the last to arrive computes every lane's result (full masks only: every
//                   collective of these kernels is warp-uniform with mask 0xffffffff)
//   deadlock        a CTA whose live threads all wait on each other is reported at once; anything else that
//                   makes no progress for FUSEDRNN_EMU_WATCHDOG_S seconds (default 60) is cancelled: the launch
//                   returns an error naming where each thread waits, never a hung process
#pragma once

#include <cuda_bf16.h>  // host implementations of __half / __nv_bfloat16 and their conversions
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // host-compilable: dim3, vector types, cudaError_t, launch configs

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

// ---------------------------------------------------------------------------------------------------
// CUDA keywords that host C++ does not have
// ---------------------------------------------------------------------------------------------------
#undef __shared__
#define __shared__ static thread_local  // static shared memory: per CTA, each CTA being one OS thread
#undef __launch_bounds__
#define __launch_bounds__(...)
#define __trap() ::emu::trap(__FILE__, __LINE__)

namespace emu {

enum class LaunchKind { Plain, Cooperative, Cluster };
enum class MmaType { F16, BF16 };


using KernelBody = void (*)(void* closure);
// Runs `body(closure)` as every thread of a grid; returns cudaSuccess or the error (message: error_message()).
cudaError_t run_grid(KernelBody body, void* closure, const char* name, dim3 grid, dim3 block, size_t smem,
                     LaunchKind kind, int cluster);
const char* error_message(cudaError_t err);
void record_launch_error(cudaError_t err);  // what cudaGetLastError returns next
[[noreturn]] void trap(const char* file, int line);

// ---- device side: called from kernel code on a fiber ----
unsigned char* dynamic_smem_base();
template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(dynamic_smem_base());
}
void syncthreads();
void syncwarp();
// One warp rendezvous: each lane deposits `in` (up to 64 bytes); the last lane to arrive runs
// combine(ins[32], outs[32], ctx) once; each lane gets outs[lane]. Lanes of a partial warp: only those present.
using WarpCombine = void (*)(const unsigned char (*ins)[64], unsigned char (*outs)[64], int lanes, const void* ctx);
void warp_collective(const void* in, size_t in_bytes, void* out, size_t out_bytes, WarpCombine combine,
                     const void* ctx);
int lane_id();
void yield_spin();  // a thread spinning on memory written by another CTA lets the others run
void cluster_sync();     // cooperative_groups' cluster.sync(): cluster_arrive(); cluster_wait()
void cluster_arrive();   // barrier.cluster.arrive.release
void cluster_wait();     // barrier.cluster.wait.acquire
unsigned cluster_rank();
unsigned cluster_size();
unsigned char* map_shared_rank(const void* local, unsigned rank);
void note_progress();

// PTX twins (csrc/cuda/ptx.cuh)
void mma_m16n8k16(MmaType type, float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                  uint32_t b1);
void mma_m16n8k8_tf32(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1);
uint32_t cvt_rna_tf32(float v);
void cp_async16(void* dst, const void* src);
void cp_async_wait_all();
unsigned ld_acquire(const unsigned* p);
unsigned ld_relaxed(const unsigned* p);
void st_release(unsigned* p, unsigned v);

// ---- launches with typed arguments ----
template <typename... Params>
struct Closure {
  void (*kernel)(Params...);
  void* args;  // std::tuple<Params...>*
};
template <typename Tuple, typename... Params, size_t... I>
void call_with(void (*kernel)(Params...), Tuple& t, std::index_sequence<I...>) {
  kernel(std::get<I>(t)...);
}
template <typename... Params>
void trampoline(void* closure) {
  auto* c = static_cast<Closure<Params...>*>(closure);
  auto& args = *static_cast<std::tuple<Params...>*>(c->args);
  std::tuple<Params...> copy = args;  // each thread gets its own copy of the parameters, like a kernel's
  call_with(c->kernel, copy, std::index_sequence_for<Params...>{});
}
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), const char* name, dim3 grid, dim3 block, size_t smem, LaunchKind kind,
                   int cluster, Args&&... args) {
  std::tuple<Params...> params(static_cast<Params>(args)...);
  Closure<Params...> c{kernel, &params};
  return run_grid(&trampoline<Params...>, &c, name, grid, block, smem, kind, cluster);
}
template <typename... Params, typename... Args>
cudaError_t launch_ex(const cudaLaunchConfig_t& cfg, void (*kernel)(Params...), const char* name, Args&&... args) {
  int cluster = 1;
  for (unsigned i = 0; i < cfg.numAttrs; ++i) {
    if (cfg.attrs[i].id == cudaLaunchAttributeClusterDimension) {
      cluster = static_cast<int>(cfg.attrs[i].val.clusterDim.x * cfg.attrs[i].val.clusterDim.y *
                                 cfg.attrs[i].val.clusterDim.z);
    }
  }
  return launch(kernel, name, cfg.gridDim, cfg.blockDim, cfg.dynamicSmemBytes,
                cluster > 1 ? LaunchKind::Cluster : LaunchKind::Plain, cluster, args...);
}
// FUSEDRNN_LAUNCH(...)(args): like <<<>>>, no return value; the error goes to cudaGetLastError.
template <typename... Params>
struct Launcher {
  void (*kernel)(Params...);
  const char* name;
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args&&... args) const {
    record_launch_error(launch(kernel, name, grid, block, smem, LaunchKind::Plain, 1, args...));
  }
};
template <typename... Params>
Launcher<Params...> launcher(void (*kernel)(Params...), const char* name, dim3 grid, dim3 block, size_t smem) {
  return {kernel, name, grid, block, smem};
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------------
// The CUDA built-ins the kernels use
// ---------------------------------------------------------------------------------------------------
// Real variables (so that cudaLaunchConfig_t::gridDim still parses): one OS thread per CTA sets blockIdx,
// blockDim, gridDim once; the scheduler sets threadIdx before it resumes a fiber.
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
#define __syncthreads() ::emu::syncthreads()
#define __syncwarp(...) ::emu::syncwarp()

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
// __expf is the SFU's approximation on the GPU (2 ulp); exact here. Only the beam kernels use it, for sums whose
// tolerance covers both.
inline float __expf(float x) { return std::exp(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
using std::isnan;

inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = std::atomic_ref<unsigned>(*p).fetch_add(v, std::memory_order_acq_rel);
  ::emu::note_progress();
  return old;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

namespace emu::detail {
// A shuffle deposits (value, kind, argument) per lane: the source lane may differ per lane.
struct ShflIn {
  unsigned char value[8];
  int kind;  // 0 idx, 1 xor, 2 up
  int arg;
};
template <typename T>
void shfl_combine(const unsigned char (*ins)[64], unsigned char (*outs)[64], int lanes, const void*) {
  for (int l = 0; l < lanes; ++l) {
    ShflIn in;
    std::memcpy(&in, ins[l], sizeof(in));
    int src = in.kind == 0 ? in.arg : in.kind == 1 ? (l ^ in.arg) : (l >= in.arg ? l - in.arg : l);
    src &= 31;
    if (src >= lanes) src = l;  // a lane outside a partial warp: undefined on the GPU; our own value here
    std::memcpy(outs[l], ins[src], sizeof(T));
  }
}
template <typename T>
T shfl(T v, int kind, int arg) {
  static_assert(sizeof(T) <= 8, "shuffle of a value over 8 bytes");
  ShflIn in{};
  std::memcpy(in.value, &v, sizeof(T));
  in.kind = kind;
  in.arg = arg;
  T r;
  warp_collective(&in, sizeof(in), &r, sizeof(T), &shfl_combine<T>, nullptr);
  return r;
}
void ballot_combine(const unsigned char (*ins)[64], unsigned char (*outs)[64], int lanes, const void*);
void sum_combine(const unsigned char (*ins)[64], unsigned char (*outs)[64], int lanes, const void*);
}  // namespace emu::detail

template <typename T>
inline T __shfl_sync(unsigned, T v, int src, int = 32) {
  return ::emu::detail::shfl(v, 0, src);
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
  return ::emu::detail::shfl(v, 1, mask);
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int = 32) {
  return ::emu::detail::shfl(v, 2, static_cast<int>(delta));
}
inline unsigned __ballot_sync(unsigned, int p) {
  const int in = p != 0;
  unsigned r;
  ::emu::warp_collective(&in, sizeof(in), &r, sizeof(r), &::emu::detail::ballot_combine, nullptr);
  return r;
}
inline int __any_sync(unsigned mask, int p) { return __ballot_sync(mask, p) != 0; }
inline int __reduce_add_sync(unsigned, int v) {
  int r;
  ::emu::warp_collective(&v, sizeof(v), &r, sizeof(r), &::emu::detail::sum_combine, nullptr);
  return r;
}
