"""Reading an LDM's parts from a local diffusers folder or a hub id (diffusers' and transformers'
loaders), with every failure as one ModelError line."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from packaging.version import Version
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dgaug.models import ldm_sdxl
from dgaug.models.errors import ModelError, brief, code_in_pickle
from dgaug.models.ldm_presets import ddim_scheduler
from dgaug.models.runtime import hub_offline

log = logging.getLogger(__name__)

SUBFOLDERS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
# SDXL's second text encoder (OpenCLIP bigG, with its projection) and its tokenizer.
SDXL_SUBFOLDERS = ("text_encoder_2", "tokenizer_2")


def vae_dtype(dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    # SD's VAE overflows float16's range in the decoder (NaN / black images; diffusers marks such
    # VAEs with force_upcast), so it stays float32 there. bfloat16 has float32's range: kept.
    return torch.float32 if dtype == torch.float16 and force_upcast else dtype


def local_folder(spec: str) -> Path | None:
    """The folder spec names, None for a hub id; ModelError for a path that is not there."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"model {spec!r} is a file; give a folder in diffusers layout or a single-file "
                ".safetensors checkpoint"
            )
        missing = [f"{name}/" for name in SUBFOLDERS if not (path / name).is_dir()]
        if missing:
            raise ModelError(
                f"model folder {spec!r} is not in diffusers layout: missing {', '.join(missing)}"
            )
        return path
    # A hub id is exactly "owner/name"; anything else is a path that is not there.
    if spec.startswith(("/", ".", "~")) or spec.count("/") != 1 or "\\" in spec:
        raise ModelError(
            f"model folder {spec!r} does not exist (nor is it a hub id like owner/name); "
            "check the path in the manifest"
        )
    return None


def from_pretrained_parts(spec: str, dtype: torch.dtype, local: Path | None) -> dict[str, Any]:
    source = str(local) if local is not None else spec
    local_only = local is not None or hub_offline()
    # Without accelerate, diffusers first initializes every weight at random (a full extra copy
    # and seconds of CPU) and prints a multi-line notice; say it once, in one line, instead.
    low_mem = importlib.util.find_spec("accelerate") is not None
    if not low_mem:
        log.warning(
            "accelerate is not installed: loading %s will be slower and use 2x memory", spec
        )
    # transformers renamed torch_dtype to dtype in 4.56 and warns on the old name.
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    component = "unet"
    try:
        # use_safetensors left at None: safetensors whenever the folder has them, else the
        # libraries' .bin fallback, which both load with torch.load(weights_only=True).
        unet = UNet2DConditionModel.from_pretrained(
            source,
            subfolder="unet",
            torch_dtype=dtype,
            local_files_only=local_only,
            low_cpu_mem_usage=low_mem,
        )
        component = "vae"
        vae_config = AutoencoderKL.load_config(source, subfolder="vae", local_files_only=local_only)
        vae = AutoencoderKL.from_pretrained(
            source,
            subfolder="vae",
            torch_dtype=vae_dtype(dtype, bool(vae_config.get("force_upcast", True))),
            local_files_only=local_only,
            low_cpu_mem_usage=low_mem,
        )
        component = "text_encoder"
        text_encoder = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", local_files_only=local_only, **{dtype_kw: dtype}
        )
        component = "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(
            source, subfolder="tokenizer", local_files_only=local_only
        )
        component = "scheduler"
        scheduler = ddim_scheduler(
            DDIMScheduler.load_config(source, subfolder="scheduler", local_files_only=local_only)
        )
        sdxl: dict[str, Any] = {}
        if ldm_sdxl.is_sdxl(unet.config) and (local is None or (local / "text_encoder_2").is_dir()):
            component = "text_encoder_2"
            sdxl["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", local_files_only=local_only, **{dtype_kw: dtype}
            )
            component = "tokenizer_2"
            sdxl["tokenizer_2"] = CLIPTokenizer.from_pretrained(
                source, subfolder="tokenizer_2", local_files_only=local_only
            )
            sdxl["force_zeros_for_empty_prompt"] = _force_zeros(source, local_only)
    except ModelError:
        raise
    except Exception as exc:  # any loader failure becomes one actionable line
        code = code_in_pickle(exc)  # diffusers and transformers wrap torch's refusal
        if code:
            raise ModelError(
                f"cannot load {spec!r} ({component}): refused: a weights file in it would run "
                f"code when unpickled ({code}); weights are read only as safetensors or with "
                "torch.load(weights_only=True): re-save them as safetensors"
            ) from exc
        cause = brief(exc, limit=None)
        if local is not None:
            hint = "check that the folder holds a complete diffusers checkpoint"
        elif local_only:
            hint = (
                "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache; "
                "download it where there is internet or give a local folder"
            )
        else:
            hint = "the Hugging Face Hub could not be reached or has no such model"
        raise ModelError(f"cannot load {spec!r} ({component}): {hint} [{cause}]") from exc
    return {
        "vae": vae,
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        **sdxl,
    }


def _force_zeros(source: str, local_only: bool) -> bool:
    """An SDXL checkpoint's force_zeros_for_empty_prompt (model_index.json); the pipeline's
    default (true) when the file is absent."""
    from diffusers import StableDiffusionXLPipeline

    try:
        index = StableDiffusionXLPipeline.load_config(source, local_files_only=local_only)
    except Exception:  # no model_index.json: components saved one by one
        return True
    return bool(index.get("force_zeros_for_empty_prompt", True))


# UNet weights up to this size count as small enough for a CPU (SD-1.5's are 1.7-3.4 GB).
SMALL_UNET_BYTES = 100 * 2**20


def unet_bytes(folder: Path) -> int:
    """The UNet weights' size in a local diffusers folder; 0 when there are none to measure."""
    unet = folder / "unet"
    if not unet.is_dir():
        return 0
    return sum(p.stat().st_size for p in unet.iterdir() if p.suffix in (".safetensors", ".bin"))
