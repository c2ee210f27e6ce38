"""``posattn tune`` and ``posattn cache``: argument parsing and the commands.

The command layer: unlike the rest of posattn.autotune it may import the public ops
(its key builders build their kernel keys). The work lives beside it:

    shapes.py     model shapes from a transformers config or a preset
    keys.py       the kernel keys of each op (one keys_<op>.py per op, one registration line)
    workers.py    the jobs, tuned in this process or one worker process per device
    output.py     progress bar and results table
    cache_cmd.py  ``posattn cache`` show / validate / clear / export
"""
from __future__ import annotations

import json

from posattn.autotune import cache_cmd
from posattn.autotune.keys import ops as _tunable_ops
from posattn.autotune.output import print_table
from posattn.autotune.shapes import load_hf_config, model_shape
from posattn.autotune.workers import run_tuning


DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
          "fp32": "float32", "float32": "float32", "float": "float32", "fp64": "float64", "float64": "float64"}
OPS = _tunable_ops()


def add_parsers(sub) -> None:
    p = sub.add_parser("tune", help="tune launch configs for a model's shapes on this machine's devices",
                       description="Build the kernel keys a model needs, time every candidate config of every "
                                   "usable backend, and write the results to the tuning cache.")
    p.add_argument("--ops", default="rope", help=f"comma-separated ops to tune ({', '.join(OPS)}), or 'all'")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf-config", metavar="PATH", help="a transformers config.json")
    src.add_argument("--preset", metavar="NAME", help="a built-in model (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--layer-type", default=None, metavar="NAME",
                   help="for a config with one RoPE per layer type (e.g. sliding_attention): the one to tune")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 | fp64 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (B*S); each is tuned at its "
                                                  "power-of-two bucket (default: 1,16,256,4096,65536)")
    p.add_argument("--devices", default=None, help="comma-separated CUDA device indices, or 'cpu' "
                                                   "(default: the current GPU, else the CPU)")
    p.add_argument("--backends", default=None, help="comma-separated backends to tune (default: every usable "
                                                    "backend dispatch would choose by itself; not the reference)")
    p.add_argument("--force", action="store_true", help="re-time configs that already have a result")
    p.add_argument("--budget-ms", type=float, default=None, help="timed milliseconds per candidate (default 50)")
    p.add_argument("--quick", action="store_true",
                   help="a short run for demos: llama3-8b shapes (unless given), fp32 at 16 and 256 tokens on "
                        "CPU (bf16 at 256 and 4096 on GPU), 20 ms per candidate")
    p.add_argument("--json", action="store_true", help="print the final table as JSON")
    p.set_defaults(func=_tune_cmd)

    c = sub.add_parser("cache", help="show, validate, clear or export the tuning cache")
    csub = c.add_subparsers(dest="cache_command", required=True)
    s = csub.add_parser("show", help="list the cached entries of this machine's devices")
    s.add_argument("--json", action="store_true")
    s.add_argument("--all", action="store_true", help="every config's result, not only the best")
    s.set_defaults(func=cache_cmd.show)
    v = csub.add_parser("validate", help="check cache files against the schema (changes nothing)")
    v.add_argument("files", nargs="*", help="files to check (default: every cache file in every layer)")
    v.set_defaults(func=cache_cmd.validate)
    cl = csub.add_parser("clear", help="remove the user cache (not $POSATTN_TUNE_DIR, not shipped configs)")
    cl.set_defaults(func=cache_cmd.clear)
    e = csub.add_parser("export", help="write the user's entries in the shipped-config format (<gpu-slug>.json)")
    e.add_argument("-o", "--out", default="tune-export",
                   help="output folder (copy its files into posattn/autotune/configs/ to ship them)")
    e.set_defaults(func=cache_cmd.export)


def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def _tune_cmd(args) -> int:
    from posattn.autotune import presets

    if args.list_presets:
        for n in presets.names():
            print(n, json.dumps(presets.get(n)))
        return 0
    import torch

    ops = _csv(args.ops) or ["rope"]
    if ops == ["all"]:
        ops = list(OPS)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"--ops: {op!r} cannot be tuned yet (tunable: {', '.join(OPS)})")
    if args.devices:
        devs = _csv(args.devices)
        if devs == ["cpu"]:
            devices = ["cpu"]
        else:
            try:
                idx = [int(d) for d in devs]
            except ValueError:
                raise ValueError(f"--devices must be CUDA indices like 0,1 or 'cpu'; got {args.devices!r}") from None
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise ValueError(f"--devices: {bad} not visible here ({n} CUDA device(s))")
            devices = [f"cuda:{i}" for i in idx]
    else:
        devices = [f"cuda:{torch.cuda.current_device()}"] if torch.cuda.is_available() else ["cpu"]
    on_gpu = devices[0].startswith("cuda")
    if args.hf_config:
        shape = model_shape(load_hf_config(args.hf_config), args.hf_config, args.layer_type)
    elif args.preset or args.quick:
        name = args.preset or "llama3-8b"
        shape = model_shape(presets.get(name), f"preset {name}", args.layer_type)
    else:
        raise ValueError("give --hf-config PATH or --preset NAME (or --quick)")
    dt = args.dtype or ("bf16" if on_gpu else "fp32")
    if dt.lower() not in DTYPES:
        raise ValueError(f"--dtype must be one of bf16, fp16, fp32, fp64; got {args.dtype!r}")
    dtype = DTYPES[dt.lower()]
    if args.tokens:
        try:
            tokens = [int(t) for t in _csv(args.tokens)]
        except ValueError:
            raise ValueError(f"--tokens must be comma-separated integers; got {args.tokens!r}") from None
        if any(t <= 0 for t in tokens):
            raise ValueError(f"--tokens must be positive; got {args.tokens!r}")
    else:
        tokens = ([256, 4096] if on_gpu else [16, 256]) if args.quick else [1, 16, 256, 4096, 65536]
    budget = args.budget_ms if args.budget_ms is not None else (20.0 if args.quick else 50.0)
    if budget <= 0:
        raise ValueError(f"--budget-ms must be positive; got {budget}")
    backends = _csv(args.backends) or None
    rows = run_tuning(ops, shape, dtype, tokens, devices, backends=backends, force=args.force,
                      budget_s=budget / 1000.0, show_progress=not args.json)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print_table(rows)
    return 0 if all(r["status"] != "error" for r in rows) else 1
