"""Where and how a model runs: the device it goes on, whether the hub may be asked, CPU threads."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from huggingface_hub import constants as hf_constants

from dgaug.models.errors import ModelError

_TRUE = ("1", "ON", "YES", "TRUE")


def resolve_device(device: str) -> torch.device:
    """``auto`` (cuda when a GPU is visible, else cpu), ``cpu``, ``cuda`` or ``cuda:N`` -> a torch
    device that exists here; ModelError, one line, for anything else."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                f"device {device!r} asked for, but no CUDA GPU is visible here; "
                "set device: cpu (or auto) to run on the CPU"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return dev


def hub_offline() -> bool:
    """Whether the Hugging Face Hub must not be asked (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; reading the environment again here
    # makes a setting made later in the process (a test, a notebook) count too.
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(hf_constants.HF_HUB_OFFLINE) or any(f.strip().upper() in _TRUE for f in flags)


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
