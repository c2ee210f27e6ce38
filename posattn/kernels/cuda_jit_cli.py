"""`posattn jit`: precompile the CUDA kernels with NVRTC for named architectures (no GPU
needed) into the cubin cache, and print each kernel's registers and shared memory."""
from __future__ import annotations

import json
import time


def add_parsers(sub) -> None:
    p = sub.add_parser("jit", help="precompile the CUDA C++ kernels with NVRTC (no GPU needed) and "
                                   "print registers / shared memory per kernel")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--arch", help="comma list of real architectures, e.g. sm_90a,sm_100a")
    g.add_argument("--all", action="store_true", help="every architecture of cuda_jit_catalogue.ALL_ARCHS")
    g.add_argument("--time-device", action="store_true",
                   help="on a GPU: time apply_rope through the JIT provider from an empty cubin cache "
                        "(compile + load + launch), from the disk cache (load + launch), and warm")
    p.add_argument("--cache-dir", help="cubin cache folder (default: POSATTN_JIT_CACHE or the user cache)")
    p.add_argument("--json", action="store_true", help="one JSON object per kernel instead of a table")
    p.set_defaults(func=_jit)


def _time_device(args) -> int:
    """First-call (cold cache), cached-call (disk hit, new module load) and warm-call times of
    apply_rope(backend="cuda") through the NVRTC provider, synchronised, in milliseconds."""
    import os
    import tempfile

    import torch

    import posattn
    from posattn.kernels import cuda as ck
    from posattn.kernels import cuda_jit

    if not torch.cuda.is_available():
        print("posattn jit --time-device: no CUDA device")
        return 2
    os.environ["POSATTN_CUDA_PROVIDER"] = "jit"
    os.environ["POSATTN_JIT_CACHE"] = args.cache_dir or tempfile.mkdtemp(prefix="posattn-jit-")
    q = torch.randn(1, 7, 3, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 7, 1, 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(7, device="cuda").view(1, 7)
    spec = posattn.RopeSpec(128)

    def call():
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = posattn.apply_rope(q, k, pos, spec, backend="cuda")
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3, out

    first, out = call()
    cuda_jit.module.cache_clear()  # forget the loaded module: the next call reads the disk cache
    if ck._jit_module is not None:
        ck._jit_module._funcs.clear()
    cached, _ = call()
    warm = min(call()[0] for _ in range(5))
    ref = posattn.apply_rope(q, k, pos, spec, backend="reference")
    err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(out, ref))
    print(json.dumps({"provider": ck.provider()[0], "arch": cuda_jit.device_arch(torch.cuda.current_device()),
                      "first_call_ms": round(first, 1), "cached_call_ms": round(cached, 1),
                      "warm_call_ms": round(warm, 3), "max_abs_err_vs_reference": err,
                      "cache": os.environ["POSATTN_JIT_CACHE"]}))
    return 0


def _jit(args) -> int:
    from pathlib import Path

    if args.time_device:
        return _time_device(args)

    from posattn.kernels import cuda_jit
    from posattn.kernels.cuda_jit_catalogue import ALL_ARCHS

    archs = list(ALL_ARCHS) if args.all else [a.strip() for a in args.arch.split(",") if a.strip()]
    for a in archs:
        cuda_jit.check_arch(a)
    ok, why = cuda_jit.status()
    if not ok:
        print(f"posattn jit: {why}")
        return 2
    directory = Path(args.cache_dir) if args.cache_dir else None
    t0 = time.perf_counter()
    rows = cuda_jit.compile_all(archs, directory)
    have_tool = cuda_jit.cuobjdump() is not None
    out = []
    for r in rows:
        usage = cuda_jit.resource_usage(r["cubin"]) if have_tool else {}
        for expr, mangled in r["names"].items():
            u = usage.get(mangled, {})
            out.append({"arch": r["arch"], "source": r["source"], "kernel": expr, "registers": u.get("registers"),
                        "static_smem": u.get("shared"), "stack": u.get("stack"), "cache": r["how"],
                        "seconds": round(r["seconds"], 2)})
    if args.json:
        for o in out:
            print(json.dumps(o))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"NVRTC {'.'.join(map(str, cuda_jit.nvrtc_version()))}: {len(out)} kernels, "
                        f"{time.perf_counter() - t0:.1f} s")
        for c in ("arch", "kernel", "regs", "shared (cuobjdump)", "stack", "cache"):
            t.add_column(c)
        for o in out:
            t.add_row(o["arch"], o["kernel"].replace("posattn::cuda::", "").replace("posattn::", ""),
                      str(o["registers"]), str(o["static_smem"]), str(o["stack"]), o["cache"])
        Console().print(t)
        if not have_tool:
            print("cuobjdump not found: registers and shared memory not shown (install triton)")
    return 0
