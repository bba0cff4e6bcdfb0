"""Multi-process (``torchrun``) helpers shared by every bundle's ``multi_gpu_train.json``."""

from __future__ import annotations

import time

import torch.distributed as dist

__all__ = ["shutdown"]

_PAST_BARRIER = "labelfree_zoo/shutdown/past_barrier"
_PAST_WAIT = "labelfree_zoo/shutdown/past_wait"


def _count_to(store, key: str, world: int, timeout_s: float) -> None:
    """Add 1 to ``key`` and wait until it reaches the next multiple of ``world`` (reusable: one round per call)."""
    n = store.add(key, 1)
    target = -(-n // world) * world
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"distributed shutdown: only {store.add(key, 0) % world or world} of {world} ranks "
                               f"reached '{key}' within {timeout_s:.0f} s; check the other ranks' logs")
        time.sleep(0.01)


def shutdown(timeout_s: float = 300.0) -> bool:
    """End the default process group so that no rank can abort while another is still talking to it.

    A gloo ``barrier`` returns on one rank as soon as that rank has heard from the others, not when the
    others have heard from it; a rank that then destroys its process group closes sockets its peer may
    still be reading, and the peer dies with ``terminate called without an active exception`` (SIGABRT)
    after its work is done (gloo issue #155; 9 of 60 two-process runs of barrier + destroy on the 2-core
    CPU). So every rank waits at the barrier, then counts itself past it in the rendezvous store (a
    connection of its own) and waits until all ranks are, and only then destroys its group. Rank 0 also
    waits until every rank has seen the count, since the store may live in rank 0's process
    (``init_method="tcp://..."``; under ``torchrun`` it lives in the launcher).

    Returns False (and does nothing) when no process group is initialised, True otherwise.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    world, rank = dist.get_world_size(), dist.get_rank()
    dist.barrier()
    store = dist.distributed_c10d._get_default_store()  # the rendezvous store (no public accessor)
    _count_to(store, _PAST_BARRIER, world, timeout_s)
    if rank == 0:
        _count_to(store, _PAST_WAIT, world, timeout_s)
    else:
        store.add(_PAST_WAIT, 1)
    dist.destroy_process_group()
    return True
