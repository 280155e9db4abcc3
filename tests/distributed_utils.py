"""Spawning a loopback-only gloo process group for the DDP / FSDP2 tests.

Workers run in fresh processes (``spawn``), on 127.0.0.1 only, one intra-op thread each (the
CI machine has 2 cores). ``run_workers`` fails the test with the worker's traceback when one
raises, and kills the group when it hangs past ``timeout`` seconds.
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int) -> None:
    """Join the loopback gloo group (call first in a worker)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # never leave the machine
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _entry(rank, fn, world_size, port, args):
    init_gloo(rank, world_size, port)
    try:
        fn(rank, world_size, *args)
        # No rank tears gloo down while a peer still has collectives in flight: a rank that
        # returned early (FSDP finalize on rank 0 only) once aborted in gloo's teardown
        # ("terminate called without an active exception", SIGABRT) in a full `make test`.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_workers(fn, world_size: int, *args, timeout: float = 180.0) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes and wait for all.

    ``fn`` must be a module-level function (it is pickled by reference).
    """
    if not dist.is_available() or not dist.is_gloo_available():
        raise RuntimeError("torch.distributed with the gloo backend is required")
    context = mp.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"distributed workers did not finish within {timeout:.0f} s")
