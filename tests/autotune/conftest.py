"""Isolate every autotune test: its own POSATTN_TUNE_DIR, user cache ($XDG_CACHE_HOME)
and shipped-configs folder; the lookups re-installed afterwards."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from posattn import autotune, dispatch
from posattn.autotune import cache as C


@dataclass
class Dirs:
    tune: object
    user: object
    shipped: object


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    d = Dirs(tmp_path / "tune", tmp_path / "xdg" / "posattn" / "tune" / "v1", tmp_path / "shipped")
    monkeypatch.setenv("POSATTN_TUNE_DIR", str(d.tune))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("POSATTN_AUTOTUNE", raising=False)
    monkeypatch.delenv("POSATTN_BACKEND", raising=False)
    monkeypatch.setattr(C, "shipped_dir", lambda: d.shipped)
    C._logged.clear()
    autotune.reload()
    assert C.user_cache_dir() == d.user
    yield d
    monkeypatch.undo()
    autotune.reload()
