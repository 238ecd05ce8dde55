"""The `train:` section: what the lightweight trainer trains, on which files, and how it evaluates."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dgaug.core.scores import ScoreFilter, cosine_bound
from dgaug.core.templates import check_template


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainData(_Strict):
    """Where the training data is. Folders of shards as dgaug writes them; null: not used."""

    real: str | None = Field(None, description="Folder of real webdataset shards (clip mode).")
    edsam: str | None = Field(
        None, description="Folder of ED-SAM shards paired with `real` by source key (clip mode)."
    )
    features: str | None = Field(
        None, description="Folder of features Parquet files (probe, coop and cocoop modes)."
    )
    ldfs: str | None = Field(
        None, description="Folder of LDFS synthetic features Parquet files (probe, coop, cocoop)."
    )
    domains: list[str] | None = Field(
        None,
        description="Train only on samples of these domains (single-source DG: one); null: all.",
    )
    edsam_features: bool = Field(
        False, description="probe/coop/cocoop: also train on the ED-SAM rows of the features files."
    )
    min_caption_score: float | None = cosine_bound(
        "Leave out ED-SAM samples whose caption_score (cos to their caption, in the features "
        "files) is below this; null: keep all. Reads train.data.features."
    )
    max_source_similarity: float | None = cosine_bound(
        "Leave out ED-SAM samples whose source_similarity (cos to their source image) is above "
        "this (near copies); null: keep all. Reads train.data.features."
    )

    @property
    def score_filter(self) -> ScoreFilter:
        return ScoreFilter(self.min_caption_score, self.max_source_similarity)


class EvalConfig(_Strict):
    """The held-out evaluation set and what is measured on it."""

    kind: Literal["image_folder", "shards", "features"] = "image_folder"
    path: str | None = Field(
        None,
        description="image_folder: root/<domain>/<class>/*.jpg; shards: a folder of .tar shards "
        "whose json has label and domain; features: a features stage's Parquet folder (its real "
        "rows, embedded by the model that made them: probe, coop, cocoop only). null: none.",
    )
    domains: list[str] | None = Field(None, description="Domains to evaluate; null: all found.")
    caption_template: str = Field(
        "a {domain} of a {label}",
        description="image_folder: the caption of each image, for retrieval.",
    )
    class_template: str = Field(
        "a photo of a {label}", description="Zero-shot class prompts (clip and probe modes)."
    )
    max_per_domain: int | None = Field(
        None, ge=1, description="Evaluate at most this many images per domain (first in order)."
    )
    batch_size: int = Field(128, ge=1)

    @field_validator("caption_template")
    @classmethod
    def _caption(cls, v: str) -> str:
        return check_template(v, ("domain", "label"))

    @field_validator("class_template")
    @classmethod
    def _class(cls, v: str) -> str:
        return check_template(v, ("label",))


class TrainConfig(_Strict):
    """One training run of the lightweight trainer (`dgaug train`)."""

    mode: Literal["clip", "probe", "coop", "cocoop"] = Field(
        "clip",
        description="clip: contrastive training of an open_clip model on real + ED-SAM pairs; "
        "probe: a linear probe on features (real + LDFS); coop: learnable prompt context; "
        "cocoop: CoOp's context shifted per image by a meta-net of its feature.",
    )
    model: str | None = Field(
        None,
        description="open_clip spec: the starting weights (clip), the frozen model (coop), the "
        "model that embeds evaluation images (probe). null: the model named in the features files.",
    )
    output: str | None = Field(None, description="Folder of checkpoints and results.")
    data: TrainData = Field(default_factory=TrainData)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seed: int = Field(0, ge=0, lt=2**63)
    device: str = "auto"
    precision: str = Field(
        "auto", description="auto: bf16 autocast on a GPU, fp32 on the CPU; float32, bfloat16."
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads on CPU; fix it where a resume must match bit for bit.",
    )
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (before `epochs` ends)."
    )
    batch_size: int = Field(64, ge=2, description="Samples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up, then cosine decay to 0.")
    edsam_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="clip: the share of each real batch that also gets one of its ED-SAM samples; "
        "the loss is L_CLIP(real) + L_CLIP(ED-SAM, same captions). 0: real only.",
    )
    synthetic_weight: float = Field(
        1.0,
        ge=0,
        description="probe, coop, cocoop: the loss weight of each LDFS synthetic row (a real row "
        "weighs 1). 0: the synthetic rows are not read (training on real only).",
    )
    n_ctx: int = Field(4, ge=1, le=32, description="coop, cocoop: learnable context tokens.")
    ctx_init: str | None = Field(
        "a photo of a",
        description="coop, cocoop: n_ctx words the context starts from; null: random.",
    )
    checkpoint_every: int = Field(50, ge=1, description="Optimizer steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (the newest).")
    decode_threads: int = Field(4, ge=1, description="clip: threads decoding images.")

    @model_validator(mode="after")
    def _ctx_words(self) -> TrainConfig:
        if self.ctx_init is not None and len(self.ctx_init.split()) != self.n_ctx:
            raise ValueError(
                f"ctx_init {self.ctx_init!r} has {len(self.ctx_init.split())} words; n_ctx is "
                f"{self.n_ctx} (give as many words, or null for a random start)"
            )
        return self

    def missing_inputs(self) -> list[str]:
        """`field: problem` for every input the mode needs but the config lacks."""
        out = []
        if self.output is None:
            out.append("train.output: required (where checkpoints and results go)")
        if self.mode == "clip":
            if self.eval.kind == "features":
                out.append(
                    "train.eval.kind: features are the starting model's embeddings; clip mode "
                    "changes the model, so it evaluates images (image_folder or shards)"
                )
            if self.data.real is None:
                out.append("train.data.real: clip mode needs a folder of real shards")
            if self.data.score_filter.active and self.data.features is None:
                out.append(
                    "train.data.features: min_caption_score / max_source_similarity read the "
                    "ED-SAM samples' scores from the features files"
                )
        elif self.data.features is None:
            out.append(f"train.data.features: {self.mode} mode needs a folder of features files")
        return out
