"""The ``posattn`` command: info, list, bench, and the subcommands other
packages add (each module in _SUBCOMMAND_MODULES exposes add_parsers(sub))."""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

_SUBCOMMAND_MODULES = ("posattn.bench.cli", "posattn.autotune.cli")


def _info(args) -> int:
    import torch

    import posattn
    from posattn import dispatch

    info = {
        "posattn": posattn.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # pragma: no cover
        info["triton"] = f"not importable: {e}"
    from posattn.kernels import cuda as ck

    if ck.built():
        info["posattn._cuda_runtime"] = ck.module().runtime_version()
    backends = {}
    for name in dispatch.BACKENDS:
        ok, why = dispatch.backend_status(name)
        backends[name] = {"usable": ok, "note" if ok else "why_not": why}
    info["backends"] = backends
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for k, v in info.items():
        if k != "backends":
            con.print(f"[bold]{k}[/bold]: {v}")
    t = Table(title="backends")
    t.add_column("backend")
    t.add_column("usable")
    t.add_column("note")
    for name, b in backends.items():
        t.add_row(name, "yes" if b["usable"] else "no", b.get("note") or b.get("why_not") or "")
    con.print(t)
    return 0


def _list(args) -> int:
    from posattn import dispatch

    rows = []
    for op, backs in sorted(dispatch.kernels().items()):
        for name in dispatch.BACKENDS:
            if name in backs:
                k = backs[name]
                ok, why = dispatch.backend_status(name)
                rows.append({"op": op, "backend": name, "dtypes": list(k.dtypes), "usable_here": ok})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title="posattn catalogue")
    for c in ("op", "backend", "dtypes", "usable here"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["op"], r["backend"], ", ".join(r["dtypes"]), "yes" if r["usable_here"] else "no")
    Console().print(t)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posattn", description="position-aware attention kernels")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="versions, device, and which backends are usable (and why not)")
    pi.add_argument("--json", action="store_true")
    pi.set_defaults(func=_info)
    pl = sub.add_parser("list", help="the catalogue: op x backend x dtypes")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=_list)
    for modname in _SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if not (e.name and modname.startswith(e.name)):
                raise
            continue
        mod.add_parsers(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError) as e:
        print(f"posattn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
