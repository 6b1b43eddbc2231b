#!/usr/bin/env bash
# fusedrnn GPU suite: build for the local GPU, run the tests, compute-sanitizer, and the benchmark, and keep
# every log and result in one folder to commit: bench/results/<device>-<yyyymmdd>-<commit>/.
#
#   bench/gpu_suite.sh [STAGE ...]      STAGE: env build test sanitize bench all quick (default: all)
#   bench/gpu_suite.sh quick            THE plan for one 10-minute device command on an H100/H200 (issue #17):
#             build for sm_90a only (no emulator), then, each within its own cap so every one gets its turn:
#             test-quick (pytest -m gpu, FUSEDRNN_QUICK=1: each value of each test parameter once -- every
#             path, cell and dtype -- 150 s), latency (bench/step_latency.py: per-step slope over T=256/1024 of
#             every path vs cuDNN, LSTM H {256,768,1024} x B {1,16,64} x fp16/bf16 x fwd/fwd+bwd, the model's
#             estimate beside each, and the synchronisation floor; 150 s), sanitize-quick (memcheck, racecheck
#             on the tiny cases of every kernel, 90 s), emu-conformance (bench/emu_conformance.py: the
#             emulator vs the GPU, 60 s), lengths (bench/bench_lengths.py: padded / packed / lengths=, torch.nn
#             and fusedrnn, T 10 / 1000 fwd+bwd, issue #18; what is left, at most 40 s). Results as for every
#             run: the folder, its tarball, files in $OUT.
#
#   env       nvidia-smi, driver, nvcc, compute-sanitizer, python/torch/triton versions, git commit -> env.txt
#   build     FUSEDRNN_CUDA_ARCHS from nvidia-smi's compute capability (9.0 -> 90a), then
#             pip install --no-build-isolation --no-deps --no-index -v -e .  -> build.log, ptxas.txt
#             (registers / spills / shared memory of every CUDA kernel), build_check.txt
#   test      pytest tests -m gpu, then the whole of pytest tests on the GPU -> test_*.log, test_*.xml
#   sanitize  bench/sanitizer_cases.py once plainly (kernel inventory -> kernels.json), then under
#             compute-sanitizer memcheck, racecheck, synccheck -> sanitize_*.log
#   bench     python -m fusedrnn.bench --preset deepbench -> bench-<tag>/results.{json,csv}, speedup.png
#   every run ends by packing: summary.txt, stages.tsv, and <folder>.tar.gz (in $TMPDIR) of the folder; with
#   $OUT set (the device tool's output folder) the tarball and the key files are copied there (<= 8 files).
#
# Each device command may run 10 minutes, so every stage is runnable alone and the run keeps to a budget:
# a stage gets the time left (timeout), a stage that would start with < 10 s left is recorded as skipped.
# test / sanitize / bench build first when the extension is not importable (a fresh machine).
# A sequence that fits the 10-minute calls:  build test | sanitize | bench  (three calls).
#
# Environment:
#   FUSEDRNN_SUITE_BUDGET=570      seconds for this invocation (default 570)
#   FUSEDRNN_RESULTS_DIR=DIR       results folder (default bench/results/<device>-<date>-<commit>)
#   FUSEDRNN_COMMIT=SHA            the commit when the tree has no .git (the device copy may not)
#   FUSEDRNN_SUITE_PRESET=NAME     bench preset (default deepbench); FUSEDRNN_SUITE_BENCH_ARGS extra args,
#                                  e.g. "--mode fwd"; FUSEDRNN_SUITE_BENCH_TAG names the subfolder
#   FUSEDRNN_SUITE_PYTEST_ARGS     extra pytest arguments (e.g. "-x -k lstm")
#   FUSEDRNN_SUITE_SANITIZERS      default "memcheck racecheck synccheck" (one per call if they don't fit)
#   FUSEDRNN_SUITE_SANITIZE_ARGS   extra bench/sanitizer_cases.py arguments (e.g. "--backend cuda --cell lstm")
#   FUSEDRNN_SUITE_COPY_OUT=0      don't copy to $OUT
#   FUSEDRNN_SUITE_DRY_RUN=1       print the commands, run none
#   FUSEDRNN_SUITE_ALLOW_CPU=1     run the stages without a GPU (CPU build, CPU bench; no sanitizer):
#                                  exercises the script itself
#   PYTHON=python3                 the interpreter (the GPU machines' python3 holds torch)
set -u -o pipefail

