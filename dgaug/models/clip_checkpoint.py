"""Local CLIP weights: read a state dict without running code, fit it into an architecture."""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import open_clip
import safetensors.torch
import torch

from dgaug.models.errors import ModelError, brief, code_in_pickle

SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or torch checkpoint (optionally under ``state_dict``, keys
    optionally ``module.``-prefixed); ModelError, one line, for anything else."""
    if not path.exists():
        raise ModelError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise ModelError(f"checkpoint {path} is not a file")
    try:
        if path.suffix == ".safetensors":
            obj = safetensors.torch.load_file(str(path), device="cpu")
        else:
            # weights_only=True: a checkpoint is data, and loading one must never run its code.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = code_in_pickle(e)
        if code:
            raise ModelError(
                f"checkpoint {path} is refused: unpickling it would run code "
                f"({code}) and checkpoints are only read with "
                "torch.load(weights_only=True); re-save it as a plain state dict or safetensors"
            ) from e
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines() or ["?"]
        raise ModelError(f"checkpoint {path} could not be read ({detail[0]})") from e
    except Exception as e:
        raise ModelError(f"checkpoint {path} could not be read ({brief(e)})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise ModelError(
            f"checkpoint {path} holds no state dict of tensors "
            "(expected a state dict, or {'state_dict': ...} as open_clip training writes)"
        )
    # open_clip training saves DistributedDataParallel-wrapped weights, named module.*
    return {k.removeprefix("module."): v for k, v in obj.items()}


def build_for_checkpoint(arch: str) -> tuple[torch.nn.Module, Callable]:
    """A known architecture, built without fetching any weights, to load a checkpoint into."""
    try:
        # pretrained_text/image False: tower weights come from the checkpoint, never the hub.
        with _no_random_init_warning():
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=None, pretrained_text=False, pretrained_image=False
            )
    except Exception as e:
        raise ModelError(f"CLIP architecture {arch} could not be built ({brief(e)})") from e
    return model, preprocess


def load_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str
) -> None:
    """Load `state` into `model` strictly; a mismatch is a ModelError naming a few keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelError(
            f"checkpoint {path} does not fit {arch}: {len(missing)} missing keys "
            f"{_few(missing)}, {len(unexpected)} unexpected keys {_few(unexpected)}"
        )
    for key, value in state.items():
        # Scalar parameters (logit_scale) are saved as shape [] or [1] depending on the version.
        if value.shape != own[key].shape and value.numel() == own[key].numel() == 1:
            state[key] = value.reshape(own[key].shape)
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if v.shape != own[k].shape
    ]
    if wrong:
        raise ModelError(
            f"checkpoint {path} does not fit {arch}: {len(wrong)} tensors differ in shape "
            f"(checkpoint vs model): {_few(wrong)}"
        )
    model.load_state_dict(state, strict=True)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _no_random_init_warning() -> Iterator[None]:
    # open_clip warns "Model initialized randomly" on the root logger when it builds an
    # architecture for us to load a checkpoint into; that warning would mislead the reader.
    drop = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _few(items: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}]"
