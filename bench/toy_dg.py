"""The toy world's domain-generalization table: does ED-SAM (or LDFS) win back what fine-tuning on
one domain loses? Single-source DG, run end to end through dgaug on a CPU.

Protocol (fixed before any result was seen; change it only with a new version number):
- Models: the shipped toy LDM (`toy-ldm`) and toy CLIP (`toy-clip`), both trained on all four
  styles of the procedural world (toy/README.md).
- Training data, per seed s: `train_images` (96) procedural images of the photo style only (the
  synthetic source with `styles: [photo]`, manifest seed s), written by the download stage.
- Evaluation, per seed s: a held-out folder of `eval_images` images in all four styles (photo,
  sketch, cartoon, painting), drawn by another synthetic run with its own seed (1000 + s).
  Sketch, cartoon and painting are never trained on. Zero-shot prompts "a photo of a {label}";
  the linear probe is fitted on the even images of the photo folder, as `dgaug train` does.
- Arms (each trains from the same toy CLIP, with the same optimiser settings):
  * `zero-shot`: the toy CLIP as it is (its numbers are the `*_start` of the clip arms).
  * `ft real`: contrastive fine-tuning on the real photo pairs (`dgaug train --mode clip`,
    edsam_ratio 0).
  * `ft + ED-SAM <config>`: the same with one ED-SAM sample per real pair in every batch
    (edsam_ratio 1: the paper's L_CLIP(x_s, p_s) + L_CLIP(x*, p_s)). Configs: the base
    (start inverted, rho 0.5, M 5, guidance 3, 6 steps) and one factor changed at a time:
    start latent; rho 0.25, 1.0; M 1, 10; guidance 1, 5.
  * `probe`, `coop` on the toy CLIP's features of the photo images, each alone, + LADS and
    + LDFS synthetic features of the three held-out styles.
- Per ED-SAM config also: mean cosine (toy CLIP) of a sample to its source image and to its
  caption, from the features stage's Parquet.
- Seeds 0, 1, 2 (data, ED-SAM draws and training order all change with the seed); mean ± std.
- Reported: zero-shot and linear-probe accuracy per held-out domain and their mean.

Version 2.2 (also after): `recipe paper`, `recipe balanced`, `recipe fast`, the README's
recipes' sampler, steps and guidance on the toy LDM (M 5 as every row; no tiny decoder).

Version 2.1 (added after the v2 table had been seen, so these two rows are exploratory, not
pre-registered): `steps 20` and `guidance 7.5`, to choose the steps and guidance defaults.

Version 2 (before any table was run; v1 had only a smoke run, with the earlier, weaker models): 96
photo images per seed instead of 240 and 6 DDIM steps instead of 10, so that the whole table (8
ED-SAM configs x 3 seeds, about 4,000 samples per seed) fits in about 40 minutes on 2 CPU cores.
Known before it was run: in the demo, samples from the `inverted` start kept their source's class
at about chance, those from `latent` at about 0.5 (the report's "class kept" table).

    python bench/toy_dg.py                  # the whole table (about 40 minutes on 2 cores)
    python bench/toy_dg.py --seeds 0 --quick  # one seed, fewer arms: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import RESULTS_DIR, describe_machine, format_table, write_json  # noqa: E402

PROTOCOL_VERSION = 2
HELD_OUT = ("sketch", "cartoon", "painting")
BASE_EDSAM = {"start": "inverted", "rho": 0.5, "samples_per_image": 5, "guidance": 3.0, "steps": 6}
EDSAM_VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "start latent": {"start": "latent"},
    "rho 0.25": {"rho": 0.25},
    "rho 1.0": {"rho": 1.0},
    "M 1": {"samples_per_image": 1},
    "M 10": {"samples_per_image": 10},
    "guidance 1": {"guidance": 1.0},
    "guidance 5": {"guidance": 5.0},
    # v2.1 (added after the v2 table was seen, to choose the steps and guidance defaults):
    "steps 20": {"steps": 20},
    "guidance 7.5": {"guidance": 7.5},
    # v2.2: the README's recipes with the toy LDM (its own VAE decodes: no TAESD for it).
    "recipe paper": {"steps": 20, "guidance": 5.0},
    "recipe balanced": {"sampler": "dpmpp_2m", "steps": 10, "guidance": 3.0},
    "recipe fast": {"steps": 2, "guidance": 1.0},
}
FINETUNE = {"epochs": 10, "batch_size": 32, "lr": 5e-4, "weight_decay": 0.1, "warmup_steps": 5}
FEATURE_ARMS = ("probe", "coop")
CPU = {"device": "cpu", "cpu_threads": 2}


def _manifest(out: Path, seed: int, n: int, stages: dict[str, Any]) -> dict[str, Any]:
    return {
        "output": str(out),
        "seed": seed,
        "shard_size": 60,
        "source": {"kind": "synthetic", "num_images": n, "image_size": 64, "styles": ["photo"]},
        "executor": {"kind": "local"},
        "stages": {"download": {"image_size": 64, "processes": 1, "threads": 8}, **stages},
    }


def _run(manifest: dict[str, Any]) -> None:
    from dgaug.job.manifest import validate
    from dgaug.job.run import run_pipeline

    summary = run_pipeline(validate(manifest))
    if not summary.ok:
        raise RuntimeError(f"run into {manifest['output']} failed: {summary.stages}")


def eval_folder(root: Path, seed: int, n: int) -> Path:
    """A held-out folder of all four styles, drawn with its own seed (1000 + s)."""
    out = root / f"eval-{seed}"
    m = _manifest(out, 1000 + seed, 6, {})
    m["source"] = {"kind": "synthetic", "num_images": 6, "image_size": 64, "eval_images": n}
    _run(m)
    return out / "eval" / "images"


def _train(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate; an arm already finished with this very config is read back, so rows
    added to the table cost only themselves."""
    from dgaug.trainer.config import TrainConfig
    from dgaug.trainer.run import train

    config = TrainConfig.model_validate(cfg)
    out = Path(cfg["output"])
    done = out / "train.json"
    finished = done.exists() and (out / "eval.json").exists()
    if finished and _same_config(
        json.loads(done.read_text()).get("config"), config.model_dump(mode="json")
    ):
        return json.loads((out / "eval.json").read_text())
    train(config)
    return json.loads((out / "eval.json").read_text())


