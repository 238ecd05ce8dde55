"""How a model runs in a worker: torch's CPU thread count for the length of a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def cpu_threads(n: int | None, device: torch.device) -> Iterator[None]:
    """Run the block with `n` torch threads when on the CPU (None or a GPU: unchanged).

    On the CPU, how reductions are split among threads changes the last bits of results, so a
    stage that promises identical bytes pins the count (a Ray actor would otherwise get its
    num_cpus, and the local executor the machine's cores).
    """
    if not n or device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def release_memory() -> None:
    """After a worker drops its models: collect them now and hand cached GPU memory back, so the
    next stage's worker on this GPU can use it."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
