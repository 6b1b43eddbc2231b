"""Static checks of the "cuda" backend's kernels, without a GPU (runs in CI).

Compiles every csrc/cuda/rnn_*.cu with nvcc for sm_90a and sm_80 (setup.py's flags, -cubin, -Xptxas -v) and
reads each kernel's resources (ptxas report, `cuobjdump -res-usage`) and SASS (`cuobjdump -sass`, from triton's
wheel). For every kernel: no spills, no local memory, registers within the launch bounds' budget; the persistent
kernels issue tensor-core MMAs (HMMA); the rnn_layer_ext row kernels (rnn_ext.cu) keep their static shared memory
within the share the op glue leaves them. For every persistent plan the dispatcher can pick on an H100 or A100
(fusedrnn::cuda_rnn_persistent_plan over the benchmark grid and odd sizes): shared memory within the device's
opt-in limit and every layout invariant the kernels rely on. About a minute on 2 cores.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("rnn_*.cu"))
ARCHS = ("90a", "80")
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", "-DFUSEDRNN_WITH_CUDA",
              f"-I{ROOT / 'csrc'}", "-Xptxas", "-v"]
THREADS = 256                  # every kernel: __launch_bounds__(256) (persistent: (256, 1))
SLOTS = 4                      # kPersistentSlots: state items per thread of a persistent kernel
REGISTER_FILE = 65536          # 32-bit registers per SM (sm_80, sm_90)
MAX_REGISTERS = 255            # per thread
# Device limits [SMs, opt-in shared memory per block in bytes, compute capability major].
DEVICES = {"H100": [132, 227 * 1024, 9], "A100": [108, 163 * 1024, 8]}
CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BATCHES = (1, 3, 8, 16, 64, 256)
HIDDENS = (63, 129, 256, 512, 768, 1024, 2048)


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    path = Path(home) / "bin" / "nvcc"
    return str(path) if path.exists() else shutil.which("nvcc")


def _cuobjdump():
    try:
        import triton
    except ImportError:
        return shutil.which("cuobjdump")
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else shutil.which("cuobjdump")


NVCC, CUOBJDUMP = _nvcc(), _cuobjdump()
pytestmark = pytest.mark.skipif(NVCC is None or CUOBJDUMP is None or shutil.which("c++filt") is None,
                                reason="needs nvcc, cuobjdump (triton's wheel) and c++filt")


@dataclass
class Kernel:
    name: str             # demangled, short: rnn_persistent_forward_kernel<__half, true>
    arch: str
    registers: int = -1
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    local: int = -1
    shared: int = -1      # static shared memory (the persistent kernels use dynamic shared memory only)
    hmma: int = 0
    sass: list = field(default_factory=list)


def _short(mangled: str) -> str:
    demangled = subprocess.run(["c++filt", mangled], capture_output=True, text=True, check=True).stdout.strip()
    match = re.search(r"(\w+(?:<[^()]*>)?)\(", demangled)
    return match.group(1) if match else demangled


def _compile(source: Path, arch: str, out_dir: Path) -> dict:
    cubin = out_dir / f"{source.stem}.sm_{arch}.cubin"
    cmd = [NVCC, "-cubin", "-o", str(cubin), str(source), f"-gencode=arch=compute_{arch},code=sm_{arch}",
           *NVCC_FLAGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, f"nvcc failed for {source.name} sm_{arch}:\n{proc.stderr[-4000:]}"
    kernels: dict[str, Kernel] = {}
    current = None
    for line in proc.stderr.splitlines():  # ptxas -v
        if m := re.search(r"Compiling entry function '(\S+)' for", line):
            current = kernels.setdefault(m.group(1), Kernel(_short(m.group(1)), arch))
        elif current is not None and (m := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current.registers = int(m.group(1))
    usage = subprocess.run([CUOBJDUMP, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    for m in re.finditer(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage):
        k = kernels.setdefault(m.group(1), Kernel(_short(m.group(1)), arch))
        k.local, k.shared = int(m.group(5)), int(m.group(4))
    sass = subprocess.run([CUOBJDUMP, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    current = None
    for line in sass.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            current = kernels.get(m.group(1))
        elif current is not None:
            current.sass.append(line)
            current.hmma += "HMMA" in line
    return kernels


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> list[Kernel]:
    out = tmp_path_factory.mktemp("cubins")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda job: _compile(job[0], job[1], out),
                                [(s, a) for s in SOURCES for a in ARCHS]))
    found = [k for r in results for k in r.values()]
    print("\nkernel figures (registers / stack / spills st,ld / local / static smem / HMMA):")
    for k in sorted(found, key=lambda k: (k.arch, k.name)):
        print(f"  sm_{k.arch:4} {k.name:58} {k.registers:4} {k.stack:3} {k.spill_stores},{k.spill_loads} "
              f"{k.local:3} {k.shared:5} {k.hmma:5}")
    return found


def _persistent(ks):
    return [k for k in ks if k.name.startswith("rnn_persistent_")]


def test_every_source_compiles_to_kernels(kernels):
    names = {k.name for k in kernels}
    for direction in ("forward", "backward"):
        for dtype in ("float", "__half", "__nv_bfloat16"):
            for cluster in ("false", "true"):
                assert f"rnn_persistent_{direction}_kernel<{dtype}, {cluster}>" in names
    for kind in ("forward", "proj_forward", "backward", "proj_backward"):
        for dtype in ("float", "__half", "__nv_bfloat16"):
            assert f"rnn_alt_{kind}_kernel<{dtype}>" in names
    for direction in ("forward", "backward"):
        for dtype in ("float", "__half", "__nv_bfloat16"):
            assert f"ext_{direction}_rows_kernel<{dtype}>" in names


def test_no_spills_no_local_memory(kernels):
    bad = [f"sm_{k.arch} {k.name}: stack {k.stack}, spills {k.spill_stores}/{k.spill_loads}, local {k.local}"
           for k in kernels if (k.stack, k.spill_stores, k.spill_loads, k.local) != (0, 0, 0, 0)]
    assert not bad, "\n".join(bad)
    for k in kernels:
        assert not any(re.search(r"\b(LDL|STL)\b", line) for line in k.sass), f"{k.name}: local memory in SASS"


def test_registers_within_launch_bounds(kernels):
    for k in kernels:
        assert 0 < k.registers <= MAX_REGISTERS, f"sm_{k.arch} {k.name}: {k.registers} registers"
        # One CTA of 256 threads must fit the register file (the persistent kernels run one CTA per SM).
        assert k.registers * THREADS <= REGISTER_FILE, f"sm_{k.arch} {k.name}: {k.registers} x {THREADS} threads"


def test_ext_row_kernels_resources(kernels):
    """rnn_ext.cu (CTAs of up to 256 threads): at least three CTAs per SM by registers, and static shared memory
    (the block reductions' partial sums) within kStaticSmem of csrc/cuda/rnn_ext.h, the share of the device's
    opt-in limit the glue keeps from the row cache. cuobjdump counts sm_90's 1 KB of system-reserved shared
    memory per CTA in; the opt-in limit does not."""
    ext = [k for k in kernels if k.name.startswith("ext_")]
    assert len(ext) == 2 * 3 * len(ARCHS)
    static_smem = 4 * (THREADS // 32) * 4  # = kStaticSmem
    for k in ext:
        assert k.registers * THREADS * 3 <= REGISTER_FILE, f"sm_{k.arch} {k.name}: {k.registers} registers"
        own = k.shared - (1024 if k.arch.startswith("90") else 0)
        assert 0 < own <= static_smem, f"sm_{k.arch} {k.name}: {k.shared} bytes of static shared memory"


def test_persistent_kernels_use_tensor_cores(kernels):
    expected = {"__half": "HMMA.16816.F32", "__nv_bfloat16": "HMMA.16816.F32.BF16", "float": "HMMA.1688.F32.TF32"}
    for k in _persistent(kernels):
        dtype = re.search(r"<(\w+),", k.name).group(1)
        if k.arch == "80" and k.name.endswith("true>"):
            # Cluster kernels need sm_90: below it their body is compiled out (the planner never picks them).
            assert k.hmma == 0 and len(k.sass) < 64, f"sm_80 {k.name} should be a stub"
            continue
        ops = [line for line in k.sass if "HMMA" in line]
        assert ops and all(expected[dtype] in line for line in ops), \
            f"sm_{k.arch} {k.name}: {len(ops)} HMMA, expected {expected[dtype]}"
        # A and B fragments come from shared memory as 16-byte loads (the K-permuted fragment layout).
        assert any("LDS.128" in line for line in k.sass), f"sm_{k.arch} {k.name}: no 16-byte shared loads"


def _plan_op():
    """The planner of csrc/cuda/rnn_persistent.cu: from the CUDA build, else from its emulated build (the same
    source compiled as host C++, fusedrnn._C_emu), so that the plans are checked wherever the suite runs."""
    try:
        import fusedrnn  # noqa: F401  (loads the extensions and their op registrations)
    except ImportError:
        return None
    for name in ("cuda_rnn_persistent_plan", "cuda_emu_rnn_persistent_plan"):
        if hasattr(torch.ops.fusedrnn, name):
            return getattr(torch.ops.fusedrnn, name)
    return None


PLAN = _plan_op()
needs_plan = pytest.mark.skipif(PLAN is None, reason="fusedrnn extension built without its CUDA kernels or their emulated build")


def _plans(device):
    for path in ("persistent", "cluster"):
        for direction in ("forward", "backward"):
            for cell in CELLS:
                for dtype in DTYPES:
                    for B in BATCHES:
                        for H in HIDDENS:
                            why, plan = PLAN(path, direction, cell, dtype, B, H, DEVICES[device])
                            yield (path, direction, cell, dtype, B, H), why, plan


@needs_plan
@pytest.mark.parametrize("device", list(DEVICES))
def test_every_plan_fits_the_device(device, kernels):
    sms, smem_limit, cc = DEVICES[device]
    static = {k.name: k.shared for k in _persistent(kernels)}
    planned = refused = 0
    for (path, direction, cell, dtype, B, H), why, plan in _plans(device):
        key = f"{device} {path} {direction} {cell} {dtype} B{B} H{H}"
        if why:
            refused += 1
            assert not plan
            continue
        planned += 1
        ctas, groups, units, m_tiles, warps_m, warps_k, k_padded, chunk, smem, group_rows = plan
        assert smem + max(static.values()) <= min(smem_limit, 227 * 1024), key
        assert warps_m * warps_k == 8 and m_tiles <= 4 * warps_m, key
        assert chunk % 8 == 0 and 8 <= chunk <= 32 and k_padded % 32 == 0, key
        rows = units if direction == "backward" else GATES[cell] * units
        assert m_tiles == -(-rows // 16), key
        assert (groups - 1) * group_rows < B <= groups * group_rows, key
        assert units * min(B, group_rows) <= SLOTS * THREADS, key  # the state of a CTA's items lives in registers
        if path == "persistent":  # cooperative: every CTA of every group on its own SM; one poll thread per CTA
            assert ctas * groups <= sms and ctas <= THREADS and (ctas - 1) * units < H <= ctas * units, key
            assert group_rows == B or (group_rows % 8 == 0 and chunk <= group_rows), key
        else:
            assert cc >= 9 and ctas in (1, 2, 4, 8, 16) and group_rows == chunk, key
            assert units * (2 if dtype != torch.float32 else 4) % 16 == 0, key  # 16-byte DSMEM copies
    assert planned and refused


@needs_plan
def test_known_plans_and_reasons():
    h100 = DEVICES["H100"]
    # The case where cuDNN runs persistent (fp16 LSTM H=768 B=16): both directions fit the cooperative grid.
    for direction in ("forward", "backward"):
        why, plan = PLAN("persistent", direction, "lstm", torch.float16, 16, 768, h100)
        assert why == "" and plan[8] <= 227 * 1024  # smem_bytes
    # W_hh of an fp16 LSTM with H=512 (2 MB) fits one cluster; H=2048 (32 MB) fits neither path.
    assert PLAN("cluster", "forward", "lstm", torch.float16, 16, 512, h100)[0] == ""
    why, _ = PLAN("persistent", "forward", "lstm", torch.float16, 16, 2048, h100)
    assert "shared memory" in why
    assert "sm_90" in PLAN("cluster", "forward", "gru", torch.float16, 16, 256, DEVICES["A100"])[0]