def _same_config(old: Any, new: Any) -> bool:
    """Equal, counting a field added to the trainer since `old` was written (absent there, null
    here) as the same."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) | {k for k, v in new.items() if v is not None}
        return all(_same_config(old.get(k), new.get(k)) for k in keys)
    return old == new


def _train_cfg(mode: str, out: Path, seed: int, evals: Path, data: dict[str, Any]) -> dict:
    data = dict(data)
    ratio = data.pop("_ratio", None)  # clip mode: the share of batches with an ED-SAM sample
    return {
        "mode": mode,
        "model": "toy-clip",
        "output": str(out),
        "seed": seed,
        "data": {"domains": ["photo"], **data},
        "eval": {"path": str(evals), "class_template": "a photo of a {label}"},
        "checkpoint_every": 10_000,
        **CPU,
        **FINETUNE,
        **({} if ratio is None else {"edsam_ratio": ratio}),
    }


def edsam_similarity(features_dir: Path) -> dict[str, float]:
    """Mean cosine of each ED-SAM sample to its source image and to its caption (toy CLIP), as
    the report's "class kept?" table measures them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dgaug.report.retention import from_table

    r = from_table(
        pa.concat_tables(pq.read_table(f) for f in sorted(features_dir.glob("*.parquet")))
    )
    return {
        "cos_to_source": r.edsam_to_source,
        "cos_to_caption": r.edsam_to_caption,
        "samples": r.edsam,
    }


