"""The `cuda` backend: CUDA C++ kernels (csrc/cuda; pointers and stream as integers) from one
of two providers, chosen per process on the first launch:

  prebuilt  posattn._cuda, built by nvcc at install time, when it carries real code for
            this GPU's architecture (setup.py POSATTN_CUDA_ARCHS, default sm_80, sm_90a);
  jit       the same sources compiled with NVRTC for exactly this GPU, through CuPy
            (posattn/kernels/cuda_jit*.py; `pip install posattn[cuda-jit]`).

POSATTN_CUDA_PROVIDER=prebuilt|jit forces one (default auto). Same contract as
posattn.kernels.cpu (see its docstring); launches go on the current torch stream of the
tensors' device.
"""
from __future__ import annotations

import os

import torch

from posattn.kernels import native

_cuda, _why = native.load("_cuda")
_chosen: dict = {}


def prebuilt_archs() -> list[str] | None:
    """Real architectures compiled into posattn._cuda (["sm_80", "sm_90a"]); None when the
    module predates recording them or is not built."""
    if _cuda is None or not hasattr(_cuda, "archs"):
        return None
    return [f"sm_{a.strip()}" for a in str(_cuda.archs).split(",") if a.strip()]


def choose_provider(arch: str | None, want: str, prebuilt_built: bool, prebuilt: list[str] | None,
                    jit_ok: bool) -> tuple[str | None, str]:
    """(provider or None, why): the prebuilt module when it covers `arch` (a module that does
    not record its archs is taken to cover), else the JIT, else the prebuilt module anyway
    (the driver JIT-compiles its PTX), else none. `want`: auto | prebuilt | jit."""
    if want not in ("auto", "prebuilt", "jit"):
        raise ValueError(f"POSATTN_CUDA_PROVIDER: expected auto, prebuilt or jit, got {want!r}")
    if want == "prebuilt":
        return ("prebuilt", "forced by POSATTN_CUDA_PROVIDER") if prebuilt_built else (None, "posattn._cuda is not built")
    if want == "jit":
        return ("jit", "forced by POSATTN_CUDA_PROVIDER") if jit_ok else (None, "the NVRTC provider is unavailable")
    covers = prebuilt_built and (prebuilt is None or arch is None or arch in prebuilt)
    if covers:
        return "prebuilt", f"posattn._cuda has code for {arch}" if arch else "posattn._cuda is built"
    if jit_ok:
        return "jit", (f"posattn._cuda has no code for {arch} (built for {', '.join(prebuilt)})"
                       if prebuilt_built else "posattn._cuda is not built")
    if prebuilt_built:
        return "prebuilt", f"posattn._cuda has no code for {arch}; its PTX is JIT-compiled by the driver"
    return None, "neither posattn._cuda nor the NVRTC provider is available"


def provider(index: int | None = None) -> tuple[str | None, str]:
    """(provider, why) serving device `index` (the current device by default)."""
    from posattn.kernels import cuda_jit

    want = os.environ.get("POSATTN_CUDA_PROVIDER", "auto").strip().lower() or "auto"
    arch = None
    if torch.cuda.is_available():
        arch = cuda_jit.device_arch(torch.cuda.current_device() if index is None else index)
    key = (want, arch)
    if key not in _chosen:
        _chosen[key] = choose_provider(arch, want, _cuda is not None, prebuilt_archs(), cuda_jit.status()[0])
    return _chosen[key]


_jit_module = None


def providers_info() -> dict:
    """For `posattn info`: which provider serves, each provider's state and why not, and the
    NVRTC / CuPy versions."""
    from posattn.kernels import cuda_jit

    jit_ok, jit_why = cuda_jit.status()
    out = {"prebuilt": ("built for " + ", ".join(prebuilt_archs() or ["(archs not recorded)"])) if _cuda is not None
           else f"unavailable: {_why}",
           "jit": ("available, " + ", ".join(f"{k} {v}" for k, v in cuda_jit.versions().items())) if jit_ok
           else f"unavailable: {jit_why}"}
    try:
        name, why = provider()
        out["serving"] = f"{name}: {why}" if name else f"none: {why}"
    except Exception as e:  # a bad POSATTN_CUDA_PROVIDER, a device error
        out["serving"] = f"none: {e}"
    if not torch.cuda.is_available():
        out["serving"] = "none: no CUDA device (would be: " + out["serving"] + ")"
    return out


def status() -> tuple[bool, str]:
    if _cuda is None:
        from posattn.kernels import cuda_jit

        ok, why = cuda_jit.status()
        if not ok:
            return False, f"{_why}; NVRTC provider: {why}"
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible to torch (posattn._cuda not built; the NVRTC provider needs a GPU)"
        return True, ""
    return status_from(probe())


