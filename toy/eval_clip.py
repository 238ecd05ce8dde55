"""Zero-shot accuracy of a CLIP on held-out toy-world shards: shape per domain, and domain (style).

    python toy/eval_clip.py [--model local-dir:dgaug/models/toy/clip] \
        [--shards toy-data/real/00011.tar] [--out toy/logs/clip_eval.json]

The model is loaded by open_clip itself (`local-dir:` reads open_clip_config.json and
open_clip_model.safetensors from the folder), so this measures the shipped files, not the trainer's
checkpoint. `--model random` scores the same architecture with untrained weights (the chance floor).
Each sample's shape and domain come from its .json member ("label", "domain").
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # see train_clip.py: 1 thread beats 2 on a busy CPU

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_MODEL = f"local-dir:{ROOT / 'dgaug' / 'models' / 'toy' / 'clip'}"
DEFAULT_SHARDS = [str(Path(__file__).resolve().parents[1] / "toy-data" / "real" / "00011.tar")]
ARCH_FILE = HERE / "dgaug-toy-clip.json"

LABELS = ("circle", "square", "triangle", "star", "cross", "ring")
DOMAINS = ("photo", "sketch", "cartoon", "painting")
SHAPE_TEMPLATES = {
    "photo": "a photo of a {label}",
    "domain": "a {domain} of a {label}",  # uses the sample's true domain: an oracle-domain prompt
    "ensemble": None,  # mean of "a {domain} of a {label}" over the four domains: no oracle
}


def read_shards(paths: list[str]) -> list[tuple[Image.Image, str, str, str]]:
    """(image, label, domain, caption) for every sample of the shards, read with tarfile."""
    samples: dict[str, dict] = defaultdict(dict)
    for path in paths:
        with tarfile.open(path) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                data = tf.extractfile(m).read()
                samples[f"{path}/{key}"][ext] = data
    out = []
    for parts in samples.values():
        if not {"jpg", "json", "txt"} <= parts.keys():
            continue
        meta = json.loads(parts["json"])
        image = Image.open(io.BytesIO(parts["jpg"])).convert("RGB")
        out.append((image, meta["label"], meta["domain"], parts["txt"].decode()))
    return out


@torch.no_grad()
def text_features(model, tokenizer, texts: list[str]) -> torch.Tensor:
    return F.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1)


@torch.no_grad()
def evaluate(model, preprocess, tokenizer, samples) -> dict:
    """Shape and domain zero-shot accuracy, overall and per domain, with the chance levels."""
    model.eval()
    feats = []
    for i in range(0, len(samples), 256):
        batch = torch.stack([preprocess(s[0]) for s in samples[i : i + 256]])
        feats.append(F.normalize(model.encode_image(batch).float(), dim=-1))
    img = torch.cat(feats)
    labels = torch.tensor([LABELS.index(s[1]) for s in samples])
    domains = torch.tensor([DOMAINS.index(s[2]) for s in samples])

    # [domain, label, dim]: "a {domain} of a {label}" for every pair.
    pair = text_features(
        model, tokenizer, [f"a {d} of a {lab}" for d in DOMAINS for lab in LABELS]
    ).view(len(DOMAINS), len(LABELS), -1)
    photo = text_features(model, tokenizer, [f"a photo of a {lab}" for lab in LABELS])
    ensemble = F.normalize(pair.mean(0), dim=-1)

    preds = {
        "photo": (img @ photo.T).argmax(1),
        "domain": torch.einsum("nd,nld->nl", img, pair[domains]).argmax(1),
        "ensemble": (img @ ensemble.T).argmax(1),
    }
    result: dict = {
        "n": len(samples),
        "chance_shape": 1 / len(LABELS),
        "chance_domain": 1 / len(DOMAINS),
    }
    result["shape_accuracy"] = {
        name: {
            "all": float((p == labels).float().mean()),
            **{
                d: float((p[domains == k] == labels[domains == k]).float().mean())
                for k, d in enumerate(DOMAINS)
            },
        }
        for name, p in preds.items()
    }
    result["prompts"] = {
        "photo": "a photo of a {label}",
        "domain": "a {domain} of a {label} (the sample's true domain)",
        "ensemble": "mean over domains of 'a {domain} of a {label}'",
        "style": "mean over labels of 'a {domain} of a {label}'",
    }
    # Style: a domain's text feature is its pair features averaged over the labels.
    style = F.normalize(pair.mean(1), dim=-1)
    sp = (img @ style.T).argmax(1)
    result["domain_accuracy"] = {
        "all": float((sp == domains).float().mean()),
        **{d: float((sp[domains == k] == k).float().mean()) for k, d in enumerate(DOMAINS)},
    }
    # Retrieval on the samples' own captions (image -> its caption among this batch's captions
    # would favour duplicates; the image-caption cosine of matched vs shuffled pairs is cleaner).
    cap = text_features(model, tokenizer, [s[3] for s in samples])
    result["caption_cosine"] = {
        "matched": float((img * cap).sum(1).mean()),
        "shuffled": float((img * cap.roll(1, 0)).sum(1).mean()),
    }
    result["logit_scale"] = float(model.logit_scale.exp())
    return result


def load(model_ref: str):
    if model_ref == "random":
        open_clip.add_model_config(ARCH_FILE)
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(ARCH_FILE.stem)
        return model, preprocess, open_clip.get_tokenizer(ARCH_FILE.stem)
    model, _, preprocess = open_clip.create_model_and_transforms(model_ref)
    return model, preprocess, open_clip.get_tokenizer(model_ref)


def format_table(result: dict) -> str:
    cols = ("all", *DOMAINS)
    lines = [f"{'shape prompt':<10} " + " ".join(f"{c:>8}" for c in cols)]
    for name, acc in result["shape_accuracy"].items():
        lines.append(f"{name:<10} " + " ".join(f"{acc[c]:8.3f}" for c in cols))
    lines.append(f"{'style':<10} " + " ".join(f"{result['domain_accuracy'][c]:8.3f}" for c in cols))
    lines.append(
        f"chance: shape {result['chance_shape']:.3f}, style {result['chance_domain']:.3f}; "
        f"n={result['n']}; caption cosine matched {result['caption_cosine']['matched']:.3f} "
        f"vs shuffled {result['caption_cosine']['shuffled']:.3f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--shards", nargs="+", default=DEFAULT_SHARDS)
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.time()
    model, preprocess, tokenizer = load(args.model)
    samples = read_shards(args.shards)
    result = {
        "model": args.model,
        "shards": args.shards,
        **evaluate(model, preprocess, tokenizer, samples),
    }
    result["seconds"] = round(time.time() - t0, 1)
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
