"""One training run: load data and model for the mode, fit (resuming), save, evaluate, write results."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dgaug.core import atomic
from dgaug.core.hashing import record_hash
from dgaug.models.runtime import cpu_threads
from dgaug.trainer.config import TrainConfig
from dgaug.trainer.data import (
    DataError,
    FeatureSet,
    edsam_left_out,
    filter_domains,
    index_shards,
    read_features,
    read_synthetic,
)
from dgaug.trainer.loop import FitResult, LoopSettings, fit

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
RESULTS_JSON = "eval.json"
RESULTS_MD = "eval.md"
TRAIN_JSON = "train.json"
# Fields that change neither the batches nor the arithmetic: a resume may change them.
_NOT_FINGERPRINTED = {"output", "eval", "decode_threads", "checkpoint_every", "keep_checkpoints"}


@dataclass
class TrainResult:
    output: Path
    mode: str
    model: str
    steps: int
    resumed_from: int
    losses: list[float]
    classes: list[str] = field(default_factory=list)
    eval: dict | None = None
    table: str | None = None


def fingerprint(cfg: TrainConfig, model: str) -> str:
    record = cfg.model_dump(mode="json", exclude=_NOT_FINGERPRINTED)
    if record["synthetic_weight"] == 1.0:
        # Added later with 1 meaning what came before: checkpoints made earlier still resume.
        del record["synthetic_weight"]
    record["model"] = model
    return record_hash(record, 16)


def resolve_model(cfg: TrainConfig) -> str:
    """The CLIP spec: the configured one, else the one named in the features files."""
    if cfg.model:
        return cfg.model
    if cfg.data.features:
        import pyarrow.parquet as pq

        files = sorted(Path(cfg.data.features).glob("*.parquet"))
        if files:
            meta = pq.read_schema(files[0]).metadata or {}
            if b"dgaug.model" in meta:
                return meta[b"dgaug.model"].decode()
    raise DataError("train.model: required (an open_clip spec such as ViT-B-16:openai)")


def train(
    cfg: TrainConfig,
    *,
    on_step: Callable[[int, int, float], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train (or resume) as `cfg` says, then evaluate when an evaluation set is given.

    Raises DataError for inputs that cannot be used, CheckpointMismatch when `output` holds another
    config's checkpoints, ModelError for a model that cannot be loaded.
    """
    problems = cfg.missing_inputs()
    if problems:
        raise DataError("; ".join(problems))
    phase = on_phase or (lambda _: None)
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(output)
    model = resolve_model(cfg)
    fp = fingerprint(cfg, model)
    settings = LoopSettings(
        cfg.epochs,
        cfg.max_steps,
        cfg.grad_accum,
        cfg.lr,
        cfg.weight_decay,
        cfg.warmup_steps,
        cfg.checkpoint_every,
        cfg.keep_checkpoints,
    )
    # The loaders and the probe run on the CPU whatever the device: pin threads there.
    with cpu_threads(cfg.cpu_threads, torch.device("cpu")):
        runner = {
            "clip": _train_clip,
            "probe": _train_probe,
            "coop": _train_coop,
            "cocoop": _train_cocoop,
        }[cfg.mode]
        result = runner(cfg, model, fp, settings, on_step, phase)
    _write_json(output / TRAIN_JSON, _train_record(cfg, model, fp, result))
    if result.eval is not None:
        from dgaug.trainer.evaluate import markdown_table

        result.table = markdown_table(result.eval)
        _write_json(output / RESULTS_JSON, {"mode": cfg.mode, "model": model, **result.eval})
        _write_text(output / RESULTS_MD, result.table + "\n")
    return result


# ------------------------------------------------------------------------------------------ clip


def _load(cfg: TrainConfig, model: str):
    from dgaug.models.clip import load_clip

    return load_clip(model, device=cfg.device, precision=cfg.precision, seed=0)


