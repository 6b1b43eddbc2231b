#!/usr/bin/env bash
# CI job: representative emulated kernels (tests/emu/harness.cpp) under ThreadSanitizer and under
# AddressSanitizer + UndefinedBehaviorSanitizer; fails on any report. Also checks that the detectors bite: a
# planted shared-memory race must be reported by TSan, writes past shared or global memory by ASan, a divergent
# __syncthreads must fail at once, and a hang must be cancelled by the watchdog within seconds. Needs g++, the CUDA headers, libboost-context-dev (else
# ucontext fibers). About 3-4 minutes on 2 cores (objects are cached in $FUSEDRNN_SANITIZER_DIR when set).
#   tests/emu/run_sanitizers.sh [tsan|asan|all] [extra compiler flags...]
set -euo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-all}"
shift || true
extra=("$@")
out="${FUSEDRNN_SANITIZER_DIR:-$(mktemp -d)}"
mkdir -p "$out"
cuda_include="${CUDA_HOME:-/usr/local/cuda}/include"
if [ ! -f "$cuda_include/cuda_runtime.h" ]; then
  cuda_include=$(python -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "include"))')
fi
fibers=(-lboost_context)
if [ ! -f /usr/include/boost/context/detail/fcontext.hpp ]; then
  echo "libboost-context-dev missing: ucontext fibers" >&2
  fibers=(-DFUSEDRNN_EMU_UCONTEXT)
fi
sources=(csrc/emu/emu.cpp csrc/emu/rnn_persistent_emu.cpp csrc/emu/rnn_pointwise_emu.cpp csrc/emu/beam_topk_emu.cpp
         tests/emu/harness.cpp)
common=(-std=c++20 -O1 -g -fno-omit-frame-pointer -DFUSEDRNN_EMU -Wno-unknown-pragmas -Icsrc/emu/include -Icsrc
        -I"$cuda_include" -pthread)
export FUSEDRNN_EMU_WATCHDOG_S="${FUSEDRNN_EMU_WATCHDOG_S:-20}"

build() {  # name, flags...
  local name=$1
  shift
  local start=$SECONDS objs=()
  # objects keyed by the content of their source and every header (tests/emu/mutate.py reuses the unchanged ones)
  local headers
  headers=$(cat csrc/emu/*.h csrc/emu/include/*.h csrc/cuda/*.h csrc/cuda/*.cuh csrc/fusedrnn/*.h | sha1sum | cut -c1-12)
  for src in "${sources[@]}"; do
    local key
    key=$( (cat "$src"; [ "${src##*_emu.cpp}" = "" ] && cat "csrc/cuda/$(basename "${src%_emu.cpp}").cu"; echo "$headers ${extra[*]} $*") | sha1sum | cut -c1-12)
    local obj="$out/$name-$(basename "${src%.*}")-$key.o"
    objs+=("$obj")
    [ -f "$obj" ] && continue
    g++ "${common[@]}" "$@" "${extra[@]}" -c "$src" -o "$obj.tmp" && mv "$obj.tmp" "$obj" &
    if [ "$(jobs -r | wc -l)" -ge "${MAX_JOBS:-2}" ]; then wait -n; fi
  done
  wait
  g++ "$@" -o "$out/harness-$name" "${objs[@]}" "${fibers[@]}" -pthread
  echo "built harness-$name in $((SECONDS - start)) s"
}

expect() {  # description, expected rc (0 / nonzero), pattern in the output or "", command...
  local what=$1 want=$2 pattern=$3
  shift 3
  local start=$SECONDS rc=0
  local log="$out/log.$$"
  "$@" > "$log" 2>&1 || rc=$?
  local ok=1
  if [ "$want" = 0 ] && [ "$rc" != 0 ]; then ok=0; fi
  if [ "$want" != 0 ] && [ "$rc" = 0 ]; then ok=0; fi
  if [ -n "$pattern" ] && ! grep -q "$pattern" "$log"; then ok=0; fi
  if [ "$ok" = 1 ]; then
    echo "ok   $what ($((SECONDS - start)) s)"
  else
    echo "FAIL $what (rc $rc, $((SECONDS - start)) s):"
    tail -60 "$log"
    status=1
  fi
}

status=0
if [ "$mode" = tsan ] || [ "$mode" = all ]; then
  build tsan -fsanitize=thread -Wno-tsan  # (-Wno-tsan: TSan ignores __threadfence's standalone fence; documented)
  # halt_on_error: the first report fails the run; the fiber API needs TSan's fiber support (GCC >= 10)
  export TSAN_OPTIONS="halt_on_error=1 exitcode=66 report_signal_unsafe=0"
  expect "TSan: kernels, no report" 0 "all OK" "$out/harness-tsan" kernels
  expect "TSan: a planted shared-memory race is reported" 66 "data race" "$out/harness-tsan" race
  expect "divergent __syncthreads fails at once" 0 "deadlock" "$out/harness-tsan" deadlock
  FUSEDRNN_EMU_WATCHDOG_S=3 expect "watchdog cancels a hang within seconds" 0 "watchdog" "$out/harness-tsan" hang
  unset TSAN_OPTIONS
fi
if [ "$mode" = asan ] || [ "$mode" = all ]; then
  build asan -O0 -fsanitize=address,undefined -fno-sanitize-recover=undefined  # -O0: builds ~2x faster, runs in seconds
  export ASAN_OPTIONS="detect_leaks=0 halt_on_error=1 detect_stack_use_after_return=0"
  export UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1"
  expect "ASan+UBSan: kernels, no report" 0 "all OK" "$out/harness-asan" kernels
  expect "ASan: a write past dynamic shared memory is reported" 1 "AddressSanitizer" "$out/harness-asan" oob-smem
  expect "ASan: a write past a cudaMalloc buffer is reported" 1 "AddressSanitizer" "$out/harness-asan" oob-global
fi
exit $status
