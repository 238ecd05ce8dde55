"""Classify a run's ED-SAM samples (and their real sources) with the toy CLIP: shape and style
accuracy against chance, from the features stage's Parquet (the image embeddings it wrote).

  .venv/bin/python toy/eval_edsam.py demo-output     # after `make demo`
Prints a table and writes toy/logs/edsam_eval.json. Zero-shot prompts: "a photo of a {label}" for
the shape, "a {style} of a shape" for the style; the features must come from the toy CLIP.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

HERE = Path(__file__).resolve().parent
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
STYLES = ["photo", "sketch", "cartoon", "painting"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output", type=Path, help="a run's output folder (it has features/)")
    p.add_argument("--out", type=Path, default=HERE / "logs" / "edsam_eval.json")
    args = p.parse_args(argv)

    from dgaug.core.constants import TOY_CLIP
    from dgaug.models.clip import load_clip

    files = sorted((args.output / "features").glob("*.parquet"))
    if not files:
        sys.exit(f"no features/*.parquet in {args.output}")
    tables = [pq.read_table(f) for f in files]
    models = {t.schema.metadata[b"dgaug.model"].decode() for t in tables}
    if models != {TOY_CLIP}:
        sys.exit(f"the features were made with {sorted(models)}, not {TOY_CLIP}")
    t = pa.concat_tables(tables).to_pydict()
    img = _unit(np.asarray(t["image_embedding"], dtype=np.float32))
    origin, label, domain = (np.asarray(t[c]) for c in ("origin", "label", "domain"))

    clip = load_clip(TOY_CLIP, device="cpu")
    with torch.no_grad():
        shape_txt = clip.encode_text([f"a photo of a {c}" for c in SHAPES]).numpy()
        style_txt = clip.encode_text([f"a {s} of a shape" for s in STYLES]).numpy()
    shape_pred = np.asarray(SHAPES)[np.argmax(img @ shape_txt.T, axis=1)]
    style_pred = np.asarray(STYLES)[np.argmax(img @ style_txt.T, axis=1)]

    result: dict = {
        "output": str(args.output),
        "features_files": len(files),
        "chance_shape": 1 / len(SHAPES),
        "chance_style": 1 / len(STYLES),
    }
    for o in ("real", "edsam"):
        m = origin == o
        result[o] = {
            "n": int(m.sum()),
            "shape_accuracy": float(np.mean(shape_pred[m] == label[m])),
            "style_accuracy": float(np.mean(style_pred[m] == domain[m])),
            "shape_accuracy_by_style": {
                s: float(np.mean(shape_pred[m & (domain == s)] == label[m & (domain == s)]))
                for s in STYLES
                if (m & (domain == s)).any()
            },
        }
    print("origin      n   shape  style   shape by style (photo sketch cartoon painting)")
    for o in ("real", "edsam"):
        r = result[o]
        by = " ".join(f"{r['shape_accuracy_by_style'].get(s, float('nan')):.3f}" for s in STYLES)
        print(f"{o:7} {r['n']:5d}   {r['shape_accuracy']:.3f}  {r['style_accuracy']:.3f}   {by}")
    print(f"chance: shape {result['chance_shape']:.3f}, style {result['chance_style']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
