"""Train the toy world's CLIP with open_clip's own trainer, and ship it in open_clip's hub layout.

    python toy/train_clip.py            # the shipped model (about 17 min on one CPU core)
    python toy/train_clip.py --quick    # a few steps, to check the plumbing

Data: the webdataset shards dgaug wrote for the toy world (`dgaug run toy/data.yaml`; 12 shards of
1000 64x64 images of 6 shapes in 4 styles with captions, and sizes.json). Shards 00000..00010 are
trained on (all four styles); 00011 is held out for evaluation.

open_clip's CLI takes a model *name*, so the architecture (toy/dgaug-toy-clip.json) is registered
with `open_clip.add_model_config` and then `open_clip_train.main.main(argv)` runs, in this process:
the training loop, data loader, loss and checkpoints are open_clip's. Afterwards the final
checkpoint becomes `dgaug/models/toy/clip/`: open_clip_config.json ({"model_cfg",
"preprocess_cfg"}) and open_clip_model.safetensors (float16, to fit the size budget; open_clip and
dgaug cast to float32 on load), loadable as `open_clip.create_model_and_transforms("local-dir:...")`.
Logs: toy/logs/clip_train.log (open_clip's own log), toy/logs/clip_train.json (data, arguments,
steps, losses, times, size, sha256) and toy/logs/clip_eval.json (held-out zero-shot accuracy).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

# One math thread: on 2 cores shared with other jobs, 2 threads spin-wait on each other and a step
# ran about 8x slower than with 1 (measured). Must be set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import open_clip  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import eval_clip  # noqa: E402

ARCH_FILE = HERE / "dgaug-toy-clip.json"  # open_clip names an architecture after its file
DEFAULT_DATA = str(ROOT / "toy-data" / "real")  # `dgaug run toy/data.yaml` writes it
DEFAULT_OUT = ROOT / "dgaug" / "models" / "toy" / "clip"
LOGS = HERE / "logs"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="folder of the toy world's real shards")
    ap.add_argument("--train-shards", default="{00000..00010}", help="brace range of train shards")
    ap.add_argument("--arch", type=Path, default=ARCH_FILE, help="open_clip model config (json)")
    ap.add_argument("--eval-shard", default="00011", help="held-out shard (never trained on)")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--logs", type=Path, default=LOGS)
    ap.add_argument("--quick", action="store_true", help="1 epoch on 2 shards, into /tmp")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_shards, args.epochs, args.warmup = "{00000..00001}", 1, 5
        args.out = Path(tempfile.mkdtemp(prefix="toy-clip-quick-"))
        args.logs = args.out / "logs"
    return args


def trainer_argv(args: argparse.Namespace, run_dir: Path) -> list[str]:
    data = Path(args.data)
    return [
        "--model", args.arch.stem,
        "--train-data", str(data / f"{args.train_shards}.tar"),
        "--val-data", str(data / f"{args.eval_shard}.tar"),
        "--dataset-type", "webdataset",  # sample counts come from sizes.json beside the shards
        "--device", "cpu",
        "--precision", "fp32",
        "--workers", str(args.workers),
        "--batch-size", str(args.batch_size),
        "--epochs", str(args.epochs),
        "--lr", str(args.lr),
        "--wd", str(args.wd),
        "--warmup", str(args.warmup),
        "--grad-clip-norm", "1.0",
        "--seed", str(args.seed),
        "--save-frequency", "1",
        "--delete-previous-checkpoint",  # only the newest epoch stays on disk
        "--val-frequency", "1",
        "--log-every-n-steps", "10",
        "--report-to", "",
        "--logs", str(run_dir),
        "--name", "toy-clip",
    ]  # fmt: skip


def train(args: argparse.Namespace) -> tuple[Path, Path, float]:
    """Run open_clip's trainer; returns (final checkpoint, its log, seconds)."""
    run_dir = Path(tempfile.mkdtemp(prefix="toy-clip-run-"))
    open_clip.add_model_config(args.arch)
    from open_clip_train.main import main as open_clip_main

    argv = trainer_argv(args, run_dir)
    print("open_clip_train.main", " ".join(repr(a) if " " in a or not a else a for a in argv))
    t0 = time.time()
    rc = open_clip_main(argv)
    seconds = time.time() - t0
    if rc not in (None, 0):
        raise SystemExit(f"open_clip's trainer returned {rc}")
    ckpt = run_dir / "toy-clip" / "checkpoints" / f"epoch_{args.epochs}.pt"
    if not ckpt.exists():
        raise SystemExit(f"open_clip's trainer wrote no {ckpt.name} in {ckpt.parent}")
    return ckpt, run_dir / "toy-clip" / "out.log", seconds


