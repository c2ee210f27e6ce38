"""The ``posattn`` command: info, list, bench, and the subcommands other
packages add (each module in _SUBCOMMAND_MODULES exposes add_parsers(sub))."""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

_SUBCOMMAND_MODULES = ("posattn.bench.cli", "posattn.autotune.cli", "posattn.kernels.cuda_jit_cli")


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
        info["posattn._cuda_runtime"] = ck._cuda.runtime_version()
    info["cuda_providers"] = ck.providers_info()
    backends = {}
    for name in dispatch.BACKENDS:
        ok, why = dispatch.backend_status(name)
        backends[name] = {"usable": ok, "note" if ok else "why_not": why}
    info["backends"] = backends
    info["devices"] = _verification(dispatch)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for k, v in info.items():
        if k not in ("backends", "devices"):
            con.print(f"[bold]{k}[/bold]: {v}")
    t = Table(title="backends")
    t.add_column("backend")
    t.add_column("usable")
    t.add_column("note")
    for name, b in backends.items():
        t.add_row(name, "yes" if b["usable"] else "no", b.get("note") or b.get("why_not") or "")
    con.print(t)
    v = Table(title="verified here (a tuned entry or shipped config checked against the fp64 reference)")
    for c in ("device", "backend", "verified", "ops / note"):
        v.add_column(c)
    for d in info["devices"]:
        for name, b in d["backends"].items():
            v.add_row(f"{d['device']} ({d['name']})", name, "yes" if b["verified"] else "no",
                      ", ".join(b["ops"]) if b["ops"] else b["note"])
    con.print(v)
    return 0


# backends that can take each device type's tensors (Triton on CPU tensors: the interpreter, by name)
_DEVICE_BACKENDS = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "triton", "reference")}


def _devices() -> list[tuple[str, int | None]]:
    import torch

    out = [("cpu", None)]
    if torch.cuda.is_available():
        out += [("cuda", i) for i in range(torch.cuda.device_count())]
    return out


def _verification(dispatch) -> list[dict]:
    """Per device and backend: verified there (a tuned entry or shipped config of the current
    kernel version exists for this device, see dispatch.verified_backends) or not."""
    from posattn import device as pdev

    rows = []
    for dtype, index in _devices():
        dev = pdev.device_for(dtype, index)
        try:
            ver = dispatch.verified_backends(dtype, index)
            err = ""
        except Exception as e:  # an unreadable cache must not break `posattn info`
            ver, err = {}, f"tune cache unreadable: {type(e).__name__}: {e}"
        backends = {}
        for name in _DEVICE_BACKENDS[dtype]:
            if name == "reference":
                backends[name] = {"verified": True, "ops": [], "layers": [], "note": "the fp64 oracle itself"}
                continue
            got = ver.get(name)
            note = err or ("not verified on this device: no tuned entry or shipped config; "
                           + ("dispatch tries triton first" if (dtype, name) == ("cuda", "cuda")
                              else "runs with heuristic launch configs"))
            backends[name] = {"verified": got is not None, "ops": got["ops"] if got else [],
                              "layers": got["layers"] if got else [], "note": "" if got else note}
        rows.append({"device": dtype if index is None else f"{dtype}:{index}", "name": dev.name,
                     "fingerprint": dev.fingerprint, "backends": backends})
    return rows


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