def _train_clip(cfg, model, fp, settings, on_step, phase) -> TrainResult:
    from dgaug.trainer.evaluate import class_prompts, embed_eval_set, load_eval_set, zero_shot_head
    from dgaug.trainer.modes import ClipTask

    phase("indexing shards")
    real = filter_domains(index_shards(cfg.data.real), cfg.data.domains)
    edsam = index_shards(cfg.data.edsam) if cfg.data.edsam and cfg.edsam_ratio > 0 else []
    if edsam:
        left_out = _left_out(cfg, phase)
        edsam = [p for p in edsam if p.key not in left_out]
    clip = _load(cfg, model)
    pairs = load_eval_set(cfg.eval)
    classnames = sorted({p.label for p in pairs if p.label is not None})
    start = None
    if pairs:
        phase("evaluating the starting model")
        before = embed_eval_set(clip, pairs, batch_size=cfg.eval.batch_size, threads=4)
        prompts = class_prompts(classnames, cfg.eval.class_template)
        start = (zero_shot_head(clip.encode_text(prompts)), before.images)

    clip.model.train().requires_grad_(True)
    task = ClipTask(
        clip,
        real,
        edsam,
        batch_size=cfg.batch_size,
        edsam_ratio=cfg.edsam_ratio,
        seed=cfg.seed,
        decode_threads=cfg.decode_threads,
    )
    phase(f"training on {len(real)} real pairs" + (f" and {len(edsam)} ED-SAM" if edsam else ""))
    try:
        fitted = fit(task, settings, Path(cfg.output), fp, on_step=on_step)
    finally:
        task.close()
    clip.model.eval().requires_grad_(False)
    _save_weights(Path(cfg.output) / MODEL_FILE, clip.model.state_dict(), {"model": model})
    result = _result(cfg, model, fitted, classnames)
    if pairs:
        phase("evaluating")
        data = embed_eval_set(clip, pairs, batch_size=cfg.eval.batch_size, threads=4)
        head = zero_shot_head(clip.encode_text(class_prompts(classnames, cfg.eval.class_template)))
        result.eval = _evaluate(cfg, data, classnames, head, start)
    return result


# ------------------------------------------------------------------------------ features modes


def _left_out(cfg: TrainConfig, phase) -> set[str]:
    """The ED-SAM samples the score thresholds leave out (never deleted: only not trained on)."""
    flt = cfg.data.score_filter
    if not flt.active:
        return set()
    left_out, scored = edsam_left_out(cfg.data.features, flt)
    phase(f"{flt.describe()}: {len(left_out)} of {scored} ED-SAM samples left out")
    return left_out


def _train_set(cfg: TrainConfig, phase) -> tuple[FeatureSet, torch.Tensor | None]:
    """The training rows and their loss weights (None: all 1): real rows weigh 1, LDFS synthetic
    rows `synthetic_weight`; at 0 the synthetic rows are not read at all."""
    origins = ("real", "edsam") if cfg.data.edsam_features else ("real",)
    real = read_features(cfg.data.features, origins=origins, domains=cfg.data.domains)
    if cfg.data.edsam_features:
        left_out = _left_out(cfg, phase)
        if left_out:
            real = real.subset([i for i, k in enumerate(real.keys) if k not in left_out])
    if not cfg.data.ldfs or cfg.synthetic_weight == 0:
        return real, None
    # Only what LDFS made from the training rows: another domain's real rows must not leak in.
    sources = set(real.keys) if cfg.data.domains is not None else None
    synthetic = read_synthetic(cfg.data.ldfs, sources=sources)
    rows = FeatureSet.concat([real, synthetic])
    if cfg.synthetic_weight == 1.0:
        return rows, None
    weights = torch.ones(len(rows))
    weights[len(real) :] = cfg.synthetic_weight
    return rows, weights


def _classes(train: FeatureSet) -> list[str]:
    classes = sorted({label for label in train.labels if label is not None})
    if len(classes) < 2:
        raise DataError(
            f"{len(classes)} class label(s) in the training features; probe and coop need labels "
            "(a class dataset, or a url list with label_col) of at least 2 classes"
        )
    return classes


def _train_probe(cfg, model, fp, settings, on_step, phase) -> TrainResult:
    from dgaug.trainer.evaluate import class_prompts, eval_embeddings, zero_shot_head
    from dgaug.trainer.modes import ProbeTask

    phase("reading features")
    train_set, weights = _train_set(cfg, phase)
    classnames = _classes(train_set)
    task = ProbeTask(train_set, classnames, cfg.batch_size, cfg.seed, weights)
    phase(f"training a linear probe on {len(task.y)} features")
    fitted = fit(task, settings, Path(cfg.output), fp, on_step=on_step)
    weights = {"weight": task.weight.detach(), "bias": task.bias.detach()}
    _save_weights(Path(cfg.output) / MODEL_FILE, weights, {"model": model, "classes": classnames})
    result = _result(cfg, model, fitted, classnames)
    if cfg.eval.path is not None:
        phase("evaluating")
        clip = _load(cfg, model)
        _check_dim(clip, train_set)
        data = eval_embeddings(cfg.eval, clip)
        head = zero_shot_head(clip.encode_text(class_prompts(classnames, cfg.eval.class_template)))
        with torch.no_grad():
            result.eval = _evaluate(cfg, data, classnames, head, None, probe=task.logits)
    return result


