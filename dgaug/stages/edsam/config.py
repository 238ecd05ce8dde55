"""Manifest section of the ED-SAM stage (`stages.edsam`); light, imported by the schema."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dgaug.core.constants import TINY

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"

# Fields that only matter for objective `worst`: left out of the effective config otherwise.
WORST_ONLY = ("reference_clip", "candidates", "refine_steps", "refine_lr", "score_size")


class EdsamConfig(BaseModel):
    """ED-SAM: M samples per real image from a latent diffusion model, moved by the transport T.

    Defaults follow METHODS.md section 1; `start`, `alpha` shapes other than scalar, `objective`
    worst and its scoring are this project's reconstructions, not the paper's.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    model: str = Field(
        SD15,
        description="LDM: a hub id, a local diffusers folder, a single-file .safetensors "
        "checkpoint, or tiny-random (tests, demo).",
    )
    # Not `model_config`: pydantic reserves that name for a model's own settings.
    model_config_dir: str | None = Field(
        None,
        description="Single-file model only: a local diffusers folder of the checkpoint's "
        "architecture (model_index.json and each part's config and tokenizer files; its weights "
        "are not read). null: diffusers infers the architecture and reads its configs from the "
        "Hugging Face Hub (or the local HF cache).",
    )
    reference_clip: str = Field(
        "ViT-B-32:laion2b_s34b_b79k",
        description="CLIP scoring candidates (objective worst only): ARCH:TAG, hf-hub:..., "
        "ARCH:/path.safetensors or tiny-random.",
    )
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cpu_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch threads while a shard runs on the CPU; null: torch's default (the "
        "machine's cores). CPU results depend on it, so fix it where bytes must match elsewhere.",
    )
    compile: bool = Field(False, description="torch.compile the UNet (GPU; slow first batch).")
    allow_cpu: bool = Field(
        False, description="Allow a full-size model on CPU (very slow); tiny-random always may."
    )
    rho: float = Field(0.5, ge=0, le=10, description="Transport bound: alpha ~ U(-rho, rho).")
    samples_per_image: int = Field(10, ge=1, le=1000, description="M: samples per real image.")
    start: Literal["latent", "inverted"] = Field(
        "inverted",
        description="z_s: the DDIM inversion of the image latent to the last step (denoise from "
        "pure noise level; the transport's Gaussian reading, METHODS.md) or the image latent "
        "itself (denoise from the step whose alpha-bar is 1/2: an img2img of strength ~0.35).",
    )
    alpha: Literal["scalar", "channel", "element"] = Field(
        "scalar", description="Shape of alpha: one number, one per latent channel, or per element."
    )
    objective: Literal["random", "worst", "none"] = Field(
        "random",
        description="random: the paper's sampling; worst: keep the candidate alpha the reference "
        "CLIP finds hardest; none: alpha = 0 (plain partial denoising, the SDEdit baseline).",
    )
    candidates: int = Field(4, ge=1, le=256, description="K: candidate alphas per sample (worst).")
    refine_steps: int = Field(
        0, ge=0, le=100, description="Projected gradient-ascent steps on alpha (worst); 0: none."
    )
    refine_lr: float = Field(
        0.1, gt=0, le=10, description="Refinement step, as a fraction of rho per step."
    )
    score_size: int = Field(
        128, ge=16, le=4096, description="Side in pixels at which candidates are decoded to score."
    )
    sampler: Literal["ddim", "dpmpp_2m", "euler", "lcm"] = Field(
        "ddim",
        description="Denoising sampler from the start step: ddim (ours; also inverts), dpmpp_2m "
        "(DPM-Solver++ 2M), euler, lcm (LCM models and LCM-LoRA; draws noise per sample), all "
        "diffusers' schedulers on our evenly spaced (from the last step: trailing) timesteps.",
    )
    steps: int = Field(20, ge=1, le=1000, description="Sampler steps counted from the start step.")
    guidance: float = Field(5.0, ge=0, le=50, description="Classifier-free guidance scale.")
    image_size: int = Field(
        512, ge=16, le=2048, description="Side of the generated images (a multiple of 8)."
    )
    source_batch: int = Field(
        16,
        ge=1,
        le=4096,
        description="Source images processed together; their captions are each other's "
        "negatives in the worst objective's contrastive loss.",
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Samples per UNet / VAE batch.")
    output_size: int | None = Field(
        None,
        ge=16,
        le=4096,
        description="Side of the written images, resized from image_size after decoding. "
        "null: each source image's short side, i.e. the size the real shards (and CLIP) use.",
    )
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality of the written images.")
    lora: str | None = Field(
        None,
        description="LoRA weights fused into the UNet: a local .safetensors file or its folder "
        "(e.g. LCM-LoRA, with sampler lcm and guidance ~1-2). null: none.",
    )
    decoder: Literal["vae", "tiny"] = Field(
        "vae",
        description="vae: the LDM's own decoder; tiny: an AutoencoderTiny (TAESD) from "
        "`tiny_decoder`, for the samples and for worst's scoring: a fraction of the decode FLOPs.",
    )
    tiny_decoder: str | None = Field(
        None,
        description="decoder tiny: a local diffusers folder of AutoencoderTiny weights (TAESD for "
        "SD-1.x/2.x, TAESDXL for SDXL), or tiny-random.",
    )

    # Fields that cannot change a written byte: left out of the fingerprint, so they can be changed
    # between a killed run and its resume. `allow_cpu` only permits or refuses a load.
    # batch_size, device, dtype and compile ARE fingerprinted: batched float arithmetic, the device,
    # the precision and compiled kernels all change the pixels (slightly), and the promise is
    # byte-identical shards. `device: auto` is fingerprinted as written: the worker resolves it.
    PERFORMANCE_FIELDS: ClassVar[frozenset[str]] = frozenset({"enabled", "allow_cpu"})

    @field_validator("model")
    @classmethod
    def _not_pickled(cls, v: str) -> str:
        if v.lower().endswith(".ckpt"):
            raise ValueError(
                "a pickled .ckpt checkpoint runs code when loaded; use its .safetensors version"
            )
        return v

    @field_validator("image_size")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE's downsampling), got {v}")
        return v

    @model_validator(mode="after")
    def _tiny_decoder_named(self) -> EdsamConfig:
        if self.decoder == "tiny" and not self.tiny_decoder:
            raise ValueError(
                "decoder tiny needs tiny_decoder: a local AutoencoderTiny folder (TAESD) or "
                "tiny-random"
            )
        return self

    @model_validator(mode="after")
    def _config_dir_for_single_files(self) -> EdsamConfig:
        if self.model_config_dir and not self.model.lower().endswith(".safetensors"):
            raise ValueError(
                "model_config_dir is only for a single-file .safetensors model; a diffusers "
                "folder or hub id carries its own configs"
            )
        return self

    @property
    def tiny(self) -> bool:
        return self.model == TINY

    def effective(self) -> dict[str, Any]:
        """The settings that decide the output bytes; fields without effect are null."""
        cfg = self.model_dump(mode="json", exclude=set(self.PERFORMANCE_FIELDS))
        if self.objective != "worst":
            for name in WORST_ONLY:
                cfg[name] = None
        elif self.refine_steps == 0:
            cfg["refine_lr"] = None
        if self.decoder == "vae":
            cfg["tiny_decoder"] = None
        return cfg
