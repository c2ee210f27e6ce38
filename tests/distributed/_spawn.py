"""Run a function on W gloo ranks spawned by the test (CPU): ``spawn(fn, W, *args)``.

``fn(rank, world, *args)`` runs after init_process_group; an exception on any rank fails the
test with that rank's traceback (torch.multiprocessing.spawn re-raises it).
"""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, fn, args):
    torch.set_num_threads(1)                # W ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # every rank's sends have been consumed before any rank tears its group down: gloo
        # aborts a process (std::terminate) whose pair sockets close under a pending transfer
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    fd, init_file = tempfile.mkstemp(prefix="posattn-gloo-")
    os.close(fd)
    os.unlink(init_file)                    # the file store creates it
    try:
        mp.spawn(_entry, args=(world, init_file, fn, args), nprocs=world, join=True)
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)