def run_seed(root: Path, seed: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every arm for one seed: {arm: {"eval": eval.json, ...}}."""
    evals = eval_folder(root, seed, args.eval_images)
    features = {"model": "toy-clip", **CPU, "batch_size": 64}
    results: dict[str, dict[str, Any]] = {}

    base = root / f"s{seed}-real"
    ldfs = {"source_domain": "photo", "targets": list(HELD_OUT), "epochs": 20, "batch_size": 64}
    _run(_manifest(base, seed, args.train_images, {"features": features, "ldfs": ldfs}))
    lads = root / f"s{seed}-lads"
    _run(
        _manifest(
            lads,
            seed,
            args.train_images,
            {"features": features, "ldfs": {**ldfs, "method": "lads"}},
        )
    )
    results["ft real"] = {
        "eval": _train(
            _train_cfg(
                "clip",
                base / "train-clip",
                seed,
                evals,
                {"real": str(base / "real"), "_ratio": 0.0},
            )
        )
    }
    for mode in FEATURE_ARMS:
        for name, synth in (("", None), (" + LADS", lads / "ldfs"), (" + LDFS", base / "ldfs")):
            data = {"features": str(base / "features")}
            if synth is not None:
                data["ldfs"] = str(synth)
            out = base / f"train-{mode}{name.replace(' + ', '-').lower()}"
            results[f"{mode}{name}"] = {"eval": _train(_train_cfg(mode, out, seed, evals, data))}

    variants = {"base": {}} if args.quick else EDSAM_VARIANTS
    if args.variants:
        variants = {n: EDSAM_VARIANTS[n] for n in args.variants}
    for name, change in variants.items():
        out = root / f"s{seed}-edsam-{name.replace(' ', '-')}"
        edsam = {
            "model": "toy-ldm",
            **CPU,
            **BASE_EDSAM,
            **change,
            "image_size": 64,
            "batch_size": 16,
        }
        _run(_manifest(out, seed, args.train_images, {"edsam": edsam, "features": features}))
        data = {"real": str(out / "real"), "edsam": str(out / "edsam"), "_ratio": 1.0}
        results[f"ft + ED-SAM {name}"] = {
            "eval": _train(_train_cfg("clip", out / "train-clip", seed, evals, data)),
            "similarity": edsam_similarity(out / "features"),
        }
    results["zero-shot"] = {"eval": _start_as_eval(results["ft real"]["eval"])}
    return results


def _start_as_eval(ev: dict[str, Any]) -> dict[str, Any]:
    """The toy CLIP before fine-tuning, read from a clip arm's `zero_shot_start` numbers (its
    probe is fitted on the same photo images as every other arm's)."""
    return {
        "domains": {
            d: {"zero_shot": v["zero_shot_start"], "probe": None, "held_out": v["held_out"]}
            for d, v in ev["domains"].items()
        }
    }


def summarize(per_seed: dict[int, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per arm: mean ± std over seeds of zero-shot and probe accuracy per domain."""
    arms = list(next(iter(per_seed.values())))
    rows = []
    for arm in arms:
        row: dict[str, Any] = {"arm": arm}
        for metric in ("zero_shot", "probe"):
            for d in (*HELD_OUT, "photo", "held-out mean"):
                vals = []
                for res in per_seed.values():
                    doms = res[arm]["eval"]["domains"]
                    if d == "held-out mean":
                        xs = [doms[h][metric] for h in HELD_OUT]
                        vals.append(None if None in xs else statistics.fmean(xs))
                    else:
                        vals.append(doms[d][metric])
                vals = [v for v in vals if v is not None]
                row[f"{metric}/{d}"] = _mean_std(vals)
        sims = [res[arm]["similarity"] for res in per_seed.values() if "similarity" in res[arm]]
        if sims:
            row["cos_to_source"] = _mean_std([s["cos_to_source"] for s in sims], pct=False)
            row["cos_to_caption"] = _mean_std([s["cos_to_caption"] for s in sims], pct=False)
        rows.append(row)
    return rows


def _mean_std(vals: list[float], pct: bool = True) -> dict[str, float] | None:
    if not vals:
        return None
    scale = 100.0 if pct else 1.0
    return {
        "mean": scale * statistics.fmean(vals),
        "std": scale * statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def _cell(v: dict[str, float] | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = ["arm", *[f"zs {d}" for d in HELD_OUT], "zs held-out", "zs photo", "probe held-out"]
    head += ["cos src", "cos cap"]
    body = [
        [
            r["arm"],
            *[_cell(r[f"zero_shot/{d}"]) for d in HELD_OUT],
            _cell(r["zero_shot/held-out mean"]),
            _cell(r["zero_shot/photo"]),
            _cell(r["probe/held-out mean"]),
            _cell(r.get("cos_to_source"), 3),
            _cell(r.get("cos_to_caption"), 3),
        ]
        for r in rows
    ]
    return format_table(head, body)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-images", type=int, default=96, help="photo images per seed")
    p.add_argument("--eval-images", type=int, default=480, help="held-out images, all styles")
    p.add_argument("--work", type=Path, default=RESULTS_DIR / "toy_dg-work")
    p.add_argument("--quick", action="store_true", help="only the base ED-SAM config")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(EDSAM_VARIANTS),
        help="run only these ED-SAM configs (and the arms without ED-SAM); with --merge, the "
        "other rows are read from the last toy_dg.json",
    )
    p.add_argument("--merge", action="store_true", help="add the rows run now to toy_dg.json's")
    args = p.parse_args()
    started = time.time()
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    earlier: list[dict[str, Any]] = []  # the runs whose rows a merged table also holds
    if args.merge:
        old = json.loads((RESULTS_DIR / "toy_dg.json").read_text())
        per_seed = {int(k): v for k, v in old["per_seed"].items()}
        earlier = old.get("earlier_runs", []) + [
            {k: old.get(k) for k in ("args", "machine", "seconds")}
        ]
    for seed in args.seeds:
        t0 = time.time()
        per_seed.setdefault(seed, {}).update(run_seed(args.work, seed, args))
        print(f"seed {seed}: {time.time() - t0:.0f} s", flush=True)
    rows = summarize(per_seed)
    print(table(rows))
    write_json(
        RESULTS_DIR / "toy_dg.json",
        {
            "protocol_version": PROTOCOL_VERSION,
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": describe_machine(),
            "seconds": round(time.time() - started, 1),
            "rows": rows,
            "per_seed": per_seed,
            "earlier_runs": earlier,
        },
    )


if __name__ == "__main__":
    main()
