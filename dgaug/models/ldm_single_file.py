"""Single-file LDM checkpoints (the original .safetensors users download) through diffusers'
from_single_file, offline with a local diffusers folder for the configs and tokenizers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dgaug.models.errors import ModelError, brief
from dgaug.models.runtime import hub_offline

SINGLE_FILE_SUFFIXES = (".safetensors",)
# SDXL's original checkpoints keep their second text encoder (OpenCLIP bigG) under this prefix.
_SDXL_KEY_PREFIX = "conditioner.embedders.1."


def is_single_file(spec: str) -> bool:
    """Whether `model:` names a single-file checkpoint (by its suffix; .ckpt is refused)."""
    return spec.lower().endswith((*SINGLE_FILE_SUFFIXES, ".ckpt"))


def _is_sdxl(path: Path, config: Path | None) -> bool:
    if config is not None:
        # The config folder decides the architecture: its second text encoder, or its class.
        index = json.loads((config / "model_index.json").read_text())
        return "text_encoder_2" in index or "XL" in str(index.get("_class_name", ""))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith(_SDXL_KEY_PREFIX) for k in f.keys())  # noqa: SIM118


def check_single_file(spec: str, config: str | None) -> tuple[Path, Path | None]:
    """The checkpoint's and the config folder's paths; ModelError in one line for what cannot
    work (a pickled .ckpt, a missing file, a config that is not a diffusers folder)."""
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".ckpt":
        raise ModelError(
            f"model {spec!r} is a pickled .ckpt checkpoint, which runs code when loaded; "
            "use its .safetensors version"
        )
    if not path.is_file():
        raise ModelError(f"model {spec!r} does not exist; check the path in the manifest")
    if config is None:
        return path, None
    folder = Path(config).expanduser()
    if folder.suffix.lower() in (".yaml", ".yml"):
        raise ModelError(
            f"model_config_dir {config!r}: an original .yaml config needs the Hugging Face Hub for its "
            "text encoders' configs; give a local diffusers folder of the same architecture"
        )
    if not (folder / "model_index.json").is_file():
        raise ModelError(
            f"model_config_dir {config!r} is not a diffusers folder (no model_index.json): give the "
            "folder of a diffusers checkpoint of the same architecture (its config and tokenizer "
            "files are enough; its weights are not read)"
        )
    return path, folder


def single_file_components(spec: str, config: str | None, dtype: torch.dtype) -> dict[str, Any]:
    """The parts of a single-file SD-1.x/2.x or SDXL checkpoint, keyed as load_ldm's; the
    architecture, tokenizers and scheduler from `config` (a local diffusers folder) or, without
    it, from the hub repo diffusers infers from the checkpoint's keys (or the local HF cache)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path, folder = check_single_file(spec, config)
    sdxl = _is_sdxl(path, folder)
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    # Components ED-SAM never runs: not loaded (the safety checker would need its own weights).
    skip: dict[str, Any] = (
        {"image_encoder": None, "feature_extractor": None, "add_watermarker": False}
        if sdxl
        else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    from diffusers.utils import logging as diffusers_logging

    # Library code prints no progress bars (diffusers' switch is global: put back after).
    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        pipe = cls.from_single_file(
            str(path),
            config=str(folder) if folder is not None else None,
            # Never reach the hub when a local config is given; without one, only if allowed.
            local_files_only=folder is not None or hub_offline(),
            torch_dtype=dtype,
            **skip,
        )
    except Exception as exc:  # any loader failure becomes one actionable line
        hint = (
            "check that model_config_dir is a diffusers folder of the checkpoint's architecture"
            if folder is not None
            else "without model_config_dir, diffusers reads the configs of the architecture it "
            "infers from the hub (or the local HF cache); set model_config_dir to a local diffusers "
            "folder of the same architecture"
        )
        raise ModelError(
            f"cannot load single-file checkpoint {spec!r}: {hint} [{brief(exc)}]"
        ) from exc
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
    parts: dict[str, Any] = {
        "vae": pipe.vae,
        "unet": pipe.unet,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "scheduler": pipe.scheduler,
    }
    if sdxl:
        parts["text_encoder_2"] = pipe.text_encoder_2
        parts["tokenizer_2"] = pipe.tokenizer_2
        parts["force_zeros_for_empty_prompt"] = bool(
            pipe.config.get("force_zeros_for_empty_prompt", True)
        )
    return parts
