"""Builds posattn._C (C++ CPU kernels, always) and posattn._cuda (CUDA kernels,
when nvcc is found; POSATTN_CUDA=0|1|auto overrides).

Neither module links against torch: tensors cross the boundary as raw
pointers and strides, so a wheel does not depend on torch's C++ ABI.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from setuptools.command.build_py import build_py
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
INCLUDE = [str(CSRC / "include"), str(CSRC)]
# headers and included bodies: a change to any of them rebuilds the modules (setuptools
# otherwise compares only the sources' times with the built module's)
HEADERS = sorted(str(p.relative_to(ROOT)) for ext in ("*.h", "*.inc", "*.cuh") for p in CSRC.rglob(ext))

# CUDA architectures: real code for Ampere and Hopper (sm_90a for wgmma-era
# features), plus PTX of the newest so that later GPUs can JIT it.
def cuda_archs() -> list[str]:
    """The real architectures posattn._cuda carries code for (POSATTN_CUDA_ARCHS, default 80,90a)."""
    return [a.strip() for a in os.environ.get("POSATTN_CUDA_ARCHS", "80,90a").split(",") if a.strip()]


def cuda_gencode():
    """Real code for Ampere and Hopper (sm_90a for wgmma-era features), plus PTX
    so later GPUs can JIT it. POSATTN_CUDA_ARCHS=90a (comma list) narrows the
    build, e.g. for a quick build on a known GPU."""
    archs = cuda_archs()
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=lambda a: int(a.rstrip("a")))
    ptx = newest.rstrip("a")
    return flags + [f"-gencode=arch=compute_{ptx},code=compute_{ptx}"]


DEFAULT_CUDA_HOME = "/usr/local/cuda"


def find_nvcc():
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and (Path(env) / "bin" / "nvcc").exists():
        return str(Path(env) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path(DEFAULT_CUDA_HOME) / "bin" / "nvcc"
    return str(default) if default.exists() else None


def find_cuda_home(nvcc):
    """The toolkit root holding include/cuda_runtime.h (nvcc may be a wrapper), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), DEFAULT_CUDA_HOME,
                  str(Path(nvcc).resolve().parent.parent)]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    return None


def cuda_toolkit():
    """(nvcc, CUDA home) to build posattn._cuda with, or None for a CPU-only build.

    POSATTN_CUDA=0: None. POSATTN_CUDA=1: both must be found (SystemExit otherwise).
    auto (default): None, with a warning, when nvcc is missing or found without the CUDA
    headers (a runtime-only image, a stray wrapper); the CPU module still builds.
    """
    mode = os.environ.get("POSATTN_CUDA", "auto").lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"POSATTN_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        print("posattn: POSATTN_CUDA=0; building without posattn._cuda", flush=True)
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "1":
            raise SystemExit("POSATTN_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        print("posattn: nvcc not found; building without posattn._cuda (CPU kernels only)", flush=True)
        return None
    home = find_cuda_home(nvcc)
    if home is None:
        why = f"found nvcc at {nvcc} but no CUDA toolkit with include/cuda_runtime.h (set CUDA_HOME)"
        if mode == "1":
            raise SystemExit(f"POSATTN_CUDA=1: {why}")
        print(f"posattn: warning: {why}; building without posattn._cuda (CPU kernels only)",
              file=sys.stderr, flush=True)
        return None
    return nvcc, home


class BuildExt(build_ext):
    """build_ext that compiles .cu sources with nvcc before the normal link."""

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if cu_sources:
            nvcc = ext.nvcc
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            out_dir = Path(self.build_temp) / "cuda"
            out_dir.mkdir(parents=True, exist_ok=True)
            gencode = cuda_gencode()

            def compile_one(src):
                obj = out_dir / (Path(src).stem + ".o")
                cmd = [
                    nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17",
                    "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
                    "-Xcompiler", "-fvisibility=hidden",
                    *[f"-I{p}" for p in INCLUDE], *gencode,
                ]
                print(" ".join(cmd), flush=True)
                subprocess.check_call(cmd)
                return str(obj)

            # one nvcc per .cu file, in parallel (they are independent)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=max(1, min(len(cu_sources), os.cpu_count() or 1))) as pool:
                objects = list(pool.map(compile_one, cu_sources))
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


class BuildPyWithSources(build_py):
    """Also ship csrc/include/posattn and csrc/cuda as posattn/_csrc in the wheel: the NVRTC
    provider (posattn/kernels/cuda_jit.py) compiles them at run time when posattn._cuda was
    not built (no nvcc at install) or does not cover the GPU."""

    def run(self):
        super().run()
        dest = Path(self.build_lib) / "posattn" / "_csrc"
        for sub in ("include/posattn", "cuda"):
            for src in sorted((CSRC / sub).iterdir()):
                if src.suffix in (".h", ".cuh", ".cu"):
                    out = dest / sub / src.name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    self.copy_file(str(src), str(out))


def extensions():
    exts = [
        Pybind11Extension(
            "posattn._C",
            # every .cpp under csrc/cpu joins the CPU module; bind_cpu.cpp binds them
            sources=["csrc/bind_cpu.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cpu").glob("*.cpp")),
            depends=HEADERS,
            include_dirs=INCLUDE,
            cxx_std=17,
            extra_compile_args=["-O3", "-fopenmp", "-march=x86-64-v2"]
            if sys.platform.startswith("linux") and os.uname().machine == "x86_64"
            else ["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        ),
        # the NVRTC provider's host side (launch decisions, argument packing): no CUDA needed
        Pybind11Extension(
            "posattn._cuda_jit_host",
            sources=["csrc/bind_cuda_jit.cpp"],
            depends=HEADERS,
            include_dirs=INCLUDE,
            cxx_std=17,
            extra_compile_args=["-O2"],
        ),
    ]
    toolkit = cuda_toolkit()
    if toolkit:
        nvcc, cuda_home = toolkit
        ext = Pybind11Extension(
            "posattn._cuda",
            sources=["csrc/bind_cuda.cpp"] + sorted(str(p.relative_to(ROOT)) for p in (CSRC / "cuda").glob("*.cu")),
            depends=HEADERS,
            include_dirs=INCLUDE + [str(cuda_home / "include")],
            cxx_std=17,
            extra_compile_args=["-O3"],
            library_dirs=[str(cuda_home / d) for d in ("lib64", "lib", "targets/x86_64-linux/lib")
                          if (cuda_home / d).exists()],
            # static cudart: the module needs only the driver (libcuda) at run time,
            # and that is loaded lazily by cudart, so import works without a GPU.
            libraries=["cudart_static", "rt", "pthread", "dl"],
            # the architectures with real code, so that posattn.kernels.cuda can tell whether
            # this module covers a GPU (else the NVRTC provider serves it)
            define_macros=[("POSATTN_CUDA_ARCHS", '"' + ",".join(cuda_archs()) + '"')],
        )
        ext.nvcc = nvcc
        exts.append(ext)
    return exts


if __name__ == "__main__":  # setuptools (pip, build_meta) runs this file as __main__; tests import it
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt, "build_py": BuildPyWithSources})
