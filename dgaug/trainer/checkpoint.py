"""Training checkpoints as safetensors: weights, optimizer state and step, written atomically."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dgaug.core import atomic
from dgaug.core.errors import REFUSED, DgaugError

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8})\.safetensors$")


class CheckpointMismatch(DgaugError):
    """The output folder holds checkpoints of another training config; resuming would mix them."""

    exit_code = REFUSED


@dataclass
class Checkpoint:
    step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    meta: dict[str, Any]


def checkpoint_path(output: Path, step: int) -> Path:
    return output / CHECKPOINT_DIR / f"step_{step:08d}.safetensors"


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    folder = output / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state -> (tensors named optim.<param>.<name>, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    output: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    meta: dict[str, Any],
    *,
    keep: int,
) -> Path:
    """Write step_{step}.safetensors (temp name, fsync, rename), then drop all but the newest `keep`."""
    from safetensors.torch import save_file

    optim_tensors, optim_rest = _flatten_optimizer(optimizer)
    tensors = {f"weights.{k}": v.detach().cpu().contiguous() for k, v in weights.items()}
    tensors.update(optim_tensors)
    # One metadata key: safetensors writes several in hash order, which would change the bytes.
    header = {"dgaug": json.dumps({**meta, "step": step, "optimizer": optim_rest}, sort_keys=True)}
    path = checkpoint_path(output, step)
    with atomic.atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)
    for _, old in list_checkpoints(output)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["dgaug"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    weights = {
        k.removeprefix("weights."): v for k, v in tensors.items() if k.startswith("weights.")
    }
    optim = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    optimizer = _unflatten_optimizer(optim, meta.pop("optimizer"))
    return Checkpoint(int(meta["step"]), weights, optimizer, meta)


def latest_checkpoint(output: Path, fingerprint: str) -> Checkpoint | None:
    """The newest checkpoint in `output`, or None; refuses one made by another training config."""
    found = list_checkpoints(output)
    if not found:
        return None
    ckpt = load_checkpoint(found[-1][1])
    if ckpt.meta.get("fingerprint") != fingerprint:
        raise CheckpointMismatch(
            f"{output} holds checkpoints of another training config (step {ckpt.step}); "
            "use a new train.output or delete its checkpoints/ to start over"
        )
    return ckpt


def remove_temporaries(output: Path) -> int:
    """The checkpoints a killed `dgaug train` was writing."""
    return atomic.remove_temporaries(output / CHECKPOINT_DIR)
