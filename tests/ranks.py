"""Run a test's worker on several spawned processes of one process group and collect what each rank reports."""
from __future__ import annotations

import os
import queue
import socket

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main(rank, world, port, results, worker, args, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        value = worker(rank, world, *args)
        results.put((rank, value))  # by value (numpy, plain data): a rank's shared memory ends with it
        results.close()
        results.join_thread()  # the result is out of this process before it tears anything down
        dist.barrier()  # every rank done before any destroys the group (gloo aborts at exit otherwise)
    finally:
        dist.destroy_process_group()


def run_ranks(worker, world: int, *args, backend: str = "gloo") -> list:
    """``[worker(rank, world, *args) for each rank]``, each run in its own process of one process group
    (``backend``: gloo on CPU tensors, nccl on GPUs).

    ``worker`` must be a module-level function (the processes are spawned) returning picklable data.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_main, args=(rank, world, port, results, worker, args, backend))
                 for rank in range(world)]
    for p in processes:
        p.start()
    found = {}
    try:
        while len(found) < world:
            try:
                rank, value = results.get(timeout=2)
                found[rank] = value
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in processes):
                    raise AssertionError(f"a rank failed: exit codes {[p.exitcode for p in processes]}") from None
    finally:
        for p in processes:
            p.join(timeout=60)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    return [found[rank] for rank in range(world)]