usage() { sed -n '2,/^set -u/p' "$0" | sed -e 's/^# \{0,1\}//' -e '/^set -u/d'; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
START=$(date +%s)
BUDGET="${FUSEDRNN_SUITE_BUDGET:-570}"
RESERVE=20                         # seconds kept for packing
DRY="${FUSEDRNN_SUITE_DRY_RUN:-0}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # the source tree, also before it is pip-installed

STAGES=("$@")
(( ${#STAGES[@]} )) || STAGES=(all)
for s in "${STAGES[@]}"; do
    case $s in
        all) STAGES=(env build test sanitize bench); break ;;
        quick) STAGES=(quick); break ;;
        env|build|test|sanitize|bench) ;;
        -h|--help|help) usage; exit 0 ;;
        *) echo "gpu_suite: unknown stage '$s'; expected env, build, test, sanitize, bench, all or quick" >&2; exit 2 ;;
    esac
done

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

if have_gpu; then
    DEVICE_SLUG=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' \
                  | sed -e 's/nvidia//g' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-*//' -e 's/-*$//')
    SUITE_DEVICE=cuda
elif [[ "${FUSEDRNN_SUITE_ALLOW_CPU:-0}" == 1 ]]; then
    DEVICE_SLUG=cpu
    SUITE_DEVICE=cpu
else
    echo "gpu_suite: no NVIDIA GPU found (nvidia-smi -L failed). Set FUSEDRNN_SUITE_ALLOW_CPU=1 to exercise" \
         "the stages on a CPU." >&2
    exit 2
fi

COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "${FUSEDRNN_COMMIT:-unknown}")
export FUSEDRNN_COMMIT="$COMMIT"   # read by fusedrnn.bench where the tree has no .git
NAME="${DEVICE_SLUG:-gpu}-$(date -u +%Y%m%d)-${COMMIT:0:10}"
RESULTS="${FUSEDRNN_RESULTS_DIR:-$ROOT/bench/results/$NAME}"
NAME="$(basename "$RESULTS")"
mkdir -p "$RESULTS"
STAGES_FILE="$RESULTS/stages.tsv"
[[ -f "$STAGES_FILE" ]] || printf 'stage\tstatus\tseconds\tlog\tfinished_utc\n' >"$STAGES_FILE"

remaining() { echo $(( BUDGET - ($(date +%s) - START) - RESERVE )); }

record() {  # record <stage> <status> <seconds> <log>
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(basename "${4:--}")" "$(date -u +%FT%TZ)" >>"$STAGES_FILE"
}

# step <stage> <log> <command...>: runs the command within the time left (and within $STEP_CAP seconds when
# set), output to the log; records it.
step() {
    local name=$1 log=$2 left t0 rc dt st
    shift 2
    left=$(remaining)
    if [[ -n "${STEP_CAP:-}" ]] && (( left > STEP_CAP )); then left=$STEP_CAP; fi
    if (( left < 10 )); then
        record "$name" "skipped: time budget spent" 0 "$log"
        echo "-- $name: skipped (time budget spent; run it alone)"
        return 0
    fi
    echo "== $name (up to ${left}s): $*" | tee -a "$log"
    if [[ "$DRY" == 1 ]]; then record "$name" "dry-run" 0 "$log"; return 0; fi
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=15 "$left" "$@" >>"$log" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    case $rc in
        0) st=ok ;;
        124|137) st="timeout after ${dt}s" ;;
        5) if [[ "$*" == *pytest* ]]; then st="no tests collected (exit 5)"; else st="failed (exit 5)"; fi ;;
        *) st="failed (exit $rc)" ;;
    esac
    record "$name" "$st" "$dt" "$log"
    echo "   -> $st (${dt}s), log: ${log#"$ROOT"/}"
    if (( rc != 0 )); then tail -n 15 "$log" | sed 's/^/   | /'; fi
    return $rc
}

