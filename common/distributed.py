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


def shutdown(timeout_s: float = 300.0, drain_s: float = 1.0) -> bool:
    """End the default process group so that no rank aborts on its way out.

    Two races end a gloo job with ``terminate called without an active exception`` (SIGABRT) after its work
    is done; a plain ``barrier()`` + ``destroy_process_group()`` did so in 9 of 60 loaded two-process runs
    (``python -m experiments.ddp_teardown --mode plain``):

    - A gloo worker thread frees its last work item (the barrier, and through it the collectives that were
      in flight when it started) only after the barrier has returned. That work carries Python thread
      state; freed once the interpreter has begun to shut down, it cannot take the GIL and the process
      aborts (backtrace: ``~AsyncBarrierWork`` -> ``~AsyncAllreduceWork`` -> ``~ThreadLocalState`` ->
      ``gil_scoped_acquire`` -> ``pthread_exit``). ``destroy_process_group`` does not join gloo's
      threads, so after it this process waits ``drain_s`` seconds with the GIL released for them.
    - A barrier returns on one rank as soon as that rank has heard from the others, not when the others
      have heard from it. So ranks also count themselves past the barrier in the rendezvous store (a
      connection of its own) and wait for all, before any closes its connections; rank 0 waits until
      every rank has seen the count, since the store may live in its process (``init_method="tcp://"``;
      under ``torchrun`` it lives in the launcher).

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
    time.sleep(drain_s)  # releases the GIL: gloo's worker threads free their last work items now
    return True
