// The CPU kernels' instruction-set level (cpu/isa.h): chosen once per process, forced by FUSEDRNN_CPU_ISA.
#include "cpu/isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

namespace fusedrnn::cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

bool cpu_supports(Isa isa) {
#if FUSEDRNN_X86
  // The target attributes are arch=x86-64-v3 / -v4, so the CPU must have every feature of that level.
  if (isa == Isa::kAvx512) return __builtin_cpu_supports("x86-64-v4");
  if (isa == Isa::kAvx2) return __builtin_cpu_supports("x86-64-v3");
  return true;
#else
  return isa == Isa::kBaseline;
#endif
}

namespace {

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (cpu_supports(isa)) return isa;
  }
  return Isa::kBaseline;
}

Isa choose_isa() {
  const char* env = std::getenv("FUSEDRNN_CPU_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto") return best_isa();
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kBaseline}) {
    if (want != isa_name(isa)) continue;
    TORCH_CHECK(cpu_supports(isa), "FUSEDRNN_CPU_ISA=", want, ": this CPU does not support it (best level here: ",
                isa_name(best_isa()), ")");
    return isa;
  }
  TORCH_CHECK(false, "FUSEDRNN_CPU_ISA: expected one of auto, avx512, avx2, baseline, got '", want, "'");
}

}  // namespace

Isa active_isa() {
  static const Isa isa = choose_isa();  // a throw leaves it unset: the next call raises again
  return isa;
}

namespace {

std::string cpu_isa() { return isa_name(active_isa()); }

std::vector<std::string> cpu_isa_levels() {
  std::vector<std::string> out;
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kBaseline}) {
    if (cpu_supports(isa)) out.emplace_back(isa_name(isa));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def("cpu_isa() -> str", &cpu_isa);                 // the level the cpu kernels run at
  m.def("cpu_isa_levels() -> str[]", &cpu_isa_levels);  // the levels this CPU can run, best first
}

}  // namespace fusedrnn::cpu
