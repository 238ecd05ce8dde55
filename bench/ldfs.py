"""LDFS benchmark: fit and synthesis time on 768-d features, and held-out-domain probe accuracy.

(1) Time. `fit` on N random unit 768-d features (100 classes, labels) with three targets and the
    default config except `epochs` and `patience: null`, timed end to end: building the text bank
    (with a hash-seeded random text encoder, whose cost is negligible; a real CLIP text encoder
    adds its own time, once per distinct prompt), the split, the init, `epochs` training passes
    over the 90 % training split and one validation pass over the 10 % validation split per
    epoch. Reported per million feature-epochs: seconds / (N * epochs / 1e6), N counting both
    splits. `synthesize` (every row to every target, one draw) is timed per million output rows.
(2) Accuracy. The controlled feature space of tests/controlled_space.py: a linear probe on real
    photo features alone, or with LADS- or LDFS-synthesized sketch and painting features, scored
    on real sketch and painting features (named targets, never seen) and on cartoon features (not
    a target); mean and std over seeds.
(3) Text noise. How far sigma turns the direction (curve.json's `noise_cos`), without training,
    on the controlled space's texts (D = 64) and on 768-d texts as close as CLIP's (cos 0.9).

    python bench/ldfs.py                    # defaults: N = 100k, 2 epochs, 3 seeds (~2-3 min)
    python bench/ldfs.py --n 20000 --seeds 1 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench._common import (  # noqa: E402
    RESULTS_DIR,
    describe_machine,
    format_table,
    machine_line,
    write_json,
)
from dgaug.core.hashing import derive_seed  # noqa: E402
from dgaug.stages.ldfs.config import LdfsConfig  # noqa: E402
from dgaug.stages.ldfs.data import SourceFeatures  # noqa: E402
from dgaug.stages.ldfs.fit import fit  # noqa: E402
from dgaug.stages.ldfs.mappers import load_mapper  # noqa: E402
from dgaug.stages.ldfs.synthesis import synthesize  # noqa: E402
from dgaug.stages.ldfs.texts import TextBank  # noqa: E402
from tests.controlled_space import HARD, compare_probes, make_space  # noqa: E402

PACKAGES = ("dgaug", "torch", "numpy", "pydantic")
DIM = 768
TARGETS = ["sketch", "cartoon", "painting"]
PROBE_TARGETS = ("sketch", "painting")
PROBE_OTHER = ("cartoon",)


def random_text(texts: list[str]) -> torch.Tensor:
    """A stand-in text encoder: a fixed random unit vector per distinct text."""
    out = [
        torch.randn(DIM, generator=torch.Generator().manual_seed(derive_seed("text", t)))
        for t in texts
    ]
    return F.normalize(torch.stack(out), dim=-1)


def time_fit(n: int, epochs: int, variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, DIM, generator=g), dim=-1)
    labels = [f"class{i % 100:03d}" for i in range(n)]
    data = SourceFeatures(keys=[f"{i:08d}" for i in range(n)], features=x, labels=labels)
    results = []
    for variant in variants:
        cfg = LdfsConfig(targets=TARGETS, epochs=epochs, patience=None, **variant)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        res = fit(data, random_text, cfg, seed=0)
        fit_s = time.perf_counter() - t0
        mapper = load_mapper(res.state, cfg, DIM)
        t0 = time.perf_counter()
        rows = synthesize(mapper, data, random_text, cfg, seed=0)
        synth_s = time.perf_counter() - t0
        results.append(
            {
                "variant": variant,
                "n": n,
                "epochs": epochs,
                "n_train": res.info["n_train"],
                "n_val": res.info["n_val"],
                "fit_s": fit_s,
                "fit_s_per_million_feature_epochs": fit_s / (n * epochs / 1e6),
                "synth_rows": len(rows),
                "synth_s": synth_s,
                "synth_s_per_million_rows": synth_s / (len(rows) / 1e6),
                "loss_first_epoch": res.curve[0]["train_loss"],
                "loss_last_epoch": res.curve[-1]["train_loss"],
                "load_avg_1min_before": load_before,
                "load_avg_1min_after": os.getloadavg()[0],
            }
        )
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def close_texts(dim: int, cos: float):
    """A text encoder where "a {domain} of a {label}" of one label and two domains have cos `cos`
    (CLIP's "a photo of a dog" and "a sketch of a dog" are about 0.8-0.9 apart): normalize(u_label
    + beta v_domain) with random, nearly orthogonal u and v, beta = sqrt(1 / cos - 1)."""
    beta = (1 / cos - 1) ** 0.5

    def vec(name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed("close", dim, name))
        return F.normalize(torch.randn(dim, generator=g), dim=-1)

    def encode(texts: list[str]) -> torch.Tensor:
        out = []
        for t in texts:
            if " of a " not in t:  # a bare domain description (e_k)
                out.append(vec("domain:" + t))
                continue
            domain, label = t.removeprefix("a ").split(" of a ", 1)
            out.append(vec("label:" + label) + beta * vec("domain:" + domain))
        return F.normalize(torch.stack(out), dim=-1)

    return encode


def noise_turn(sigmas: list[float]) -> list[dict[str, Any]]:
    """Mean cos(noisy Delta, clean Delta) per sigma: what `noise_cos` in curve.json reports.

    Texts: the controlled space's (D = 64), and CLIP-like ones at D = 768 whose source and target
    texts of a class have cos 0.9 (`close_texts`); photo features of 10 classes, the targets
    sketch and painting, one draw per row and target, no training.
    """
    sp = make_space(**HARD)
    x, labels, keys = sp.images("photo", 40, seed=0)
    settings = [
        ("controlled space, D 64", sp.text, x),
        (
            "cos 0.9 texts, D 768",
            close_texts(DIM, 0.9),
            # one source text: the features do not enter the directions, any will do
            F.normalize(
                torch.randn(len(keys), DIM, generator=torch.Generator().manual_seed(0)), -1
            ),
        ),
    ]
    out = []
    for name, text, feats in settings:
        data = SourceFeatures(keys=keys, features=feats, labels=labels)
        rows = torch.arange(len(keys))
        for sigma in sigmas:
            cfg = LdfsConfig(targets=list(PROBE_TARGETS), sigma=sigma)
            bank = TextBank(data, text, cfg, None, torch.device("cpu"))
            _, _, cos = bank.step_texts(rows, feats, torch.Generator().manual_seed(0), True)
            src, tgt = bank.instance[0, bank.offset], bank.instance[1, bank.offset]
            out.append(
                {
                    "texts": name,
                    "sigma": sigma,
                    "noise_cos": float(cos) if cos is not None else 1.0,
                    "cos_source_target_text": float((src * tgt).sum(-1).mean()),
                }
            )
    return out


def probe_accuracy(seeds: int, epochs: int) -> dict[str, Any]:
    per_seed = []
    for s in range(seeds):
        cmp = compare_probes(
            methods=("lads", "ldfs"),
            targets=PROBE_TARGETS,
            other_domains=PROBE_OTHER,
            seed=s,
            epochs=epochs,
        )
        per_seed.append(cmp.accuracy)
    summary: dict[str, Any] = {}
    for name in ("source_only", "lads", "ldfs"):
        named = [statistics.fmean(a[name][d] for d in PROBE_TARGETS) for a in per_seed]
        other = [statistics.fmean(a[name][d] for d in PROBE_OTHER) for a in per_seed]
        summary[name] = {"named_targets": mean_std(named), "other_domains": mean_std(other)}
    return {"per_seed": per_seed, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="random 768-d features to fit on")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the timed fits")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the controlled-space probes")
    ap.add_argument("--probe-epochs", type=int, default=20, help="fit epochs, controlled space")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--lads", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "ldfs.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    machine = describe_machine(PACKAGES)
    variants: list[dict[str, Any]] = [{"method": "ldfs", "mapper": "shared"}]
    if args.lads:
        variants.append({"method": "lads"})
    timing = time_fit(args.n, args.epochs, variants)
    probes = probe_accuracy(args.seeds, args.probe_epochs)
    sigmas = [0.0, 0.005, 0.01, 0.02, 0.05, 0.1]
    turn = noise_turn(sigmas)

    print(f"Machine: {machine_line(machine)}; torch threads {torch.get_num_threads()}")
    print()
    print(
        f"Fit: {args.n} random unit {DIM}-d features, 100 classes, {len(TARGETS)} targets, "
        f"batch 256, {args.epochs} epochs (90/10 train/val), CPU float32."
    )
    print()
    rows = []
    for t in timing:
        v = t["variant"]
        name = v["method"] + (f" ({v['mapper']})" if v["method"] == "ldfs" else "")
        rows.append(
            [
                name,
                f"{t['fit_s']:.1f}",
                f"{t['fit_s_per_million_feature_epochs']:.0f}",
                f"{t['synth_s']:.1f}",
                f"{t['synth_s_per_million_rows']:.1f}",
                f"{t['loss_first_epoch']:.3f} -> {t['loss_last_epoch']:.3f}",
                f"{t['load_avg_1min_before']:.1f} / {t['load_avg_1min_after']:.1f}",
            ]
        )
    print(
        format_table(
            [
                "method",
                "fit s",
                "fit s / 1M feature-epochs",
                "synthesize s",
                "synthesize s / 1M rows",
                "train loss",
                "load avg before / after",
            ],
            rows,
        )
    )
    print()
    print(
        f"Controlled space (D = 64, 10 classes, domain directions 2x class directions, 80 % of "
        f"their norm in the class subspace): probe accuracy on real features of unseen domains, "
        f"mean +- std over {args.seeds} seeds; synthesized targets {list(PROBE_TARGETS)}."
    )
    print()
    s = probes["summary"]
    labels = {"source_only": "source only", "lads": "+ LADS", "ldfs": "+ LDFS"}
    print(
        format_table(
            [
                "probe trained on",
                f"{' / '.join(PROBE_TARGETS)} (targets)",
                f"{' / '.join(PROBE_OTHER)} (not a target)",
            ],
            [
                [
                    labels[k],
                    "{:.3f} +- {:.3f}".format(*s[k]["named_targets"]),
                    "{:.3f} +- {:.3f}".format(*s[k]["other_domains"]),
                ]
                for k in ("source_only", "lads", "ldfs")
            ],
        )
    )
    print()
    print(
        "Text noise: mean cos(noisy Delta, clean Delta) over photo rows of 10 classes and the "
        "targets sketch and painting, one draw each (curve.json's noise_cos)."
    )
    print()
    names = list(dict.fromkeys(t["texts"] for t in turn))
    print(
        format_table(
            ["texts", "cos(source, target text)", *[f"sigma {v}" for v in sigmas]],
            [
                [
                    name,
                    f"{[t for t in turn if t['texts'] == name][0]['cos_source_target_text']:.2f}",
                    *[f"{t['noise_cos']:.3f}" for t in turn if t["texts"] == name],
                ]
                for name in names
            ],
        )
    )
    path = write_json(
        args.out,
        {
            "machine": machine,
            "torch_threads": torch.get_num_threads(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "timed": "fit(): text bank + split + init + epochs x (train pass + val pass); "
            "synthesize(): all rows x targets x 1 draw",
            "timing": timing,
            "controlled_space": probes,
            "noise_turn": turn,
        },
    )
    print(f"\nWrote {path}")


if __name__ == "__main__":
    main()
