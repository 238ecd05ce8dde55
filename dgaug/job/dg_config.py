"""The `dg:` section: which protocols, arms, augmentations and seeds `dgaug dg` sweeps."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ARMS = ("zero_shot", "probe", "coop", "cocoop")
AUGMENTATIONS = ("none", "lads", "ldfs")
PROTOCOLS = ("single_source", "leave_one_out")


def _unique(v: list[Any]) -> list[Any]:
    if len(set(v)) != len(v):
        raise ValueError(f"duplicates in {v}")
    return v


class DgConfig(BaseModel):
    """A domain-generalization sweep over an image-folder dataset's domains (`dgaug dg`).

    Single source: train on one domain, test on each other one. Leave one out: train on all
    domains but one, test on it. Each (protocol split, arm, augmentation, seed) is one cell;
    the table's cells are mean ± std over `seeds`. Fix these before looking at any result.
    """

    model_config = ConfigDict(extra="forbid")

    protocols: list[Literal["single_source", "leave_one_out"]] = Field(
        default_factory=lambda: list(PROTOCOLS), min_length=1
    )
    arms: list[Literal["zero_shot", "probe", "coop", "cocoop"]] = Field(
        default_factory=lambda: list(ARMS),
        min_length=1,
        description="zero_shot: the frozen CLIP with the eval class template; the others are "
        "train modes on the features (the manifest's `train:` section, plus `arm_settings`).",
    )
    augmentations: list[Literal["none", "lads", "ldfs"]] = Field(
        default_factory=lambda: list(AUGMENTATIONS),
        min_length=1,
        description="none: real features only; lads / ldfs: plus the ldfs stage's synthetic "
        "features of the split's target domains (stages.ldfs with method lads / ldfs).",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="Each seed is the trainer's seed (and, with ldfs_per_seed, the ldfs stage's).",
    )
    ldfs_per_seed: bool = Field(
        True,
        description="true: the ldfs stage is fitted and run again for every seed (its draws "
        "count in the std); false: once per split with the manifest's seed (cheaper).",
    )
    domains: list[str] | None = Field(
        None, description="Domain folders to sweep (at least 2); null: every one found."
    )
    domain_texts: dict[str, str] = Field(
        default_factory=dict,
        description="Domain folder -> its text for LDFS/LADS (e.g. Real_World: photo); a "
        "folder not named here reads as its name with '_' as spaces.",
    )
    arm_settings: dict[Literal["probe", "coop", "cocoop"], dict[str, Any]] = Field(
        default_factory=dict,
        description="Per arm, train fields that replace the `train:` section's (e.g. lr).",
    )

    @field_validator("protocols", "arms", "augmentations", "seeds")
    @classmethod
    def _no_duplicates(cls, v: list[Any]) -> list[Any]:
        return _unique(v)

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(v) < 2:
            raise ValueError("a sweep needs at least 2 domains")
        return v if v is None else _unique(v)

    def text(self, domain: str) -> str:
        return self.domain_texts.get(domain, domain.replace("_", " "))
