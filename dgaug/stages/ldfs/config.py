"""Manifest section of the LDFS stage (`stages.ldfs`); light, imported by the schema."""

from __future__ import annotations

import string
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# `method: lads` is LADS's code at github.com/lisadunlap/LADS 5dc41d6: where a field is not set,
# these are its values (configs/base.yaml, methods/augmentations.py); `method: ldfs` keeps the
# field defaults.
LADS_DEFAULTS: dict[str, object] = {
    "lr": 0.005,  # configs/base.yaml:46 AUGMENTATION.MODEL.LR
    "weight_decay": 0.05,  # configs/base.yaml:47 AUGMENTATION.MODEL.WEIGHT_DECAY
    "optimizer": "hf_adamw",  # methods/augmentations.py:9,325 transformers' AdamW
    "selection": "lads",  # methods/augmentations.py:336-347
    "patience": None,  # methods/augmentations.py:336 every epoch runs
    "class_text": "a photo of a {label}",  # methods/augmentations.py:305
}


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

    `method: lads` is the LADS baseline, equal to LADS's code at 5dc41d6 (one MLP per target
    domain, per-class text directions, transformers 4.x AdamW, its selection and defaults: fields
    it leaves unset take `LADS_DEFAULTS`). `method: ldfs` is this project's reconstruction of LDFS
    (arXiv 2405.02586): a residual mapper conditioned on the target domain's (or the instance's)
    text embedding, trained with per-instance text directions under stochastic text noise, a
    consistency loss and a pairwise regularizer. How e_k is formed, how the noise is tied between
    conditioning and directions, the attribute choice, the anchored pairwise term and the early
    stopping are reconstructions, documented in `fit.py`.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run the stage; false: skip it.")
    method: Literal["ldfs", "lads"] = Field(
        "ldfs",
        description="ldfs: shared or per-domain residual mapper, instance directions, text noise, "
        "pairwise regularizer; lads: the LADS baseline (per-domain MLP, per-class directions).",
    )
    source_domain: str | list[str] = Field(
        "photo",
        description="Text description of the source domain, or several (LADS's "
        "NEUTRAL_TEXT_PROMPTS): each image's source text is the one of its class most similar "
        "to the image feature (argmax of f . T_src).",
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
        "appended. Also gives the class texts of the consistency loss (at the source domain) "
        "unless `class_text` is set.",
    )
    class_text: str | None = Field(
        None,
        description="Template of the class texts of the class-consistency loss, with {label}; "
        "null: `class_template` at the (first) source domain. lads default: 'a photo of a "
        "{label}' whatever the source domain, as LADS.",
    )
    target_class_texts: bool = Field(
        False,
        description="The class-consistency loss of target k scores against the class texts at "
        "target k (`class_template`), not the source's: LADS's DOM_SPECIFIC_XE.",
    )
    caption_template: str = Field(
        "a {domain} of {caption}", description="Instance text of caption datasets."
    )
    attributes: str | None = Field(
        None,
        description="Path to a JSON file {label: [attribute, ...]}: one attribute per instance "
        "is appended to the class text (ldfs, class datasets only); `attribute_choice` says which.",
    )
    attribute_choice: Literal["per_step", "per_image"] = Field(
        "per_step",
        description="per_step: a uniformly random attribute of the class, drawn every step; "
        "per_image: each image's `attribute_top_k` attributes whose source text ('<class text>, "
        "<attribute>') is most CLIP-similar to its feature, chosen once (one of them at random "
        "per step when top_k > 1).",
    )
    attribute_top_k: int = Field(
        1, ge=1, le=1000, description="per_image: how many best-matching attributes to keep."
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
    condition: Literal["domain", "instance"] = Field(
        "domain",
        description="shared mapper: condition on the target's text embedding e_k (domain), or on "
        "the instance's own text at the target (instance: the caption or class + attribute text "
        "at target k), in training and at synthesis.",
    )
    pairwise: Literal["within", "anchored"] = Field(
        "within",
        description="within: L_pr = mean (cos(f_i, f_j) - cos(f^_i, f^_j))^2; anchored: plus the "
        "batch variance of cos(f_i, f^_i), so that every feature moves by the same angle.",
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
    lr: float = Field(1e-3, gt=0, le=10, description="AdamW learning rate (lads default 0.005).")
    weight_decay: float = Field(
        0.0, ge=0, le=10, description="AdamW (decoupled) weight decay (lads default 0.05)."
    )
    optimizer: Literal["torch_adamw", "hf_adamw"] = Field(
        "torch_adamw",
        description="torch_adamw: torch.optim.AdamW (eps 1e-8); hf_adamw: transformers 4.x's "
        "AdamW that LADS uses (eps 1e-6 added before bias correction, decay after the update); "
        "lads default hf_adamw.",
    )
    selection: Literal["row_mean", "lads"] = Field(
        "row_mean",
        description="row_mean: keep the epoch with the lowest mean loss over validation rows, in "
        "a fixed order with fixed noise draws; lads: LADS's, the unweighted mean of batch losses "
        "over the validation split reshuffled every epoch (lads default).",
    )
    val_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Held-out fraction of the source features; the state with the lowest loss on "
        "it is kept. 0: select on the training loss.",
    )
    patience: int | None = Field(
        10,
        ge=1,
        description="Stop after this many epochs without improvement; null: never (lads default).",
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
    def _source(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or any(not s.strip() for s in items):
            raise ValueError("source descriptions must be non-empty")
        if len(set(items)) != len(items):
            raise ValueError(f"duplicate source descriptions: {items}")
        return v

    @field_validator("class_text")
    @classmethod
    def _class_text(cls, v: str | None) -> str | None:
        if v is not None and _template_fields(v) != {"label"}:
            raise ValueError(f"must contain {{label}} and no other field, got {v!r}")
        return v

    @model_validator(mode="after")
    def _method_defaults(self) -> LdfsConfig:
        if self.method == "lads":
            for name, value in LADS_DEFAULTS.items():
                if name not in self.model_fields_set:
                    setattr(self, name, value)
            bad = [
                name
                for name, default in (("condition", "domain"), ("pairwise", "within"))
                if getattr(self, name) != default
            ]
            if bad:
                raise ValueError(f"{', '.join(bad)}: ldfs options, not lads's")
        elif self.condition == "instance" and self.mapper != "shared":
            raise ValueError("condition: instance conditions the shared mapper; set mapper: shared")
        return self

    @property
    def source_domains(self) -> list[str]:
        """The source descriptions as a list (one or several)."""
        return [self.source_domain] if isinstance(self.source_domain, str) else self.source_domain

    @field_validator("class_template")
    @classmethod
    def _class_template(cls, v: str) -> str:
        return _check_template(v, "label")

    @field_validator("caption_template")
    @classmethod
    def _caption_template(cls, v: str) -> str:
        return _check_template(v, "caption")