def probe() -> dict:
    """What the module and torch see: device count, the CUDA version the driver supports and
    the one the module was built with (cudaDriverGetVersion / cudaRuntimeGetVersion, e.g.
    12040 for 12.4; driver 0: none installed), the module's own diagnosis, torch's view."""
    return {"count": _cuda.device_count(), "driver": int(getattr(_cuda, "driver_version", lambda: 0)()),
            "runtime": int(_cuda.runtime_version()), "problem": str(getattr(_cuda, "device_problem", lambda: "")()),
            "torch": bool(torch.cuda.is_available())}


def cuda_version_text(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def status_from(p: dict) -> tuple[bool, str]:
    """(usable, why not) from a probe(): a driver older than the module's runtime is named as
    such, with both versions, rather than as "no device"."""
    if p["count"] == 0:
        drv, rt = p["driver"], p["runtime"]
        # within one major version a newer runtime runs on an older driver (CUDA's minor
        # version compatibility); across majors, or when the runtime says so, it does not
        too_old = drv > 0 and rt > drv and (rt // 1000 > drv // 1000 or "insufficient" in p["problem"].lower()
                                             or "driver supports" in p["problem"])
        if too_old:
            return False, (f"posattn._cuda was built with CUDA {cuda_version_text(rt)} (runtime {rt}), which needs a "
                           f"driver supporting CUDA {cuda_version_text(rt)} or newer; the installed driver supports "
                           f"CUDA {cuda_version_text(drv)} (driver version {drv}): update the driver, or rebuild "
                           "posattn with a CUDA toolkit the driver supports (CUDA_HOME=... pip install -e .)")
        if drv == 0 and not p["torch"]:
            return False, "posattn._cuda is built but no CUDA driver is installed (no GPU here)"
        return False, ("posattn._cuda is built but no CUDA device is visible"
                       + (f" ({p['problem']})" if p["problem"] else "")
                       + (f"; driver supports CUDA {cuda_version_text(drv)}, runtime is {cuda_version_text(rt)}"
                          if drv > 0 else ""))
    if not p["torch"]:
        return False, "torch cannot see a CUDA device (CPU build of torch?)"
    return True, ""


def built() -> bool:
    """posattn._cuda (the prebuilt provider) is importable."""
    return _cuda is not None


def module():
    """The serving provider's module: posattn._cuda, or the NVRTC provider's stand-in with the
    same functions (posattn.kernels.cuda_jit_launch.JitModule)."""
    global _jit_module
    name, why = provider()
    if name == "jit":
        if _jit_module is None:
            from posattn.kernels.cuda_jit_launch import JitModule

            _jit_module = JitModule()
        return _jit_module
    if name is None and _cuda is None:
        raise RuntimeError(f"posattn: no CUDA C++ provider: {why}")
    return _cuda


def _launch(q, qo, k, ko, rotary_dim, interleaved, sign, config, pos=(), freqs=(), scaling=1.0, angles=()):
    x, xo = native.pick(q, qo, k, ko)
    if x is None:
        return
    stream = torch.cuda.current_stream(x.device).cuda_stream
    with torch.cuda.device(x.device):
        module().rope_forward(
            native.rope_tensor_args(q, qo), native.rope_tensor_args(k, ko),
            native.dims_args(x, rotary_dim, interleaved, native.copies_tail(x, xo, rotary_dim)),
            list(pos), list(freqs), float(scaling), list(angles), float(sign),
            native.DTYPE_CODE[x.dtype], int(config.get("threads", 128)), stream)


def rope_forward(q, qo, k, ko, pos3, tables, rotary_dim: int, interleaved: bool, sign: float,
                 config: dict):
    _launch(q, qo, k, ko, rotary_dim, interleaved, sign, config, native.pos_args(pos3),
            native.freq_args(tables), tables.attention_scaling)


def rope_angles_forward(q, qo, k, ko, angles, rotary_dim: int, interleaved: bool, sign: float,
                        config: dict):
    _launch(q, qo, k, ko, rotary_dim, interleaved, sign, config, angles=native.angle_args(angles))


# ---------------------------------------------------------------------------
# autotune search space (read by posattn.autotune through the kernel registry)

def rope_search_space(key) -> list[dict]:
    """Candidate block sizes (threads per token block) for the CUDA rope kernel."""
    return [c for c in ({"threads": t} for t in (64, 128, 256, 512, 1024)) if rope_config_ok(key, c)]


def rope_config_ok(key, config: dict) -> bool:
    """Prune: a block much wider than one token's (head, pair) grid only idles threads."""
    t = config["threads"]
    pairs = (int(key.heads_q) + int(key.heads_k)) * max(1, int(key.rotary_dim) // 2)
    return t % 32 == 0 and t <= 1024 and (t <= 128 or t <= 2 * pairs)
