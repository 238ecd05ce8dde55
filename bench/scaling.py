"""Scaling: the demo stage graph on a Ray cluster with 1, 2 and 4 workers per stage; shards/s and
efficiency against one worker, then a paper estimate of GPU-hours for CC3M, CC12M and LAION-400M.

    python bench/scaling.py                        # CPU: a local Ray on this machine
    python bench/scaling.py --address auto --device cuda --output s3://bucket/scaling
                                                   # a GPU cluster: one GPU per model worker
    python bench/scaling.py --estimate-only --rates bench/results/edsam-gpu.json

Each row is one `run_pipeline` of manifests/demo.yaml (every stage, 8 shards each) into a fresh
output, every stage given N workers; on a CPU each model worker uses one thread, so N workers
can use N cores. Wall time is the whole run (planning, actor start, every shard, commits) after
Ray is up; shards/s counts the shards of every stage. Efficiency = (shards/s with N) / (N x
shards/s with 1).

The estimate multiplies each dataset's pair count by the work per pair at the default settings
(cc12m.yaml: ED-SAM with SD-1.5 at 512 px, M = 10 samples, 20 steps, guidance 5; CLIP ViT-B/16
features of the real image and its M samples) and divides by a per-GPU rate: the measured one
when `--rates` gives a bench/edsam.py GPU result, else PyTorch's FLOP count of the models at
those shapes run at an assumed fraction of the H100's dense bf16 peak (stated in the output).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    RESULTS_DIR,
    describe_machine,
    format_table,
    machine_line,
    write_json,
)

# Pairs in each url list as published (the estimate assumes every pair downloads: an upper bound).
DATASETS = {"CC3M": 3_318_333, "CC12M": 12_423_374, "LAION-400M": 413_871_335}
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's H100 SXM figure, without sparsity
MODEL_STAGES = ("edsam", "features")


def demo_manifest(output: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    d = yaml.safe_load((Path(__file__).resolve().parent.parent / args.manifest).read_text())
    d.pop("train", None)
    d["output"] = output
    resources: dict[str, Any] = {"download": {"workers": workers, "num_cpus": 1}}
    for stage in MODEL_STAGES:
        if args.device == "cuda":
            resources[stage] = {"workers": workers, "num_cpus": 1, "num_gpus": 1}
            d["stages"][stage]["device"] = "cuda"
        else:
            resources[stage] = {"workers": workers, "num_cpus": 1, "num_gpus": 0}
            d["stages"][stage]["cpu_threads"] = 1
    resources["ldfs"] = {"workers": workers, "num_cpus": 1}
    d["executor"] = {"kind": "ray", "address": args.address, "max_attempts": 2}
    d["executor"]["resources"] = resources
    d["stages"]["download"]["processes"] = 1
    return d


def run_scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    import ray

    from dgaug.job.manifest import validate
    from dgaug.job.run import run_pipeline
    from dgaug.pipeline.executors.ray import connect

    if args.address:
        connect(args.address)
    else:
        # Logical CPUs for the largest row: Ray must be able to place N actors per stage.
        ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
    root = args.output or tempfile.mkdtemp(prefix="dgaug-scaling-")
    rows = []
    for n in args.workers:
        best = None
        for rep in range(args.repeats):
            m = validate(demo_manifest(f"{root.rstrip('/')}/w{n}-r{rep}", n, args))
            t0 = time.perf_counter()
            summary = run_pipeline(m)
            wall = time.perf_counter() - t0
            if not summary.ok:
                raise SystemExit(f"the run with {n} workers failed: {summary.stages}")
            shards = sum(s.done for s in summary.stages.values())
            per_stage = {k: s.done for k, s in summary.stages.items()}
            busy = shard_seconds(m.output, summary)
            print(
                f"  {n} worker(s), repeat {rep}: {shards} shards in {wall:.1f} s; "
                f"in shards {sum(busy.values()):.1f} worker-s",
                flush=True,
            )
            if best is None or wall < best["wall_s"]:
                best = {
                    "workers": n,
                    "wall_s": wall,
                    "shards": shards,
                    "per_stage": per_stage,
                    "shard_seconds": busy,
                }
        assert best is not None
        best["shards_per_s"] = best["shards"] / best["wall_s"]
        rows.append(best)
    base = rows[0]["shards_per_s"] / rows[0]["workers"]
    for r in rows:
        r["efficiency"] = r["shards_per_s"] / (r["workers"] * base)
    return rows


def shard_seconds(output: str, summary: Any) -> dict[str, float]:
    """Per stage, the seconds its workers spent inside shards (the markers' durations): if they
    grow with the worker count, the workers are slowing each other down (cores, memory)."""
    from dgaug.core.storage import Storage
    from dgaug.pipeline.ledger import Ledger

    ledger = Ledger(Storage(output))
    return {
        name: sum(float(m.get("duration_s", 0)) for m in ledger.committed(s.output_dir).values())
        for name, s in summary.stages.items()
    }


# ---------------------------------------------------------------------------------- estimate


def flop_counts() -> dict[str, float]:
    """FLOPs per ED-SAM sample (SD-1.5 shapes, 512 px, M 10, 20 steps, guidance 5) and per CLIP
    ViT-B/16 image and caption, counted by PyTorch on random weights (no download)."""
    import open_clip
    import torch

    from bench.edsam import build_ldm, count_flops, flops_per_sample

    ns = argparse.Namespace(
        model="sd15", device="cpu", dtype="float32", image_size=512, guidance=5.0, steps=20
    )
    ns.samples = 10
    edsam = flops_per_sample(build_ldm(ns), ns)
    clip = open_clip.create_model("ViT-B-16", pretrained=None)
    clip.eval()
    image = count_flops(lambda: clip.encode_image(torch.zeros(1, 3, 224, 224)))
    text = count_flops(lambda: clip.encode_text(open_clip.tokenize(["a photo of a dog"])))
    return {"edsam_sample": edsam["per_sample"], "clip_image": image, "clip_text": text}


def estimate(args: argparse.Namespace) -> dict[str, Any]:
    m = 10  # samples per image at the default settings
    flops = flop_counts()
    fraction = args.assumed_fraction
    peak = H100_BF16_DENSE_TFLOPS * 1e12
    rates = {
        # ED-SAM samples/s and CLIP images/s (each with one caption) per GPU.
        "edsam_samples_per_s": fraction * peak / flops["edsam_sample"],
        "features_images_per_s": fraction * peak / (flops["clip_image"] + flops["clip_text"]),
    }
    source = {k: f"FLOP count at {fraction:.0%} of H100 bf16 dense peak (assumed)" for k in rates}
    if args.rates:
        measured = json.loads(Path(args.rates).read_text())
        best = max(
            (
                r
                for r in measured.get("results", [])
                if str(r.get("system", "")).startswith("dgaug")
            ),
            key=lambda r: r["samples_per_s"],
            default=None,
        )
        if best is not None:
            rates["edsam_samples_per_s"] = best["samples_per_s"]
            source["edsam_samples_per_s"] = f"measured: {args.rates} ({best['system']})"
    rows = []
    for name, pairs in DATASETS.items():
        edsam_h = pairs * m / rates["edsam_samples_per_s"] / 3600
        features_h = pairs * (1 + m) / rates["features_images_per_s"] / 3600
        rows.append(
            {
                "dataset": name,
                "pairs": pairs,
                "edsam_samples": pairs * m,
                "edsam_gpu_hours": edsam_h,
                "features_gpu_hours": features_h,
                "total_gpu_hours": edsam_h + features_h,
            }
        )
    return {"flops": flops, "rates": rates, "rate_source": source, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", default="1,2,4", help="workers per stage, comma-separated")
    p.add_argument("--manifest", default="manifests/demo.yaml")
    p.add_argument("--address", help="an existing Ray cluster (default: start one here)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--output", help="output root, local or fsspec URL (default: a temp folder)")
    p.add_argument("--repeats", type=int, default=1, help="runs per row; the fastest is kept")
    p.add_argument("--estimate-only", action="store_true", help="skip the runs")
    p.add_argument("--no-estimate", action="store_true", help="skip the GPU-hours estimate")
    p.add_argument("--rates", help="a bench/edsam.py GPU result (JSON) to take the rate from")
    p.add_argument(
        "--assumed-fraction",
        type=float,
        default=0.5,
        help="share of the bf16 peak assumed when no measured rate is given (default 0.5)",
    )
    p.add_argument("--json", default=str(RESULTS_DIR / "scaling.json"))
    args = p.parse_args(argv)
    args.workers = [int(w) for w in str(args.workers).split(",")]

    machine = describe_machine()
    print(machine_line(machine))
    out: dict[str, Any] = {"machine": machine, "args": {k: v for k, v in vars(args).items()}}
    if not args.estimate_only:
        rows = run_scaling(args)
        out["scaling"] = rows
        print(
            format_table(
                ["workers / stage", "shards", "wall s", "shards/s", "efficiency", "in-shard s"],
                [
                    [
                        r["workers"],
                        r["shards"],
                        f"{r['wall_s']:.1f}",
                        f"{r['shards_per_s']:.3f}",
                        f"{r['efficiency']:.2f}",
                        f"{sum(r['shard_seconds'].values()):.1f}",
                    ]
                    for r in rows
                ],
            )
        )
    if not args.no_estimate:
        est = estimate(args)
        out["estimate"] = est
        for k, v in est["rates"].items():
            print(f"{k}: {v:.2f} ({est['rate_source'][k]})")
        print(
            format_table(
                [
                    "dataset",
                    "pairs",
                    "ED-SAM samples",
                    "ED-SAM GPU-h",
                    "features GPU-h",
                    "total GPU-h",
                ],
                [
                    [
                        r["dataset"],
                        f"{r['pairs']:,}",
                        f"{r['edsam_samples']:,}",
                        f"{r['edsam_gpu_hours']:,.0f}",
                        f"{r['features_gpu_hours']:,.0f}",
                        f"{r['total_gpu_hours']:,.0f}",
                    ]
                    for r in est["rows"]
                ],
            )
        )
    print(f"wrote {write_json(args.json, out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
