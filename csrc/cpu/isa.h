// Instruction-set levels of the CPU kernels, side by side. Every ISA-dependent kernel (the packed GEMM, the
// weight packing, the pointwise rows, the beam top-k scans) is compiled once per level from one always-inline
// body and picked by active_isa(), decided once per process:
//
//   avx512    x86-64-v4: 64-byte vectors (zmm), 32 registers
//   avx2      x86-64-v3: 32-byte vectors (ymm), 16 registers, FMA
//   baseline  the build's default target: 16-byte vectors (SSE2 on x86-64, NEON on aarch64), no FMA on x86
//
// FUSEDRNN_CPU_ISA=avx512|avx2|baseline forces a level (an error if this CPU lacks it), so tests and
// benchmarks reach every level on any machine. Why not GCC's target_clones: it dispatches by the CPU only (no
// switch), and a generic vector wider than the clone's registers is lowered through the stack -- the AVX2
// clone of the 64-byte-vector GEMM ran at ~1.4 GFLOP/s with its accumulators spilled (LSTM T=64, B=16,
// H=256 forward: 1055 ms against torch's 30 ms on a Zen 3).
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#define FUSEDRNN_X86 1
#define FUSEDRNN_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define FUSEDRNN_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#else
#define FUSEDRNN_X86 0
#endif

#if defined(__GNUC__)
#define FUSEDRNN_ALWAYS_INLINE __attribute__((always_inline)) inline
#define FUSEDRNN_INLINE_LAMBDA __attribute__((always_inline))
#else
#define FUSEDRNN_ALWAYS_INLINE inline
#define FUSEDRNN_INLINE_LAMBDA
#endif

namespace fusedrnn::cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
// The level every kernel of this process uses: $FUSEDRNN_CPU_ISA if set (checked against the CPU), else the
// best this CPU runs. Read once; raises (c10::Error) on a bad or unsupported FUSEDRNN_CPU_ISA.
Isa active_isa();
// Whether this CPU can run `isa`.
bool cpu_supports(Isa isa);

// Bytes of one SIMD vector at each level (the width of the generic vectors of the GEMM and packing).
template <Isa isa>
constexpr int kVectorBytes = isa == Isa::kAvx512 ? 64 : isa == Isa::kAvx2 ? 32 : 16;

}  // namespace fusedrnn::cpu

// Defines `name(params)` (a template on T) that runs `name##_body<T, Isa>(args)` compiled for the active ISA
// level: one target-attributed function per level, each inlining the body, so the body's loops and generic
// vectors get that level's registers.
#if FUSEDRNN_X86
#define FUSEDRNN_ISA_LEVELS(name, params, args)                                                                \
  template <typename T>                                                                                        \
  FUSEDRNN_TARGET_AVX512 void name##_avx512 params { name##_body<T, ::fusedrnn::cpu::Isa::kAvx512> args; }     \
  template <typename T>                                                                                        \
  FUSEDRNN_TARGET_AVX2 void name##_avx2 params { name##_body<T, ::fusedrnn::cpu::Isa::kAvx2> args; }           \
  template <typename T>                                                                                        \
  __attribute__((noinline)) void name##_baseline params {                                                      \
    name##_body<T, ::fusedrnn::cpu::Isa::kBaseline> args;                                                      \
  }                                                                                                            \
  template <typename T>                                                                                        \
  inline void name params {                                                                                    \
    switch (::fusedrnn::cpu::active_isa()) {                                                                   \
      case ::fusedrnn::cpu::Isa::kAvx512: return name##_avx512<T> args;                                        \
      case ::fusedrnn::cpu::Isa::kAvx2: return name##_avx2<T> args;                                            \
      default: return name##_baseline<T> args;                                                                 \
    }                                                                                                          \
  }
#else
#define FUSEDRNN_ISA_LEVELS(name, params, args)                                                                \
  template <typename T>                                                                                        \
  inline void name params {                                                                                    \
    name##_body<T, ::fusedrnn::cpu::Isa::kBaseline> args;                                                      \
  }
#endif
