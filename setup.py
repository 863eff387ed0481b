"""Build torch_xmc: C kernels (ops/) -> static library, C++ glue (bindings/) -> the extension torch_xmc._C.

The C kernels are compiled by the C compiler as real C11 (torch's build would compile them as C++), then
linked into one extension with the LibTorch glue. CUDA is chosen at build time, never by probing a GPU:
it is built when torch has CUDA and nvcc is found, unless TORCH_XMC_CUDA=0 (force off) or =1 (force on).
"""
import glob
import os
import re
import sys

from setuptools import setup
from setuptools.command.build_clib import build_clib
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
C_FLAGS = ["-std=c11", "-O3", "-fPIC", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
CXX_FLAGS = ["-O3"]


def with_cuda():
    force = os.environ.get("TORCH_XMC_CUDA")
    if force is not None:
        return force == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


class BuildExt(cpp_extension.BuildExtension):
    """Build the C kernel library first, then link it into the extension."""

    def run(self):
        self.run_command("build_clib")
        clib = self.get_finalized_command("build_clib")
        for ext in self.extensions:
            ext.library_dirs.append(os.path.abspath(clib.build_clib))
        super().run()


class BuildCLib(build_clib):
    def build_libraries(self, libraries):
        # distutils passes only "cflags"; extra flags go through the compiler's own list
        for _, info in libraries:
            info.setdefault("cflags", C_FLAGS)
        super().build_libraries(libraries)


cuda = with_cuda()
if cuda:
    # No GPU is probed at build time; Hopper is the target. Hopper is built as sm_90a, whose warpgroup MMA
    # (wgmma) the fused loss's one-pass kernel needs: "9.0" in the list becomes "9.0a" (the same chips).
    arches = [a for a in re.split(r"[;,\s]+", os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")) if a]
    arches = ["9.0a" + a[3:] if a.startswith("9.0") and not a.startswith("9.0a") else a for a in arches]
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(arches)
    SM90A = any(a.startswith("9.0a") for a in arches)

# Link the shared libstdc++ that torch itself uses. A toolchain that ships only a static libstdc++ (seen on the GPU
# machine: /opt/gcc) would otherwise embed a second copy whose locale is never initialised, and the first error
# message that formats a number segfaults.
SHARED_LIBSTDCXX = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []

# Rebuild when any kernel source or header changes, not only the files compiled directly.
C_DEPENDS = rel("ops/*.h") + rel("ops/cpu/*.h") + rel("ops/cpu/*.inc")
sources = rel("bindings/*.cpp")
if not cuda:
    sources = [s for s in sources if not s.endswith("_cuda.cpp")]
Extension = cpp_extension.CppExtension
extra = {"cxx": CXX_FLAGS}
define_macros = []
if cuda:
    Extension = cpp_extension.CUDAExtension
    sources += rel("ops/cuda/*.cu")
    extra["nvcc"] = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]
    if SM90A:
        extra["nvcc"].append("-DXMC_SM90A")
    define_macros.append(("TORCH_XMC_WITH_CUDA", "1"))

setup(
    name="torch_xmc",
    version="0.1.0",
    description="Group-shared fixed fan-in sparse output layers for extreme multi-label classification",
    packages=["torch_xmc"],
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "tqdm"],
    libraries=[("xmc_cpu", {"sources": rel("ops/cpu/*.c"), "include_dirs": ["ops"], "cflags": C_FLAGS,
                            "obj_deps": {"": C_DEPENDS}})],
    ext_modules=[
        Extension(
            "torch_xmc._C",
            sources,
            include_dirs=[os.path.join(ROOT, "ops")],
            libraries=["xmc_cpu"],
            depends=rel("ops/cpu/*.c") + C_DEPENDS + rel("bindings/*.h") + rel("ops/cuda/*.cuh"),
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"] + SHARED_LIBSTDCXX,
        )
    ],
    cmdclass={"build_clib": BuildCLib, "build_ext": BuildExt.with_options(use_ninja=True)},
    zip_safe=False,
)
