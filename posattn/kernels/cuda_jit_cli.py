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
    p.add_argument("--cache-dir", help="cubin cache folder (default: POSATTN_JIT_CACHE or the user cache)")
    p.add_argument("--json", action="store_true", help="one JSON object per kernel instead of a table")
    p.set_defaults(func=_jit)


def _jit(args) -> int:
    from pathlib import Path

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
