"""Builds convmixer_kernels._C against the torch already installed (use --no-build-isolation).

The C++ sources (op schemas, CPU kernels) are always built. The CUDA launchers in csrc/cuda/
are built too when this torch has CUDA and nvcc is found; architectures come from
TORCH_CUDA_ARCH_LIST (default 9.0, i.e. sm_90 for Hopper).
"""
import glob
import os
import platform
import subprocess

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # pragma: no cover - a build-time message, not a code path
    raise SystemExit(
        "convmixer_kernels builds against an installed torch: install torch first, then run "
        "'pip install --no-build-isolation .'"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpu_isa_flags():
    """The ISA flags of the CPU kernels: AVX-512 or AVX2 lanes for ATen's Vectorized when the build
    machine has them (16 or 8 floats a vector), portable code otherwise.

    ATen picks its Vectorized implementation from the CPU_CAPABILITY macros at compile time; the
    extension is built where it runs (pip builds from source), and the package refuses to load on
    a CPU without the ISA it was built for. CONVMIXER_CPU_ISA=avx2 or default (portable) overrides
    the choice, e.g. to build for an older CPU than the build machine's.
    """
    choice = os.environ.get("CONVMIXER_CPU_ISA", "auto")
    if choice == "default" or platform.machine() not in ("x86_64", "AMD64"):
        return [], "default"
    capability = torch.backends.cpu.get_cpu_capability()
    if choice == "auto":
        choice = {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "default")
    if choice == "avx512":
        # The flags torch builds its own AVX512 kernels with.
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"], "avx512"
    if choice == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"], "avx2"
    if choice != "default":
        raise SystemExit(f"CONVMIXER_CPU_ISA must be auto, avx512, avx2 or default, got {choice!r}")
    return [], "default"


def want_cuda():
    if os.environ.get("CONVMIXER_WITH_CUDA", "1") == "0":
        return False, "CONVMIXER_WITH_CUDA=0"
    if torch.version.cuda is None:
        return False, "this torch has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, ""


def extension():
    isa_flags, isa = cpu_isa_flags()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp", f"-DCONVMIXER_CPU_ISA=\"{isa}\""] + isa_flags
    with_cuda, why_not = want_cuda()
    # The torch launchers and the kernels' instantiation units (torch-free, split so that the
    # CUDA code builds on many cores).
    cuda_sources = (sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/instances/*.cu"))
                    if with_cuda else [])
    if with_cuda:
        # No --use_fast_math: erf-GELU and the statistics must match eager to fp32 accuracy.
        nvcc = ["-O3", "-std=c++17", "-lineinfo"]
        if os.environ.get("CONVMIXER_PTXAS_VERBOSE"):
            nvcc.append("-Xptxas=-v")  # registers and spills per kernel in the build log
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        print(f"convmixer_kernels: building CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST="
              f"{os.environ['TORCH_CUDA_ARCH_LIST']} ({len(cuda_sources)} CUDA sources)")
        return cpp_extension.CUDAExtension(
            "convmixer_kernels._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("CONVMIXER_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    print(f"convmixer_kernels: building CPU-only ({why_not}); CPU kernels use ISA '{isa}'")
    return cpp_extension.CppExtension(
        "convmixer_kernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["convmixer_kernels", "convmixer_kernels.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
