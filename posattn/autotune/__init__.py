"""Autotuning: per-GPU launch configs, tuned once, cached on disk, used by dispatch.

``import posattn`` calls :func:`install`, which hands dispatch two lookups
(tuned config for a kernel and key; tuned backend for a key). They run only
when dispatch first sees a key (its decision is then memoised, so the hot
path stays one dict lookup) and read the cache files lazily, on the first
key of a device type: with no cache file, nothing is read but three stats.

``POSATTN_AUTOTUNE`` (read by :func:`install` / :func:`reload`):

- ``off``: no lookups are installed; heuristic defaults, nothing is ever timed.
- ``cached`` (default): use what the cache files hold; never tune on the hot path.
- ``missing``: a key the files do not hold exactly is tuned the first time it
  is seen (inside the first call with that key), then written to the cache.
- ``always``: every key is re-tuned the first time this process sees it.

See :mod:`posattn.autotune.cache` for the files and the lookup order,
:mod:`posattn.autotune.tuner` for the measurements, and ``posattn tune`` /
``posattn cache`` for the commands.
"""
from __future__ import annotations

import logging
import os
import threading

from posattn import dispatch
from posattn.autotune import cache as _cache

MODES = ("off", "cached", "missing", "always")
log = logging.getLogger("posattn.autotune")
_MISS = object()


def mode() -> str:
    """The autotune mode from ``POSATTN_AUTOTUNE`` (default ``cached``)."""
    m = (os.environ.get("POSATTN_AUTOTUNE") or "cached").strip().lower()
    if m not in MODES:
        _cache.log_once(logging.WARNING, "POSATTN_AUTOTUNE=%r is not one of %s; using 'cached'", m, "|".join(MODES))
        return "cached"
    return m


class Lookups:
    """The hooks dispatch calls on the first sight of a key (never on the hot path)."""

    def __init__(self, mode: str):
        self.mode = mode
        self._indexes: dict[tuple, tuple] = {}  # (device_type, CUDA index) -> (Device, Index)
        self._memo: dict = {}                  # (op, backend, version, key, CUDA index) -> config or None
        self._tuned: set = set()               # (op, key, backend) tuned by this process
        self._lock = threading.RLock()
        self._busy = threading.local()

    # -- indexes -------------------------------------------------------------

    @staticmethod
    def _where(device_type: str) -> tuple:
        """(device_type, current CUDA index or None): dispatch makes the inputs' device
        current before it calls the hooks, so two GPUs of different kinds never share an index."""
        if device_type != "cuda":
            return (device_type, None)
        import torch

        return (device_type, torch.cuda.current_device())

    def index(self, device_type: str):
        where = self._where(device_type)
        got = self._indexes.get(where)
        if got is None:
            from posattn.autotune import fingerprint

            with self._lock:
                dev = fingerprint.device_for(device_type, where[1])
                idx = _cache.load_index(dev.fingerprint, dev.slug)
                if not idx.layers:
                    _cache.log_once(logging.INFO, "posattn autotune: no tuned configs for %s (%s); "
                                    "using heuristic defaults (run `posattn tune` to tune this device)",
                                    dev.fingerprint, dev.name)
                elif idx.layers[0][0] == "shipped":
                    _cache.log_once(logging.INFO, "posattn autotune: no configs tuned on this machine for %s; "
                                    "using the shipped configs %s", dev.fingerprint, idx.layers[0][1])
                got = (dev, idx)
                self._indexes[where] = got
        return got

    def invalidate(self) -> None:
        with self._lock:
            self._indexes.clear()
            self._memo.clear()
        dispatch.clear_memo()

    # -- hooks ---------------------------------------------------------------

    def config(self, op: str, kernel, key) -> dict | None:
        mk = (op, kernel.backend, kernel.version, key, self._where(key.device_type)[1])
        got = self._memo.get(mk, _MISS)
        if got is not _MISS:
            return got
        if self._should_tune(op, key, kernel.backend, exact_only=True, version=kernel.version):
            self._tune(op, key, [kernel.backend])
        hit = self.index(key.device_type)[1].config(op, kernel.backend, kernel.version, key)
        cfg = None
        if hit is not None:
            cfg = self._checked(op, kernel, key, hit.config)
            if cfg is not None and not hit.exact:
                log.debug("posattn autotune: %s/%s %s served by the nearest tuned bucket", op, kernel.backend, key)
        self._memo[mk] = cfg
        return cfg

    def backend(self, op: str, key, kernels: dict) -> str | None:
        versions = {b: k.version for b, k in kernels.items()}
        if self.mode in ("missing", "always") and not getattr(self._busy, "on", False):
            cands = [b for b, k in kernels.items() if b != "reference"]
            if len(cands) > 1 and any(self._should_tune(op, key, b, exact_only=True, version=versions[b])
                                      for b in cands):
                self._tune(op, key, None)
                self._tuned.update((op, key, b) for b in cands)
        got = self.index(key.device_type)[1].backend(op, key, versions)
        return got[0] if got else None

    # -- helpers -------------------------------------------------------------

    def _checked(self, op, kernel, key, cfg: dict) -> dict | None:
        """A cached config is data: accept only the names the kernel's default uses."""
        allowed = set(kernel.default_config(key))
        if kernel.search_space is not None:
            try:
                for c in kernel.search_space(key):
                    allowed |= set(c)
            except Exception:
                pass
        extra = set(cfg) - allowed
        if extra:
            _cache.log_once(logging.WARNING, "posattn autotune: ignoring a cached %s/%s config with unknown "
                            "parameters %s", op, kernel.backend, str(sorted(extra)))
            return None
        return dict(cfg)

    def _should_tune(self, op, key, backend, *, exact_only, version) -> bool:
        if self.mode not in ("missing", "always") or getattr(self._busy, "on", False):
            return False
        if (op, key, backend) in self._tuned:
            return False
        if self.mode == "always":
            return True
        hit = self.index(key.device_type)[1].config(op, backend, version, key)
        return hit is None or not hit.exact

    def _tune(self, op, key, backends) -> None:
        from posattn.autotune import tuner

        with self._lock:
            self._busy.on = True
            try:
                res = tuner.tune_key(op, key, backends=backends, force=(self.mode == "always"))
                for r in res:
                    self._tuned.add((op, key, r.backend))
                log.info("posattn autotune: tuned %s %s (%s)", op, key,
                         ", ".join(f"{r.backend}: {r.best['config'] if r.best else r.error or 'all failed'}"
                                   for r in res))
            except Exception as e:  # tuning must never break the op
                for b in backends or ():
                    self._tuned.add((op, key, b))
                log.warning("posattn autotune: tuning %s %s failed (%s: %s); using what is cached",
                            op, key, type(e).__name__, e)
            finally:
                self._busy.on = False
            self._indexes.pop(self._where(key.device_type), None)
            self._memo.clear()


_lookups: Lookups | None = None


def install() -> Lookups | None:
    """Install dispatch's lookups for the current ``POSATTN_AUTOTUNE`` mode (none when off)."""
    global _lookups
    m = mode()
    if m == "off":
        _lookups = None
        dispatch.set_tuned_lookups(None, None)
        return None
    _lookups = Lookups(m)
    dispatch.set_tuned_lookups(_lookups.config, _lookups.backend)
    return _lookups


def reload() -> Lookups | None:
    """Re-read the mode and the cache files (after tuning in another process, or an env change)."""
    return install()


def lookups() -> Lookups | None:
    return _lookups


install()
