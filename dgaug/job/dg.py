"""`dgaug dg`: the domain-generalization sweep, composed from pipeline runs and trainer runs.

For each split (single source: one domain -> the others; leave one out: the others -> one) the
pipeline embeds the split's training domains (download + features) once, and runs the ldfs stage
once per (method, seed) on a hard-linked copy of those committed shards; one more run embeds every
domain for evaluation. Then each (split, arm, augmentation, seed) cell is one `dgaug train` run on
those files, evaluated on the cached features of the held-out domains. Every step resumes: the
pipeline skips committed shards, and a cell whose trainer output holds the same config is read back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgaug.core import atomic
from dgaug.core.storage import Storage
from dgaug.job.dg_config import DgConfig
from dgaug.job.dg_table import PROTOCOL_VERSION, markdown, summarize
from dgaug.job.manifest import Manifest, ManifestError, validate

log = logging.getLogger(__name__)

DG_DIR = "dg"
TABLE_JSON = "table.json"
TABLE_MD = "table.md"


@dataclass(frozen=True)
class Split:
    """One training setting of the sweep: train on `train`, test on `targets`."""

    protocol: str  # single_source | leave_one_out
    train: tuple[str, ...]
    targets: tuple[str, ...]

    @property
    def name(self) -> str:
        if self.protocol == "single_source":
            return f"from-{self.train[0]}"
        return f"to-{self.targets[0]}"


def splits(domains: list[str], protocols: list[str]) -> list[Split]:
    out = []
    if "single_source" in protocols:
        for d in domains:
            out.append(Split("single_source", (d,), tuple(x for x in domains if x != d)))
    if "leave_one_out" in protocols:
        for d in domains:
            out.append(Split("leave_one_out", tuple(x for x in domains if x != d), (d,)))
    return out


def sweep(m: Manifest, on_event: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the manifest's DG sweep; returns the table record also written to
    OUTPUT/dg/table.json and table.md. Raises ManifestError for a manifest that cannot sweep."""
    say = on_event or (lambda _: None)
    dg = m.dg or DgConfig()
    root = _check(m)
    work = Path(root) / DG_DIR
    folder = _image_folder(m, work, say)
    domains = _domains(folder, dg)
    split_list = splits(domains, dg.protocols)
    say(f"domains {domains}; {len(split_list)} splits; seeds {dg.seeds}")

    evals = _pipeline(m, dg, folder, domains, work / "runs" / "all", None, 0, say)
    cells: dict[str, dict[str, dict[str, float]]] = {}
    for split in split_list:
        base = work / "runs" / split.name / "base"
        _pipeline(m, dg, folder, list(split.train), base, None, 0, say)
        synth: dict[tuple[str, int], Path] = {}
        for aug in dg.augmentations:
            if aug == "none":
                continue
            for seed in dg.seeds if dg.ldfs_per_seed else [m.seed]:
                out = work / "runs" / split.name / f"{aug}-s{seed}"
                _link_committed(base, out)
                _pipeline(m, dg, folder, list(split.train), out, (aug, split), seed, say)
                synth[aug, seed] = out / "ldfs"
            if not dg.ldfs_per_seed:
                synth.update({(aug, s): synth[aug, m.seed] for s in dg.seeds})
        cells[split.name] = _train_cells(m, dg, split, base, synth, evals, work, say)

    record = {
        "protocol_version": PROTOCOL_VERSION,
        "dataset": folder,
        "domains": domains,
        "config": dg.model_dump(mode="json"),
        "train": _train_section(m),
        "splits": {
            s.name: {"protocol": s.protocol, "train": s.train, "targets": s.targets}
            for s in split_list
        },
        "cells": cells,
        "tables": summarize(split_list, cells, dg, domains),
    }
    atomic.atomic_write(work / TABLE_JSON, json.dumps(record, indent=2) + "\n")
    atomic.atomic_write(work / TABLE_MD, markdown(record) + "\n")
    return record


# ------------------------------------------------------------------------------------ inputs


def _check(m: Manifest) -> str:
    storage = Storage(m.output)
    problems = []
    if not storage.is_local:
        problems.append(f"output: {m.output}: the sweep trains from local folders only")
    if m.source.kind not in ("image_folder", "synthetic"):
        problems.append(
            f"source.kind: {m.source.kind}: the sweep needs domains of a class dataset "
            "(image_folder, or the synthetic toy world)"
        )
    if m.stages.features is None:
        problems.append("stages.features: the sweep trains on CLIP features; give its model")
    dg = m.dg or DgConfig()
    if any(a != "none" for a in dg.augmentations) and m.stages.ldfs is None:
        problems.append("stages.ldfs: the lads / ldfs augmentations need the stage's settings")
    if problems:
        raise ManifestError(problems)
    return storage.path("")


def _image_folder(m: Manifest, work: Path, say) -> str:
    """The dataset root: the image_folder source's, or the toy world drawn into one (the synthetic
    source's `eval_images` images in every style, written once)."""
    src = m.source
    if src.kind == "image_folder":
        return str(Path(src.path).resolve())
    if not src.eval_images:
        raise ManifestError(["source.eval_images: the toy world sweep draws this many images"])
    storage = Storage(str(work / "world"))
    say(f"drawing the toy world: {src.eval_images} images")
    src.write_eval_images(storage, m.seed)
    return storage.path("eval/images")