def export(ckpt: Path, out: Path, arch: Path) -> dict:
    """The trainer's checkpoint -> out/{open_clip_config.json, open_clip_model.safetensors}."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model_cfg = json.loads(arch.read_text())
    model = open_clip.create_model(arch.stem)  # to check the state fits and read its preprocessing
    model.load_state_dict(state, strict=True)
    pp = open_clip.get_model_preprocess_cfg(model)
    preprocess_cfg = {
        "mean": list(pp["mean"]),
        "std": list(pp["std"]),
        "interpolation": pp.get("interpolation", "bicubic"),
        "resize_mode": pp.get("resize_mode", "shortest"),
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".open_clip_model.safetensors.tmp"
    half = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    safetensors.torch.save_file(half, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)  # safetensors creates the file owner-only
    os.replace(tmp, out / "open_clip_model.safetensors")
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=4) + "\n")
    weights = out / "open_clip_model.safetensors"
    return {
        "parameters": sum(v.numel() for v in state.values()),
        "bytes": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "dtype": "float16",
    }


def parse_log(log: Path) -> dict:
    """Steps and losses from open_clip's own log lines."""
    text = log.read_text()
    steps = []
    for m in re.finditer(
        r"Train Epoch: (\d+) \[\s*(\d+)/(\d+).*?LR: ([\d.e-]+).*?Logit Scale: ([\d.]+).*?"
        r"Contrastive_loss: ([\d.]+) \(([\d.]+)\)",
        text,
    ):
        steps.append(
            {
                "epoch": int(m[1]),
                "samples": int(m[2]),
                "lr": float(m[4]),
                "logit_scale": float(m[5]),
                "loss": float(m[6]),
                "loss_epoch_mean": float(m[7]),
            }
        )
    val = [
        {"epoch": int(m[1]), "val_loss": float(m[2])}
        for m in re.finditer(r"Eval Epoch: (\d+) .*?clip_val_loss: ([\d.]+)", text)
    ]
    return {"logged_steps": steps, "val": val}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    data = Path(args.data)
    sizes = json.loads((data / "sizes.json").read_text())
    ckpt, log, seconds = train(args)
    info = export(ckpt, args.out, args.arch)
    args.logs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(log, args.logs / "clip_train.log")
    parsed = parse_log(log)
    m = re.search(r"\[\s*\d+/(\d+) \(100%\)\]", log.read_text())
    steps_per_epoch = None
    if m:
        steps_per_epoch = -(-int(m[1]) // args.batch_size)
    summary = {
        "command": "python toy/train_clip.py " + " ".join(argv or sys.argv[1:]),
        "trainer": "open_clip_train.main (open_clip_torch " + open_clip.__version__ + ")",
        "trainer_argv": trainer_argv(args, Path("<run>")),
        "architecture": args.arch.stem,
        "data": {
            "folder": str(data),
            "written_by": "dgaug run toy/data.yaml",
            "train_shards": args.train_shards,
            "held_out_shard": args.eval_shard,
            "sizes": sizes,
        },
        "seed": args.seed,
        "threads": int(os.environ["OMP_NUM_THREADS"]),
        "train_seconds": round(seconds, 1),
        "steps_per_epoch": steps_per_epoch,
        "steps": steps_per_epoch * args.epochs if steps_per_epoch else None,
        **info,
        **parsed,
    }
    if parsed["logged_steps"]:
        summary["final_loss"] = parsed["logged_steps"][-1]["loss_epoch_mean"]
    (args.logs / "clip_train.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"trained in {seconds:.0f}s; {info['parameters']} parameters, {info['bytes'] / 1e6:.2f} MB"
    )
    eval_clip.main(
        [
            "--model", f"local-dir:{args.out}",
            "--shards", str(data / f"{args.eval_shard}.tar"),
            "--out", str(args.logs / "clip_eval.json"),
        ]
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