def _train_coop(cfg, model, fp, settings, on_step, phase) -> TrainResult:
    from dgaug.trainer.evaluate import class_prompts, eval_embeddings, zero_shot_head
    from dgaug.trainer.modes import CoopTask
    from dgaug.trainer.prompts import PromptLearner

    train_set, weights, classnames, clip, words = _prompt_inputs(cfg, model, phase)
    learner = PromptLearner(
        clip.model, clip.tokenizer, words, n_ctx=cfg.n_ctx, init=cfg.ctx_init, seed=cfg.seed
    )
    task = CoopTask(
        learner, train_set, classnames, cfg.batch_size, cfg.seed, clip.logit_scale, weights
    )
    phase(f"learning {cfg.n_ctx} context tokens on {len(task.y)} features")
    fitted = fit(task, settings, Path(cfg.output), fp, on_step=on_step)
    _save_weights(
        Path(cfg.output) / MODEL_FILE,
        {"ctx": learner.ctx.detach()},
        {"model": model, "classes": classnames},
    )
    result = _result(cfg, model, fitted, classnames)
    if cfg.eval.path is not None:
        phase("evaluating")
        data = eval_embeddings(cfg.eval, clip)
        learned = zero_shot_head(learner.class_embeddings())
        start = zero_shot_head(clip.encode_text(class_prompts(classnames, cfg.eval.class_template)))
        result.eval = _evaluate(cfg, data, classnames, learned, (start, data.images))
    return result


def _train_cocoop(cfg, model, fp, settings, on_step, phase) -> TrainResult:
    from dgaug.trainer.cocoop import ConditionalPromptLearner
    from dgaug.trainer.evaluate import class_prompts, eval_embeddings, zero_shot_head
    from dgaug.trainer.modes import CocoopTask

    train_set, weights, classnames, clip, words = _prompt_inputs(cfg, model, phase)
    learner = ConditionalPromptLearner(
        clip.model,
        clip.tokenizer,
        words,
        image_dim=clip.embed_dim,
        n_ctx=cfg.n_ctx,
        init=cfg.ctx_init,
        seed=cfg.seed,
    )
    task = CocoopTask(
        learner, train_set, classnames, cfg.batch_size, cfg.seed, clip.logit_scale, weights
    )
    phase(f"learning {cfg.n_ctx} context tokens and a meta-net on {len(task.y)} features")
    fitted = fit(task, settings, Path(cfg.output), fp, on_step=on_step)
    _save_weights(
        Path(cfg.output) / MODEL_FILE,
        {k: v.detach() for k, v in learner.state_dict().items()},
        {"model": model, "classes": classnames},
    )
    result = _result(cfg, model, fitted, classnames)
    if cfg.eval.path is not None:
        phase("evaluating")
        data = eval_embeddings(cfg.eval, clip)
        start = zero_shot_head(clip.encode_text(class_prompts(classnames, cfg.eval.class_template)))
        learned = learner.classifier()
        result.eval = _evaluate(cfg, data, classnames, learned, (start, data.images))
    return result


# --------------------------------------------------------------------------------------- shared


def _prompt_inputs(cfg, model, phase):
    """What CoOp and CoCoOp start from: the training features and their loss weights, the class
    names, the CLIP model (checked against the features' width) and the class words to prompt."""
    phase("reading features")
    train_set, weights = _train_set(cfg, phase)
    classnames = _classes(train_set)
    clip = _load(cfg, model)
    _check_dim(clip, train_set)
    words = [c.replace("_", " ") for c in classnames]
    return train_set, weights, classnames, clip, words


def _evaluate(cfg, data, classnames, head, start, probe=None) -> dict:
    from dgaug.trainer.evaluate import evaluate

    return evaluate(
        data,
        classnames,
        classify=head,
        start=start,
        probe=probe,
        train_domains=cfg.data.domains,
    )


def _check_dim(clip, train: FeatureSet) -> None:
    if clip.embed_dim != train.embeddings.shape[1]:
        raise DataError(
            f"train.model {clip.model_id} embeds in {clip.embed_dim} dimensions but the features "
            f"have {train.embeddings.shape[1]}: use the model that made them ({train.model})"
        )


def _result(cfg, model, fitted: FitResult, classnames) -> TrainResult:
    return TrainResult(
        Path(cfg.output),
        cfg.mode,
        model,
        fitted.steps,
        fitted.resumed_from,
        fitted.losses,
        list(classnames),
    )


def _train_record(cfg: TrainConfig, model: str, fp: str, r: TrainResult) -> dict:
    return {
        "mode": cfg.mode,
        "model": model,
        "fingerprint": fp,
        "steps": r.steps,
        "resumed_from": r.resumed_from,
        "losses": r.losses,
        "classes": r.classes,
        "config": cfg.model_dump(mode="json"),
    }


def _remove_temporaries(output: Path) -> None:
    """A `dgaug train` killed inside _save_weights or _write_text leaves `.NAME.PID.tmp`; the
    names carry the pid, so no later run overwrites them: remove them before starting."""
    for name in (MODEL_FILE, TRAIN_JSON, RESULTS_JSON, RESULTS_MD):
        atomic.remove_temporaries(output, name)


def _save_weights(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    with atomic.atomic_path(path) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            tmp,
            metadata={"dgaug": json.dumps(meta, sort_keys=True)},
        )


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def _write_text(path: Path, text: str) -> None:
    atomic.atomic_write(path, text)