def _domains(folder: str, dg: DgConfig) -> list[str]:
    root = Path(folder)
    found = sorted(
        d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))
    )
    if dg.domains is None:
        if len(found) < 2:
            raise ManifestError(
                [f"source.path: {folder} has {len(found)} domain folder(s); need 2"]
            )
        return found
    missing = [d for d in dg.domains if d not in found]
    if missing:
        raise ManifestError([f"dg.domains: no folder {missing} in {folder} (found {found})"])
    return list(dg.domains)


# ---------------------------------------------------------------------------------- pipeline


def _pipeline(m, dg, folder, domains, out: Path, ldfs, seed: int, say) -> Path:
    """download + features of `domains` into `out` (and the ldfs stage for (method, split))."""
    from dgaug.job.run import run_pipeline

    data = m.model_dump(mode="json", exclude={"train", "dg", "mix", "name"})
    caption = getattr(m.source, "caption_template", "a {domain} of a {label}")
    data.update(output=str(out), seed=seed if ldfs else m.seed)
    data["source"] = {
        "kind": "image_folder",
        "path": folder,
        "domains": list(domains),
        "caption_template": caption,
    }
    stages = data["stages"]
    stages["edsam"] = None
    stages["ldfs"] = None
    if ldfs is not None:
        method, split = ldfs
        stages["ldfs"] = {
            **m.stages.ldfs.model_dump(mode="json"),
            "enabled": True,
            "method": method,
            # Several training domains (leave one out) are named together as one source text.
            "source_domain": " and ".join(dg.text(d) for d in split.train),
            "targets": [dg.text(d) for d in split.targets],
        }
    manifest = validate(data)
    what = "ldfs " + ldfs[0] if ldfs else "features"
    say(f"{Path(*out.parts[-3:])}: {what}")
    summary = run_pipeline(manifest)
    if not summary.ok:
        raise RuntimeError(f"the pipeline run into {out} failed; see `dgaug status` there")
    return out


def _link_committed(base: Path, out: Path) -> None:
    """out/real and out/features as hard links of base's committed shards and markers: the same
    source, download and features settings (no seed in their fingerprints for an image folder),
    so the pipeline skips them and runs only the ldfs stage."""
    for stage in ("real", "features"):
        dst = out / stage
        if dst.exists():
            continue
        tmp = out / f".{stage}.linking"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(base / stage, tmp, copy_function=_link_or_copy)
        os.replace(tmp, dst)  # whole or absent: a killed copy is redone


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


# ----------------------------------------------------------------------------------- training


def _train_section(m: Manifest) -> dict[str, Any]:
    return m.train.model_dump(mode="json", exclude_unset=True) if m.train else {}


def _train_cells(m, dg: DgConfig, split: Split, base: Path, synth, evals: Path, work, say):
    """{cell name: {target domain: accuracy}} for every arm, augmentation and seed of `split`."""
    out: dict[str, dict[str, float]] = {}
    modes = [a for a in dg.arms if a != "zero_shot"]
    if "zero_shot" in dg.arms and "probe" not in modes:
        modes.insert(0, "probe")  # the zero-shot numbers come with the probe's evaluation
    for mode in modes:
        metric = "probe" if mode == "probe" else "zero_shot"
        # A probe run only for the zero-shot numbers needs one augmentation: the head is the same.
        augs = dg.augmentations if mode in dg.arms else dg.augmentations[:1]
        for aug in augs:
            for seed in dg.seeds:
                name = f"{mode}-{aug}-s{seed}"
                ldfs = None if aug == "none" else synth[aug, seed]
                cell_dir = work / "cells" / split.name / name
                ev = _cell(m, dg, mode, split, base, ldfs, evals, seed, cell_dir)["domains"]
                if mode in dg.arms:
                    out[name] = {t: ev[t][metric] for t in split.targets}
                if mode == "probe" and aug == augs[0] and "zero_shot" in dg.arms:
                    # The frozen CLIP's zero-shot head: the same for every augmentation.
                    out[f"zero_shot-none-s{seed}"] = {t: ev[t]["zero_shot"] for t in split.targets}
                scores = ", ".join(f"{t} {ev[t][metric]:.3f}" for t in split.targets)
                say(f"{split.name} {name}: {scores}")
    return out


def _cell(m, dg, mode, split, base, ldfs, evals, seed, output: Path) -> dict[str, Any]:
    from dgaug.trainer.config import TrainConfig
    from dgaug.trainer.run import train

    section = {**_train_section(m), **dg.arm_settings.get(mode, {})}
    section.update(
        mode=mode,
        seed=seed,
        output=str(output),
        data={
            "features": str(base / "features"),
            "ldfs": None if ldfs is None else str(ldfs),
            "domains": list(split.train),
        },
        eval={
            **section.get("eval", {}),
            "kind": "features",
            "path": str(evals / "features"),
            "domains": None,
        },
    )
    try:
        cfg = TrainConfig.model_validate(section)
    except ValueError as e:
        raise ManifestError([f"train / dg.arm_settings.{mode}: {e}"]) from None
    done = output / "eval.json"
    record = output / "train.json"
    finished = done.exists() and record.exists()
    if finished and json.loads(record.read_text()).get("config") == cfg.model_dump(mode="json"):
        return json.loads(done.read_text())
    train(cfg)
    return json.loads(done.read_text())
