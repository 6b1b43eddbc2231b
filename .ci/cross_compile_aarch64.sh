#!/usr/bin/env bash
# Compiles (no link) the CPU kernels for aarch64 with Debian's cross compiler: the baseline ISA level must be
# correct C++ on any architecture (16-byte generic vectors become NEON there), not only on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v aarch64-linux-gnu-g++ > /dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu > /dev/null
  else
    echo "aarch64-linux-gnu-g++ missing and cannot be installed here (needs root and apt-get)" >&2
    exit 1
  fi
fi
includes=$(python -c 'import torch.utils.cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))' 2>/dev/null)
out=$(mktemp -d)
for src in csrc/cpu/*.cpp; do
  echo "+ aarch64-linux-gnu-g++ -c $src"
  # shellcheck disable=SC2086
  aarch64-linux-gnu-g++ -std=c++20 -O2 -fopenmp -Wno-psabi -Icsrc $includes -c "$src" -o "$out/$(basename "$src").o"
done
# The GEMM must have become NEON multiply-adds, not scalar code.
fmla=$(aarch64-linux-gnu-objdump -d "$out/rnn_layer.cpp.o" | grep -c 'fmla' || true)
echo "aarch64: csrc/cpu compiled; $fmla NEON fmla instructions in rnn_layer.cpp.o"
[ "$fmla" -gt 0 ]
