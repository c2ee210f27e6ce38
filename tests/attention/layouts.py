"""Random packed layouts (documents inside rows, each row's first document long enough for its anchors)."""
from __future__ import annotations

import random

import torch


def _composition(rng: random.Random, total: int, parts: int, minimum: int) -> list[int]:
    """``parts`` positive lengths >= minimum summing to ``total``."""
    spare = total - parts * minimum
    assert spare >= 0
    cuts = sorted(rng.randint(0, spare) for _ in range(parts - 1))
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [spare])]
    return [s + minimum for s in sizes]


def random_layout(rng: random.Random, T: int, n_rows: int, num_anchors: int, max_docs: int = 4,
                  short_docs: bool = True):
    """(cu_seqlens, cu_rows) int32 on the CPU. ``short_docs`` favours length-1 documents."""
    rows = _composition(rng, T, n_rows, max(1, num_anchors))
    cs, cr, pos = [0], [0], 0
    for L in rows:
        first = rng.randint(max(1, num_anchors), L)
        docs = [first]
        rest = L - first
        while rest:
            if len(docs) >= max_docs:
                d = rest
            elif short_docs and rng.random() < 0.3:
                d = 1
            else:
                d = rng.randint(1, rest)
            docs.append(d)
            rest -= d
        for d in docs:
            pos += d
            cs.append(pos)
        cr.append(pos)
    return torch.tensor(cs, dtype=torch.int32), torch.tensor(cr, dtype=torch.int32)
