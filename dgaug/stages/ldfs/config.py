"""Manifest section of the LDFS stage (`stages.ldfs`); light, imported by the schema."""

from __future__ import annotations

import string
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _template_fields(template: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # an unmatched brace
        raise ValueError(f"not a valid format string: {e}") from None
    return {name for _, name, _, _ in parsed if name is not None}


def _check_template(template: str, slot: str) -> str:
    fields = _template_fields(template)
    expected = {"domain", slot}
    if fields != expected:
        # An unknown or positional field would fail at format time, deep inside a run.
        raise ValueError(
            f"must contain {{domain}} and {{{slot}}} and no other field, got {sorted(fields)}"
        )
    return template


class LdfsConfig(BaseModel):
    """LDFS feature synthesis: a text-guided mapper from source CLIP image features to target domains.

    `method: lads` is the LADS baseline (one MLP per target domain, per-class text directions).
    `method: ldfs` is this project's reconstruction of LDFS (arXiv 2405.02586): a residual mapper
    conditioned on the target domain's text embedding, trained with per-instance text directions
    under stochastic text noise, a consistency loss and a pairwise regularizer. How e_k is formed,
    how the noise is tied between conditioning and directions, the attribute sampling, the class
    weights and the early stopping are reconstructions, documented in `fit.py`.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run the stage; false: skip it.")
    method: Literal["ldfs", "lads"] = Field(
        "ldfs",
        description="ldfs: shared or per-domain residual mapper, instance directions, text noise, "
        "pairwise regularizer; lads: the LADS baseline (per-domain MLP, per-class directions).",
    )
    source_domain: str = Field(
        "photo", min_length=1, description="Text description of the source domain."
    )
    targets: list[str] = Field(
        ...,
        min_length=1,
        description="Text descriptions of the target domains, e.g. [sketch, cartoon, painting]; "
        "each real feature yields one synthesized feature per target (times `draws`).",
    )
    class_template: str = Field(
        "a {domain} of a {label}",
        description="Instance text of class datasets; with `attributes`, ', {attribute}' is "
        "appended. Also gives the class texts of the consistency loss (at the source domain).",
    )
    caption_template: str = Field(
        "a {domain} of {caption}", description="Instance text of caption datasets."
    )
    attributes: str | None = Field(
        None,
        description="Path to a JSON file {label: [attribute, ...]}: one attribute per instance "
        "per step is appended to the class text (ldfs, class datasets only).",
    )
    sigma: float = Field(
        0.02,
        ge=0,
        le=10,
        description="Std of the Gaussian noise added to text embeddings (per dimension) before "
        "renormalizing; 0: no noise. Ignored by lads.",
    )
    draws: int = Field(
        1,
        ge=1,
        le=100,
        description="K': synthesized features per real feature and target, each conditioned on a "
        "fresh noisy target embedding. Without noise (sigma 0, per_domain, lads) the draws are "
        "identical.",
    )
    mapper: Literal["shared", "per_domain"] = Field(
        "shared",
        description="ldfs: one mapper conditioned on the target's text embedding, or one "
        "unconditioned mapper per target.",
    )
    hidden: int = Field(384, ge=1, le=65536, description="Hidden width of the mapper MLP.")
    lambda_ld: float = Field(1.0, ge=0, description="Weight of the local direction loss (ldfs).")
    lambda_cons: float = Field(1.0, ge=0, description="Weight of the consistency loss (ldfs).")
    lambda_pr: float = Field(1.0, ge=0, description="Weight of the pairwise regularizer (ldfs).")
    lads_alpha: float = Field(
        0.5, ge=0, le=1, description="lads: loss = alpha * L_dir + (1 - alpha) * L_cls."
    )
    consistency: Literal["auto", "class", "caption"] = Field(
        "auto",
        description="class: class-weighted CE against class texts (needs labels); caption: "
        "in-batch contrastive loss against each feature's caption (needs captions); auto: class "
        "when labels exist. Also picks the instance text of the directions.",
    )
    epochs: int = Field(50, ge=1, le=100000, description="Training epochs over the source split.")
    batch_size: int = Field(256, ge=1, le=1 << 20, description="Source features per step.")
    lr: float = Field(1e-3, gt=0, le=10, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=10, description="AdamW (decoupled) weight decay.")
    val_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Held-out fraction of the source features; the state with the lowest loss on "
        "it is kept. 0: select on the training loss.",
    )
    patience: int | None = Field(
        10, ge=1, description="Stop after this many epochs without improvement; null: never."
    )
    dtype: Literal["float16", "float32"] = Field(
        "float16", description="Storage dtype of the synthesized embeddings."
    )

    # `enabled` decides whether the stage runs, never what it writes.
    PERFORMANCE_FIELDS: ClassVar[frozenset[str]] = frozenset({"enabled"})

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if any(not t.strip() for t in v):
            raise ValueError("target descriptions must be non-empty")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate target descriptions: {v}")
        return v

    @field_validator("source_domain")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be non-empty")
        return v

    @field_validator("class_template")
    @classmethod
    def _class_template(cls, v: str) -> str:
        return _check_template(v, "label")

    @field_validator("caption_template")
    @classmethod
    def _caption_template(cls, v: str) -> str:
        return _check_template(v, "caption")