# --------------------------------------------------------------------------------------------------------
stage_env() {
    local f="$RESULTS/env.txt"
    {
        echo "# fusedrnn GPU suite environment, $(date -u +%FT%TZ)"
        echo "commit: $COMMIT"
        git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | sed 's/^/modified: /'
        echo; echo "## nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
        echo; echo "## nvidia-smi -q -d CLOCK,POWER,TEMPERATURE,PERFORMANCE,COMPUTE"
        nvidia-smi -q -d CLOCK,POWER,TEMPERATURE,PERFORMANCE,COMPUTE 2>&1 || true
        echo; echo "## nvcc"; nvcc --version 2>&1 || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>&1 || true
        echo; echo "## compute-sanitizer"; "$(sanitizer_bin)" --version 2>&1 || echo "compute-sanitizer: not found"
        echo; echo "## python"
        "$PY" - <<'EOF' 2>&1
import importlib.metadata as md, platform, sys, torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn",
      torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
for dist in ("triton", "pytest", "pytest-benchmark", "matplotlib", "numpy"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs {p.total_memory / 2**30:.1f} GiB")
    print("tf32: cudnn.allow_tf32", torch.backends.cudnn.allow_tf32, "matmul.allow_tf32",
          torch.backends.cuda.matmul.allow_tf32)
try:
    import fusedrnn
    print("fusedrnn", fusedrnn.__version__, "extension:", fusedrnn.has_extension(), fusedrnn.extension_error() or "")
    print("available backends:", fusedrnn.available_backends("cuda" if torch.cuda.is_available() else "cpu"))
except Exception as e:
    print("fusedrnn import failed:", e)
EOF
        echo; echo "## pip list"; "$PY" -m pip list 2>/dev/null
        echo; echo "## cpu / memory"; lscpu 2>/dev/null | head -20; free -g 2>/dev/null
    } >"$f" 2>&1
    record env ok 0 "$f"
    echo "== env -> ${f#"$ROOT"/}"
}

sanitizer_bin() {
    command -v compute-sanitizer 2>/dev/null && return
    local c
    for c in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
        [[ -x "$c" ]] && { echo "$c"; return; }
    done
    echo compute-sanitizer
}

cuda_archs() {  # "9.0" -> 90a (sm_90's arch-specific features: wgmma, setmaxnreg), "8.0" -> 80
    local cap major
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
    [[ -n "$cap" ]] || return 1
    major=${cap%%.*}
    if (( major >= 9 )); then echo "${cap/./}a"; else echo "${cap/./}"; fi
}

stage_build() {
    local log="$RESULTS/build.log"
    if [[ "$SUITE_DEVICE" == cuda ]]; then
        export FUSEDRNN_CUDA_ARCHS="${FUSEDRNN_CUDA_ARCHS:-$(cuda_archs)}"
        export FUSEDRNN_BUILD_CUDA="${FUSEDRNN_BUILD_CUDA:-1}"   # a broken CUDA toolchain fails loudly
        [[ -n "${CUDA_HOME:-}" || ! -d /usr/local/cuda ]] || export CUDA_HOME=/usr/local/cuda
    fi
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    export FUSEDRNN_PTXAS_VERBOSE=1
    echo "FUSEDRNN_CUDA_ARCHS=${FUSEDRNN_CUDA_ARCHS:-} FUSEDRNN_BUILD_CUDA=${FUSEDRNN_BUILD_CUDA:-} CUDA_HOME=${CUDA_HOME:-}" \
         "MAX_JOBS=$MAX_JOBS" >>"$log"
    BUILD_TRIED=1
    step build "$log" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
    local rc=$?
    [[ "$DRY" == 1 ]] && return 0
    grep -E "ptxas info|bytes stack frame|spill" "$log" >"$RESULTS/ptxas.txt" 2>/dev/null || true
    (( rc == 0 )) || return 1
    step build-check "$RESULTS/build_check.txt" "$PY" -c "
import torch, fusedrnn
from fusedrnn._extension import has_cuda_kernels
dev = 'cuda' if torch.cuda.is_available() else 'cpu'
print('extension', fusedrnn.has_extension(), '| CUDA kernels', has_cuda_kernels(), '|', fusedrnn.extension_error() or '')
print('available backends on', dev, fusedrnn.available_backends(dev))
assert fusedrnn.has_extension(), 'the extension did not load'
"
}

BUILD_TRIED=0
ensure_built() {
    [[ "$DRY" == 1 || "$BUILD_TRIED" == 1 ]] && return 0   # one build attempt per run, failed or not
    if ! "$PY" -c "import fusedrnn._C" >/dev/null 2>&1; then
        echo "-- the extension is not importable here: building first"
        stage_build
    fi
}

pytest_args() { read -ra EXTRA <<<"${FUSEDRNN_SUITE_PYTEST_ARGS:-}"; }

stage_test() {
    ensure_built
    pytest_args
    step test-gpu "$RESULTS/test_gpu.log" "$PY" -m pytest tests -m gpu -q -rfEs -p no:cacheprovider \
        --junitxml="$RESULTS/test_gpu.xml" "${EXTRA[@]}"
    step test-full "$RESULTS/test_full.log" "$PY" -m pytest tests -q -rfEs -p no:cacheprovider \
        --junitxml="$RESULTS/test_full.xml" "${EXTRA[@]}"
}

stage_sanitize() {
    ensure_built
    local cs log="$RESULTS/sanitize_cases.log"
    read -ra SARGS <<<"${FUSEDRNN_SUITE_SANITIZE_ARGS:-}"
    step sanitize-cases "$log" "$PY" bench/sanitizer_cases.py --device "$SUITE_DEVICE" \
        --coverage "$RESULTS/kernels.json" --json "$RESULTS/sanitize_cases.json" "${SARGS[@]}"
    [[ "$DRY" == 1 ]] || grep -E "^(kernel backends|  not checked|summary|NOT REACHED|NOTHING)" "$log" | sed 's/^/   /'
    if grep -q "NOTHING TO CHECK" "$log" 2>/dev/null; then
        record sanitize "skipped: no fusedrnn GPU kernel path available" 0 "$log"
        return 0
    fi
    cs=$(sanitizer_bin)
    if [[ "$SUITE_DEVICE" != cuda ]] || ! command -v "$cs" >/dev/null 2>&1; then
        record sanitize "skipped: compute-sanitizer or GPU not available" 0 "$log"
        echo "-- sanitize: compute-sanitizer or GPU not available, skipped"
        return 0
    fi
    local tool
    for tool in ${FUSEDRNN_SUITE_SANITIZERS:-memcheck racecheck synccheck}; do
        # no caching allocator: an out-of-bounds access inside a cached block would be invisible to memcheck
        step "sanitize-$tool" "$RESULTS/sanitize_$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            "$cs" --tool "$tool" --error-exitcode 86 --print-limit 100 --target-processes all \
            "$PY" bench/sanitizer_cases.py --device cuda --quiet "${SARGS[@]}"
        grep -h "ERROR SUMMARY" "$RESULTS/sanitize_$tool.log" 2>/dev/null | tail -1 | sed "s/^/   $tool: /"
    done
}

stage_bench() {
    ensure_built
    local tag="${FUSEDRNN_SUITE_BENCH_TAG:-${FUSEDRNN_SUITE_PRESET:-deepbench}}" limit
    read -ra BARGS <<<"${FUSEDRNN_SUITE_BENCH_ARGS:-}"
    limit=$(( $(remaining) - 60 ))       # no new case after this: the one running gets a minute to finish
    (( limit > 0 )) || limit=1
    step bench "$RESULTS/bench-$tag.log" "$PY" -m fusedrnn.bench --preset "${FUSEDRNN_SUITE_PRESET:-deepbench}" \
        --device "$SUITE_DEVICE" --out "$RESULTS/bench-$tag" --no-progress --time-limit "$limit" "${BARGS[@]}"
    local rc=$?
    (( rc == 3 )) && echo "   (exit 3: a provider was WRONG or failed; see the table in the log)"
    [[ "$DRY" == 1 ]] || grep -E "^(Stopped early|plot)" "$RESULTS/bench-$tag.log" | sed 's/^/   /'
    return $rc
}

stage_quick() {
    if [[ "$SUITE_DEVICE" == cuda ]]; then
        export FUSEDRNN_CUDA_ARCHS="${FUSEDRNN_CUDA_ARCHS:-90a}"   # sm_90a only: the H100/H200 at hand
        export FUSEDRNN_BUILD_EMU="${FUSEDRNN_BUILD_EMU:-0}"       # the emulator is for machines without a GPU
    fi
    stage_build || return 1
    [[ "$SUITE_DEVICE" == cuda ]] || BUILD_TRIED=1
    local status=0 emu_args=()
    STEP_CAP=150 FUSEDRNN_QUICK=1 step test-quick "$RESULTS/test_quick.log" "$PY" -m pytest tests -m gpu -q -rfEs \
        -p no:cacheprovider --junitxml="$RESULTS/test_quick.xml" || status=1
    STEP_CAP=150 step latency "$RESULTS/latency.log" "$PY" bench/step_latency.py --device "$SUITE_DEVICE" \
        --out "$RESULTS/latency" --time-limit 120 || status=1
    [[ "$DRY" == 1 ]] || grep -E "^(lstm|gru|Stopped)" "$RESULTS/latency.log" 2>/dev/null | head -60 | sed 's/^/   /'
    FUSEDRNN_SUITE_SANITIZERS="${FUSEDRNN_SUITE_SANITIZERS:-memcheck racecheck}" STEP_CAP=45 stage_sanitize || status=1
    [[ "$SUITE_DEVICE" == cuda ]] || emu_args=(--emu-only)
    STEP_CAP=60 step emu-conformance "$RESULTS/emu_conformance.log" "$PY" bench/emu_conformance.py "${emu_args[@]}" \
        || status=1
    # issue #18's GPU row, in what time is left: padded / PackedSequence / lengths= for torch.nn and fusedrnn
    STEP_CAP=40 step lengths "$RESULTS/lengths.log" "$PY" bench/bench_lengths.py --device "$SUITE_DEVICE" \
        --seq-len 10,1000 --modes fwdbwd --repeats 10 --max-seconds 0.5 --json "$RESULTS/lengths.json" || status=1
    return $status
}

stage_pack() {
    local summary="$RESULTS/summary.txt" tarball="${TMPDIR:-/tmp}/$NAME.tar.gz"
    {
        echo "fusedrnn GPU suite: $NAME"
        echo "commit $COMMIT, device $SUITE_DEVICE ($DEVICE_SLUG), packed $(date -u +%FT%TZ)"
        echo; column -t -s $'\t' "$STAGES_FILE" 2>/dev/null || cat "$STAGES_FILE"
        local f line
        for f in "$RESULTS"/sanitize_*.log "$RESULTS"/test_*.log; do
            [[ -f "$f" ]] || continue
            line=$(grep -hE 'ERROR SUMMARY|^summary|(passed|failed|error|skipped|no tests ran)( |,|$)' "$f" | tail -1)
            [[ -n "$line" ]] && echo "$(basename "$f"): $line"
        done
    } >"$summary"
    tar -czf "$tarball" -C "$(dirname "$RESULTS")" "$NAME"
    echo "== packed: ${RESULTS#"$ROOT"/} -> $tarball ($(du -h "$tarball" | cut -f1))"
    if (( $(stat -c %s "$tarball") > 16 * 1024 * 1024 )); then
        echo "!! the tarball is over 16 MiB: the device tool will not bring it back; fetch the logs separately"
    fi
    if [[ -n "${OUT:-}" && "${FUSEDRNN_SUITE_COPY_OUT:-1}" == 1 ]]; then
        # the device tool brings back at most 8 files, 16 MiB each: the tarball holds everything
        local files=("$tarball" "$summary") latest
        [[ -f "$RESULTS/env.txt" ]] && files+=("$RESULTS/env.txt")
        latest=$(ls -td "$RESULTS"/bench-*/ 2>/dev/null | head -1)
        if [[ -n "$latest" ]]; then
            for f in results.json results.csv speedup.png; do [[ -f "$latest/$f" ]] && files+=("$latest/$f"); done
        fi
        [[ -f "$RESULTS/latency/step_latency.json" ]] && files+=("$RESULTS/latency/step_latency.json")
        [[ -f "$RESULTS/latency/step_latency.csv" ]] && files+=("$RESULTS/latency/step_latency.csv")
        [[ -f "$RESULTS/kernels.json" ]] && files+=("$RESULTS/kernels.json")
        mkdir -p "$OUT"
        cp "${files[@]:0:8}" "$OUT"/
        echo "== copied to \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    fi
    echo; cat "$summary"
}

# --------------------------------------------------------------------------------------------------------
echo "fusedrnn GPU suite: stages ${STAGES[*]} -> ${RESULTS#"$ROOT"/} (budget ${BUDGET}s)"
[[ " ${STAGES[*]} " == *" env "* ]] || stage_env   # every results folder says where it came from
status=0
for s in "${STAGES[@]}"; do
    "stage_$s" || status=1
done
stage_pack
exit $status
