"""CLIP weights from the Hugging Face Hub (pretrained tags, hf-hub: repos): cache first, offline-safe."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import open_clip
import torch

from dgaug.models import runtime
from dgaug.models.errors import ModelError, brief

RANDOM_TAG = "random"  # ARCH:random, e.g. ViT-L-14:random: random weights for benchmarks
# open_clip's file names on the hub (open_clip.constants); the safetensors one is preferred.
_HF_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_CONFIG = "open_clip_config.json"


def build_pretrained(
    arch: str, tag: str, cache_dir: str | None
) -> tuple[torch.nn.Module, Callable]:
    """A known architecture with the weights of one of its open_clip pretrained tags."""
    if tag == RANDOM_TAG:
        # The architecture with freshly initialised weights: timing runs need the shapes only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(arch)
        return model, preprocess
    if not open_clip.is_pretrained_cfg(arch, tag):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        known = f"known tags: {', '.join(tags)}" if tags else "it has no pretrained tags"
        raise ModelError(
            f"unknown pretrained tag {tag!r} for {arch}; {known} "
            f"(or give local weights as {arch}:/path/to/weights.safetensors)"
        )
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    repo, filename = os.path.split(cfg.get("hf_hub", ""))
    files = [_weight_names(filename)] if repo else []
    advice = _advice(f"open_clip.create_model('{arch}', pretrained='{tag}')", arch)
    _ensure_cached(cfg, repo, files, f"{arch}/{tag}", advice, cache_dir)
    try:
        # The tag says whether its weights were trained with QuickGELU; open_clip only warns about
        # a mismatch, and the model would then compute with the wrong activation.
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=tag, force_quick_gelu=bool(cfg.get("quick_gelu")), cache_dir=cache_dir
        )
    except Exception as e:
        raise ModelError(f"CLIP {arch}:{tag} could not be loaded ({brief(e)})") from e
    return model, preprocess


def build_hf_hub(repo: str, cache_dir: str | None) -> tuple[torch.nn.Module, Callable]:
    """A model published with an open_clip_config.json in the hub repository ORG/NAME."""
    what = f"hf-hub:{repo}"
    advice = _advice(f"open_clip.create_model('{what}')", None)
    # open_clip fetches these itself, but goes on with random weights when the weights fail to
    # come; fetching them first turns that into an error.
    _ensure_cached(
        {"hf_hub": f"{repo}/{_HF_CONFIG}"}, repo, [[_HF_CONFIG]], what, advice, cache_dir
    )
    _ensure_cached({"hf_hub": f"{repo}/"}, repo, [_weight_names("")], what, advice, cache_dir)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"hf-hub:{repo}", cache_dir=cache_dir
        )
    except Exception as e:
        raise ModelError(f"CLIP {what} could not be loaded ({brief(e)})") from e
    return model, preprocess


LOCAL_DIR = "local-dir:"  # open_clip's own prefix for a folder in the hub layout
_LOCAL_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")


def build_local_dir(folder: Path) -> tuple[torch.nn.Module, Callable]:
    """A folder in the hub layout (open_clip_config.json and weights), by open_clip's loader.

    open_clip goes on with random weights when the folder has a config but no weights: checked
    first, so that a missing file is an error rather than a silently random model.
    """
    what = f"{LOCAL_DIR}{folder}"
    if not (folder / _HF_CONFIG).is_file():
        raise ModelError(f"CLIP {what}: no {_HF_CONFIG} in that folder")
    # Safetensors only: open_clip would unpickle a .bin/.pth found here without weights_only.
    if not any((folder / name).is_file() for name in _LOCAL_WEIGHTS):
        raise ModelError(
            f"CLIP {what}: no safetensors weights in that folder (one of {', '.join(_LOCAL_WEIGHTS)})"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(what)
    except Exception as e:
        raise ModelError(f"CLIP {what} could not be loaded ({brief(e)})") from e
    return model, preprocess


def _weight_names(filename: str) -> list[str]:
    """The names open_clip tries for a weights file on the hub, its safetensors twin first."""
    if not filename or filename in _HF_WEIGHTS:
        return list(_HF_WEIGHTS)
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _advice(how: str, arch: str | None) -> str:
    local = f"{arch or 'ARCH'}:/path/to/weights.safetensors"
    return (
        f"download them once on a machine with network ({how}, then copy the Hugging Face cache, "
        f"HF_HUB_CACHE), or give a local checkpoint ({local})"
    )


def _ensure_cached(
    cfg: dict, repo: str, files: list[list[str]], what: str, advice: str, cache_dir: str | None
) -> None:
    """Make sure the hub files behind `cfg` are in the local cache: look there offline, else fetch.

    files: groups of alternative names, one of each group needed (e.g. safetensors or .bin).
    """
    if not runtime.hub_offline():
        try:
            open_clip.download_pretrained(cfg, cache_dir=cache_dir)
        except Exception as e:
            raise ModelError(
                f"weights for {what} are not in the local cache and the hub cannot be reached "
                f"({brief(e)}); {advice}"
            ) from e
        return
    for names in files or [[]]:  # no file names: a URL-only tag, which has no hub cache entry
        found = [
            huggingface_hub.try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            for name in names
        ]
        if not any(isinstance(f, str) for f in found):
            raise ModelError(
                f"weights for {what} are not in the local cache and the hub cannot be reached "
                f"(offline: HF_HUB_OFFLINE is set); {advice}"
            )
