"""The JIT provider of the `cuda` backend: csrc/cuda compiled at run time with NVRTC
(through CuPy's bindings), for exactly the current GPU's architecture, cached on disk
(posattn/kernels/cuda_jit_cache.py) and launched with CuPy's driver bindings on torch's
current stream, torch tensors passed by pointer.

The sources are the nvcc build's own (.cu files whose host launchers are hidden from
NVRTC by `#if !defined(__CUDACC_RTC__)`); the kernels compiled are those of
cuda_jit_catalogue.CATALOGUE. Nothing here needs a GPU except `module()` and launches.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from posattn.kernels import cuda_jit_cache
from posattn.kernels.cuda_jit_catalogue import ALL_ARCHS, CATALOGUE

OPTIONS = ("-std=c++17", "-default-device", "-diag-suppress=177")  # no fast math: the angle code needs IEEE
_PKG = Path(__file__).resolve().parent.parent


def source_root() -> Path:
    """csrc/ holding include/posattn and cuda/: the copy shipped in the package
    (posattn/_csrc, made by setup.py's build_py) or the source checkout's."""
    for root in (_PKG / "_csrc", _PKG.parent / "csrc"):
        if (root / "cuda").is_dir() and (root / "include" / "posattn").is_dir():
            return root
    raise FileNotFoundError("posattn: the CUDA sources (csrc/cuda, csrc/include) are not installed")


def source_files(root: Path | None = None) -> list[Path]:
    root = root or source_root()
    files = [p for p in (root / "include" / "posattn").glob("*.h")]
    files += [p for p in (root / "cuda").iterdir() if p.suffix in (".cu", ".cuh", ".h")]
    return sorted(files)


def source_hash(root: Path | None = None) -> str:
    """sha256 over every CUDA source and header (name and contents)."""
    root = root or source_root()
    h = hashlib.sha256()
    for p in source_files(root):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\1")
    return h.hexdigest()


def nvrtc():
    """CuPy's NVRTC bindings; ImportError saying what to install when absent."""
    try:
        from cupy_backends.cuda.libs import nvrtc as n
    except ImportError as e:
        raise ImportError("posattn's CUDA JIT needs CuPy with NVRTC: pip install 'posattn[cuda-jit]' "
                          "(cupy-cuda13x, or cupy-cuda12x for a CUDA 12 driver)") from e
    return n


def nvrtc_version() -> tuple[int, int]:
    return tuple(nvrtc().getVersion())


def check_arch(arch: str) -> str:
    if not re.fullmatch(r"sm_\d{2,3}[af]?", arch):
        raise ValueError(f"arch: expected a real architecture such as 'sm_90a' or 'sm_100a', got {arch!r}")
    if int(re.sub(r"\D", "", arch)) < 80:
        raise ValueError(f"arch: the CUDA kernels need sm_80 or newer (bf16 conversions), got {arch!r}")
    return arch


def compile_source(source: str, arch: str, root: Path | None = None) -> tuple[dict, bytes]:
    """NVRTC-compile csrc/cuda/<source> for `arch`: ({"names": {expression: mangled}, ...}, cubin)."""
    n = nvrtc()
    root = root or source_root()
    names = CATALOGUE[source]
    prog = n.createProgram((root / "cuda" / source).read_text(), source, [], [])
    try:
        for e in names:
            n.addNameExpression(prog, e)
        opts = [f"-arch={arch}", f"-I{root / 'include'}", f"-I{root / 'cuda'}", *OPTIONS]
        t0 = time.perf_counter()
        try:
            n.compileProgram(prog, opts)
        except Exception as e:
            raise RuntimeError(f"posattn: NVRTC failed on csrc/cuda/{source} for {arch}:\n"
                               f"{n.getProgramLog(prog)}") from e
        secs = time.perf_counter() - t0
        lowered = {e: n.getLoweredName(prog, e) for e in names}
        return {"names": lowered, "arch": arch, "source": source, "compile_s": round(secs, 3),
                "nvrtc": list(n.getVersion())}, _get_cubin(n, prog)
    finally:
        n.destroyProgram(prog)


def _get_cubin(n, prog) -> bytes:
    """The whole cubin of an NVRTC program. CuPy 14.2's getCUBIN returns one byte short (it
    drops the last byte, a NUL, as if the image were a C string): cuobjdump then reports
    "does not contain device code". So ask libnvrtc (already loaded by CuPy) directly, and
    check the length against the ELF header."""
    import ctypes

    size = ctypes.c_size_t()
    try:
        lib = ctypes.CDLL(f"libnvrtc.so.{n.getVersion()[0]}")
        if lib.nvrtcGetCUBINSize(ctypes.c_void_p(prog), ctypes.byref(size)) != 0:
            raise OSError("nvrtcGetCUBINSize failed")
        buf = ctypes.create_string_buffer(size.value)
        if lib.nvrtcGetCUBIN(ctypes.c_void_p(prog), buf) != 0:
            raise OSError("nvrtcGetCUBIN failed")
        blob = buf.raw
    except OSError:  # libnvrtc not loadable by soname here: CuPy's copy, completed below
        blob = bytes(n.getCUBIN(prog))
    return _elf_complete(blob)


def _elf_complete(blob: bytes) -> bytes:
    """Pad an ELF image cut short before its section headers end (the CuPy truncation)."""
    import struct

    if blob[:4] != b"\x7fELF" or len(blob) < 64:
        raise RuntimeError("posattn: NVRTC returned something that is not an ELF cubin")
    phoff, shoff = struct.unpack_from("<QQ", blob, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", blob, 54)
    end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    return blob + b"\0" * (end - len(blob)) if 0 < end - len(blob) <= 8 else blob


def cubin(source: str, arch: str, directory: Path | None = None) -> tuple[dict, bytes, str]:
    """(header, cubin, "hit" | "miss" | "corrupt") through the on-disk cache."""
    check_arch(arch)
    root = source_root()
    key = cuda_jit_cache.entry_key(source_hash(root), source, arch, nvrtc_version(), OPTIONS,
                                   CATALOGUE[source])
    return cuda_jit_cache.load_or_build(key, lambda: compile_source(source, arch, root), directory)


def compile_all(archs, directory: Path | None = None) -> list[dict]:
    """Compile (or find cached) every catalogued kernel for each arch: one row per (source, arch)."""
    rows = []
    for arch in archs:
        for source in CATALOGUE:
            t0 = time.perf_counter()
            header, blob, how = cubin(source, arch, directory)
            rows.append({"arch": arch, "source": source, "how": how, "seconds": time.perf_counter() - t0,
                         "names": header["names"], "cubin": blob})
    return rows


# ---------------------------------------------------------------------------
# cuobjdump (triton ships one): symbols and per-kernel resources of a cubin

def cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(p) if p.exists() else None
    except ImportError:
        return None


def resource_usage(blob: bytes) -> dict[str, dict]:
    """{mangled kernel name: {"registers": int, "shared": bytes, "stack": bytes}} from
    `cuobjdump --dump-resource-usage` of the cubin."""
    tool = cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (install triton, or put a CUDA toolkit's on PATH)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(blob)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage, name = {}, None
    for line in out.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", line)
        if m and name:
            usage[name] = {"registers": int(m.group(1)), "stack": int(m.group(2)), "shared": int(m.group(3))}
            name = None
    return usage


# ---------------------------------------------------------------------------
# run time (GPU): load a module per (source, device) and launch

def device_arch(index: int) -> str:
    """The real architecture of torch device `index`, with the arch-specific suffix
    (sm_90a, sm_100a) for 9.0 and newer, whose kernels must match it exactly."""
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}" + ("a" if major >= 9 else "")


@lru_cache(maxsize=None)
def module(source: str, index: int):
    """(cupy Module, {expression: mangled}) of csrc/cuda/<source> for device `index`."""
    import cupy

    header, blob, _ = cubin(source, device_arch(index))
    with cupy.cuda.Device(index):
        mod = cupy.cuda.function.Module()
        mod.load(blob)
    return mod, header["names"]


def status() -> tuple[bool, str]:
    """(usable, why not) of the JIT provider, without compiling anything."""
    try:
        import cupy  # noqa: F401

        nvrtc_version()
    except Exception as e:  # ImportError, or a CuPy whose libnvrtc is missing
        return False, f"CuPy/NVRTC unavailable: {e}"
    try:
        source_root()
    except FileNotFoundError as e:
        return False, str(e)
    return True, ""


def versions() -> dict:
    out = {}
    try:
        import cupy

        out["cupy"] = cupy.__version__
        out["nvrtc"] = ".".join(map(str, nvrtc_version()))
    except Exception:
        pass
    return out
