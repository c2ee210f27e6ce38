"""Per-signature plan tables for the public ops' eager hot path.

A plan records what an op decided for one signature of input metadata (checks
passed, kernel key, backend choice, tables), so a repeated call is one dict
lookup. Every table is emptied by ``dispatch.clear_memo()`` (autotune reloads,
new registrations) and when it reaches its op's size limit.
"""
from __future__ import annotations

import threading

from posattn import dispatch

_LOCK = threading.Lock()


def new_table() -> dict:
    """An empty plan table that dispatch.clear_memo() also empties."""
    table: dict = {}
    dispatch.on_clear_memo(table.clear)
    return table


def store(table: dict, key, plan, limit: int) -> None:
    """Keep ``plan`` under ``key``; a table holding ``limit`` plans is emptied first (limit <= 0: keep none)."""
    if limit <= 0:
        return
    with _LOCK:
        if len(table) >= limit:
            table.clear()
        table[key] = plan
