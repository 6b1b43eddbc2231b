"""Builds fusedrnn and its extension fusedrnn._C.

    pip install --no-build-isolation -e .      (torch must be installed first)

The extension always holds the C++ CPU kernels (csrc/**/*.cpp). The CUDA kernels (csrc/**/*.cu) are added
when torch is a CUDA build and a CUDA toolkit is found. Environment:
    FUSEDRNN_BUILD_CUDA=1|0     force the CUDA kernels on (error if impossible) or off; default: auto
    FUSEDRNN_CUDA_ARCHS="80;90a" GPU archs to build (SASS for each, PTX for the last without its arch-specific
                                suffix, 90a -> compute_90, which newer GPUs can JIT); default "80;90a"
    FUSEDRNN_SKIP_EXTENSION=1   pure-Python install (reference backend, and Triton if present)
    FUSEDRNN_PTXAS_VERBOSE=1    print registers / spills / shared memory of every CUDA kernel
    FUSEDRNN_BUILD_EMU=1|0      the emulated CUDA backend fusedrnn._C_emu ("cuda-emu": the CUDA kernels built
                                as host C++, run on CPU tensors; csrc/emu/); default: on Linux with g++ and
                                the CUDA headers (toolkit or pip's nvidia wheels)
    MAX_JOBS                    parallel compile jobs (default: number of cores)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    value = os.environ.get(name, "").strip().lower()
    return {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}.get(value)


def _cuda_arch_flags(archs):
    flags = []
    for arch in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    # PTX for newer GPUs: compute_90a (arch-specific) PTX runs on sm_90 only, compute_90 JITs to anything newer.
    ptx = archs[-1].rstrip("af")
    flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return flags


def extensions():
    if _flag("FUSEDRNN_SKIP_EXTENSION"):
        return [], {}
    # torch guesses /usr/local when CUDA_HOME is unset and nvcc is not on PATH; the link then fails.
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    cpp_sources = sorted(p for p in glob.glob("csrc/**/*.cpp", recursive=True) if not p.startswith("csrc/emu/"))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    want_cuda = _flag("FUSEDRNN_BUILD_CUDA")
    can_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if want_cuda and not can_cuda:
        sys.exit(f"FUSEDRNN_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda} and CUDA_HOME={CUDA_HOME}: "
                 "install a CUDA build of torch and set CUDA_HOME (e.g. /usr/local/cuda)")
    with_cuda = bool(cuda_sources) and (can_cuda if want_cuda is None else want_cuda)

    # -fopenmp: at::parallel_for is inline in ATen's headers and runs serially unless the extension itself is
    # compiled with OpenMP (measured: the 2-thread CPU kernels ran at 1-thread speed without it).
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-Wno-psabi", "-fopenmp"]
    link = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        ext = CppExtension("fusedrnn._C", cpp_sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    else:
        archs = [a.strip() for a in os.environ.get("FUSEDRNN_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
                 if a.strip()]
        archs = [a.replace(".", "") for a in archs]
        nvcc = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr", "-DFUSEDRNN_WITH_CUDA"]
        nvcc += _cuda_arch_flags(archs)
        if _flag("FUSEDRNN_PTXAS_VERBOSE"):
            nvcc.append("-Xptxas=-v")
        ext = CUDAExtension("fusedrnn._C", cpp_sources + cuda_sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx + ["-DFUSEDRNN_WITH_CUDA"], "nvcc": nvcc},
                            extra_link_args=link)
        # No -lcublas: pip's CUDA wheels ship only libcublas.so.13, which libtorch_cuda (linked above)
        # already depends on, so cuBLAS symbols resolve at load time through it.
    exts = [ext]
    emu = _emu_extension(CppExtension, CUDA_HOME)
    if emu is not None:
        exts.append(emu)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _cuda_headers(cuda_home):
    """A directory with cuda_runtime.h, cuda_fp16.h, cuda_bf16.h: the toolkit's, else pip's nvidia wheel's."""
    candidates = [os.path.join(cuda_home, "include")] if cuda_home else []
    try:
        import nvidia
        candidates += [os.path.join(p, sub, "include") for p in nvidia.__path__ for sub in ("cu13", "cu12", "cuda_runtime")]
    except ImportError:
        pass
    for d in candidates:
        if all(os.path.exists(os.path.join(d, h)) for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")):
            return d
    return None


def _emu_extension(CppExtension, cuda_home):
    """fusedrnn._C_emu: csrc/cuda's kernels and op layer compiled as host C++ with csrc/emu (backend cuda-emu)."""
    want = _flag("FUSEDRNN_BUILD_EMU")
    headers = _cuda_headers(cuda_home)
    can = sys.platform.startswith("linux") and headers is not None
    if want and not can:
        sys.exit("FUSEDRNN_BUILD_EMU=1 needs Linux and the CUDA headers (a CUDA toolkit, or pip's nvidia-cuda-runtime)")
    if not (can if want is None else want):
        return None
    cxx = ["-O2", "-std=c++20", "-fvisibility=hidden", "-Wno-psabi", "-Wno-unknown-pragmas", "-DFUSEDRNN_EMU"]
    # -Bsymbolic: the CUDA runtime calls of the kernels' host code must bind to csrc/emu/emu.cpp's, not to the
    # libcudart that torch has loaded (else every launch fails with error 35).
    link = ["-Wl,-Bsymbolic", "-pthread"]
    # Fibers on Boost.Context (Debian libboost-context-dev) when present; ucontext (~9x slower switches) else.
    import ctypes.util
    boost = os.path.exists("/usr/include/boost/context/detail/fcontext.hpp") and ctypes.util.find_library("boost_context")
    if boost:
        link.append("-lboost_context")
    else:
        cxx.append("-DFUSEDRNN_EMU_UCONTEXT")
        print("fusedrnn: building the emulated CUDA backend with ucontext fibers (apt-get install libboost-context-dev "
              "for ~9x faster ones)", file=sys.stderr)
    sources = sorted(glob.glob("csrc/emu/*.cpp"))
    # csrc/emu/include first: its cooperative_groups.h replaces the toolkit's.
    include_dirs = [os.path.join(ROOT, "csrc", "emu", "include"), os.path.join(ROOT, "csrc"), headers]
    return CppExtension("fusedrnn._C_emu", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                        extra_link_args=link)


ext_modules, cmdclass = extensions()

setup(
    name="fusedrnn",
    version="0.1.0",
    description="Drop-in torch.nn.LSTM/GRU/RNN on fused CUDA, Triton and C++ kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fusedrnn", "fusedrnn.*"]),
    package_data={"fusedrnn": ["dispatch_tables/*.json"]},  # the measured dispatch tables (backends/table.py)
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={
        "test": ["pytest", "numpy", "scipy", "matplotlib", "hypothesis", "expecttest",
                 "onnx", "onnxscript", "onnxruntime"],
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
        "bench": ["matplotlib", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["fusedrnn-bench=fusedrnn.bench.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
