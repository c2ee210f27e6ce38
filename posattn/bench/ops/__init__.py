"""One module per op's benchmark cases. Add a new op by adding its module
name to OP_MODULES; a module whose op is not in posattn yet calls
``registry.skip_op(name, why)`` instead of registering."""
from __future__ import annotations

import importlib

OP_MODULES = ("rope",)

_loaded = False


def load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from posattn.bench import registry

    for mod in OP_MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ImportError as e:  # an op module whose dependencies are missing
            registry.skip_op(mod, f"import failed: {e}")
