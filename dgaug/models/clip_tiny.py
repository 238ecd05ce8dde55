"""The tiny CLIP (``dgaug-tiny``): its config, its registration with open_clip, seeded weights."""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch

TINY_ARCH = "dgaug-tiny"
# Small enough for a batch of 16 in milliseconds on a CPU, but a real open_clip CLIP (ViT image
# tower, causal text transformer, the standard 49408-token BPE vocabulary) so every code path that
# runs on a real model runs on this one.
TINY_CONFIG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}

_registry_lock = threading.Lock()
_tiny_registered = False


def register_tiny_config() -> str:
    """Make ``dgaug-tiny`` an open_clip architecture in this process (idempotent); returns its name.

    open_clip reads architectures only from JSON files, so the config is written to a temporary
    folder (removed at exit). After this, open_clip.create_model("dgaug-tiny") works as for a real
    architecture, which is what lets ``dgaug-tiny:/path/to/weights`` load like any checkpoint.
    """
    global _tiny_registered
    with _registry_lock:
        if not _tiny_registered:
            if TINY_ARCH not in open_clip.list_models():
                folder = tempfile.mkdtemp(prefix="dgaug-open-clip-")
                atexit.register(shutil.rmtree, folder, ignore_errors=True)
                path = Path(folder) / f"{TINY_ARCH}.json"
                path.write_text(json.dumps(TINY_CONFIG))
                open_clip.add_model_config(path)
            _tiny_registered = True
    return TINY_ARCH


def build_tiny(seed: int) -> tuple[torch.nn.Module, Callable]:
    """The tiny CLIP with weights drawn from `seed` alone, and its eval transform."""
    # fork_rng: the weights depend on `seed` alone, and the caller's global RNG stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**copy.deepcopy(TINY_CONFIG))
    size = TINY_CONFIG["vision_cfg"]["image_size"]
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    open_clip.set_model_preprocess_cfg(
        model,
        {
            "size": size,
            "mode": "RGB",
            "mean": mean,
            "std": std,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
            "fill_color": 0,
        },
    )
    return model, open_clip.image_transform(size, is_train=False, mean=mean, std=std)
