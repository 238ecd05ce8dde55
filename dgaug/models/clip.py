"""Load a frozen open_clip CLIP from a spec string and encode pixels, PIL images and captions with it.

Spec grammar (`load_clip(spec)`):

- ``tiny-random``: the tiny architecture ``dgaug-tiny`` (embed 32, 32 px, 2+2 layers) with
  weights drawn from ``seed``; for the demo and tests, marked ``tiny=True``.
- ``ARCH:TAG``, e.g. ``ViT-B-32:laion2b_s34b_b79k``, ``ViT-L-14:openai``: an open_clip
  architecture and one of its pretrained tags, read from the Hugging Face cache (downloaded there
  first when the hub can be reached).
- ``hf-hub:ORG/NAME``: a model published with an ``open_clip_config.json`` on the Hugging Face Hub,
  loaded by open_clip itself; cache rules as above.
- ``local-dir:PATH``: a folder holding ``open_clip_config.json`` and its weights
  (``open_clip_model.safetensors`` ...), the layout open_clip's hub models use, loaded by
  open_clip's own ``local-dir:`` loader.
- ``toy-clip``: the toy world's CLIP shipped in the package, a ``local-dir:`` folder.
- ``ARCH:PATH`` where PATH contains a ``/``, starts with ``.`` or ``~``, or ends in ``.safetensors``,
  ``.pt``, ``.pth``, ``.bin`` or ``.ckpt``: the architecture with weights from a local file (a
  state dict, or ``{"state_dict": ...}`` with an optional ``module.`` prefix as open_clip training
  writes). ``dgaug-tiny`` is a valid ARCH here, so a trained tiny model round-trips.

Every failure to load is a one-line `ModelError`; no weights are ever fetched when the hub is
offline (``HF_HUB_OFFLINE=1``), and pickles are read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from dgaug.core.constants import TINY, TOY_CLIP
from dgaug.models.clip_checkpoint import SUFFIXES, build_for_checkpoint, load_state, read_state_dict
from dgaug.models.clip_hub import LOCAL_DIR, build_hf_hub, build_local_dir, build_pretrained
from dgaug.models.clip_tiny import TINY_ARCH, TINY_CONFIG, build_tiny, register_tiny_config
from dgaug.models.errors import ModelError, brief
from dgaug.models.runtime import resolve_device
from dgaug.models.toy import toy_path

# TINY_CONFIG and register_tiny_config are part of this module's interface (tests build the tiny
# architecture from them); they live with the rest of the tiny model.
__all__ = [
    "TINY_ARCH",
    "TINY_CONFIG",
    "ClipModel",
    "load_clip",
    "parse_clip_spec",
    "register_tiny_config",
]

log = logging.getLogger(__name__)

SPEC_GRAMMAR = (
    "'tiny-random', 'toy-clip', 'ARCH:TAG' (e.g. ViT-B-32:laion2b_s34b_b79k), 'hf-hub:ORG/NAME', "
    "'local-dir:/path/to/folder' or 'ARCH:/path/to/weights.safetensors' (.pt/.pth/.bin also read)"
)
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ClipModel:
    """A frozen CLIP with the preprocessing it was trained with; all outputs are float32."""

    model: torch.nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    preprocess: Callable[[Image.Image], torch.Tensor]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model_id: str
    tiny: bool
    device: torch.device
    dtype: torch.dtype  # compute dtype: bf16/fp16 means autocast on CUDA; weights stay float32
    embed_dim: int
    interpolation: str = "bicubic"  # how `preprocess` resizes; encode_images does the same
    resize_mode: str = "shortest"  # open_clip's: shortest (+ centre crop), longest (+ pad), squash

    def encode_images(self, pixels: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """[B,3,H,W] floats in [0,1], any size and device -> [B, embed_dim] on `device`.

        Resizes and normalises on the device the way `preprocess` does a PIL image, and runs in the
        caller's grad mode, so a loss on the features can be backpropagated to `pixels`.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels [B,3,H,W], got {tuple(pixels.shape)}")
        x = self._fit(pixels.to(self.device, torch.float32))
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        with self._autocast():
            features = self.model.encode_image((x - mean) / std).float()
        return F.normalize(features, dim=-1) if normalize else features

    @torch.no_grad()
    def encode_pil(self, images: Sequence[Image.Image], *, batch_size: int = 64) -> torch.Tensor:
        """PIL images through `preprocess` -> [N, embed_dim] unit vectors on `device`."""
        out = [
            self.encode_preprocessed(
                torch.stack([self.preprocess(im) for im in images[i : i + batch_size]])
            )
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, self.embed_dim, device=self.device)

    @torch.no_grad()
    def encode_preprocessed(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch already through `preprocess` ([B,3,S,S], e.g. made in loader threads) -> unit
        vectors [B, embed_dim] on `device`."""
        with self._autocast():
            features = self.model.encode_image(batch.to(self.device)).float()
        return F.normalize(features, dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        """Captions -> [N, embed_dim] unit vectors on `device` (truncated to the context length)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            with self._autocast():
                features = self.model.encode_text(tokens).float()
            out.append(F.normalize(features, dim=-1))
        return torch.cat(out) if out else torch.empty(0, self.embed_dim, device=self.device)

    @property
    def logit_scale(self) -> float:
        """exp of the model's learnt logit scale: the temperature of its contrastive loss."""
        return float(self.model.logit_scale.detach().float().exp().max())

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        """Resize (antialiased) and crop or pad to image_size as open_clip's eval transform does."""
        s = self.image_size
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            size = (s, s)
        elif self.resize_mode == "longest":
            size = (max(1, round(h * s / max(h, w))), max(1, round(w * s / max(h, w))))
        else:  # torchvision's Resize(int): the short side becomes s, the long side is truncated
            size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        if size != (h, w):
            mode = "bilinear" if self.interpolation == "bilinear" else "bicubic"
            x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
        h, w = x.shape[-2:]
        if (h, w) == (s, s):
            return x
        if h >= s and w >= s:
            top, left = round((h - s) / 2), round((w - s) / 2)
            return x[..., top : top + s, left : left + s]
        top, left = (s - h) // 2, (s - w) // 2
        return F.pad(x, (left, s - w - left, top, s - h - top), value=0.0)


def parse_clip_spec(spec: str) -> tuple[str, str | None, str | None]:
    """Split a spec into (kind, arch, pretrained_or_path); only its syntax is checked here.

    kind is one of:
    - ``"tiny-random"``: ``tiny-random`` -> ("tiny-random", "dgaug-tiny", None)
    - ``"pretrained"``: ``ARCH:TAG`` -> ("pretrained", ARCH, TAG)
    - ``"hf-hub"``: ``hf-hub:ORG/NAME`` -> ("hf-hub", None, "ORG/NAME")
    - ``"local-dir"``: ``local-dir:PATH`` -> ("local-dir", None, PATH); ``toy-clip`` is the
      shipped toy folder
    - ``"checkpoint"``: ``ARCH:PATH`` -> ("checkpoint", ARCH, PATH); PATH is told from a TAG by
      containing a ``/``, starting with ``.`` or ``~``, or ending in a checkpoint suffix.
    ARCH may be written the OpenAI way (``ViT-B/32``); it is returned as open_clip names it.
    """
    spec = spec.strip()
    if spec == TINY:
        return "tiny-random", TINY_ARCH, None
    if spec == TOY_CLIP:
        return "local-dir", None, str(toy_path(spec))
    if spec.startswith(LOCAL_DIR):
        folder = spec.removeprefix(LOCAL_DIR)
        if not folder.strip():
            raise ModelError(f"CLIP spec {spec!r}: expected local-dir:/path/to/folder")
        return "local-dir", None, folder
    if spec.startswith("hf-hub:"):
        repo = spec.removeprefix("hf-hub:")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ModelError(f"CLIP spec {spec!r}: expected hf-hub:ORG/NAME")
        return "hf-hub", None, repo
    arch, sep, rest = spec.partition(":")
    if not sep and arch.replace("/", "-") in open_clip.list_models():
        raise ModelError(
            f"CLIP spec {spec!r} names an architecture but no weights; write {arch}:TAG (see "
            f"open_clip.list_pretrained_tags_by_model) or {arch}:/path/to/weights.safetensors"
        )
    if not (sep and arch and rest):
        raise ModelError(f"CLIP spec {spec!r} is not one of {SPEC_GRAMMAR}")
    arch = arch.replace("/", "-")
    is_path = (
        "/" in rest
        or os.sep in rest
        or rest.startswith((".", "~"))
        or rest.lower().endswith(SUFFIXES)
    )
    return ("checkpoint" if is_path else "pretrained"), arch, rest


def load_clip(
    spec: str,
    *,
    device: str = "auto",
    precision: str = "auto",
    seed: int = 0,
    cache_dir: str | None = None,
) -> ClipModel:
    """Load a frozen (eval, requires_grad False) CLIP named by `spec`.

    spec: ``tiny-random`` (weights from `seed`; same seed, same weights), ``ARCH:TAG`` (an open_clip
    pretrained tag, e.g. ``ViT-B-32:laion2b_s34b_b79k``), ``hf-hub:ORG/NAME`` or ``ARCH:PATH`` (a
    local ``.safetensors``/``.pt``/``.pth``/``.bin``; ARCH may be ``dgaug-tiny``).
    device: ``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``.
    precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``
    (CUDA only); weights are kept in float32 either way.
    cache_dir: the Hugging Face cache to read hub weights from; None means the default one.
    Raises ModelError, one line, for anything the user can fix.
    """
    kind, arch, ref = parse_clip_spec(spec)
    dev = resolve_device(device)
    dtype = _resolve_precision(precision, dev)
    register_tiny_config()
    if kind == "tiny-random":
        model, preprocess = build_tiny(seed)
        tokenizer_name = TINY_ARCH
    elif kind == "checkpoint":
        path = Path(ref).expanduser()
        state = read_state_dict(path)  # first: a bad file fails before a large model is built
        _check_arch(arch)
        model, preprocess = build_for_checkpoint(arch)
        load_state(model, state, path, arch)
        tokenizer_name = arch
    elif kind == "pretrained":
        _check_arch(arch)
        model, preprocess = build_pretrained(arch, ref, cache_dir)
        tokenizer_name = arch
    elif kind == "local-dir":
        model, preprocess = build_local_dir(Path(ref).expanduser())
        tokenizer_name = f"{LOCAL_DIR}{Path(ref).expanduser()}"
    else:
        model, preprocess = build_hf_hub(ref, cache_dir)
        tokenizer_name = f"hf-hub:{ref}"
    try:
        tokenizer = _tokenizer(tokenizer_name, cache_dir)
    except Exception as e:
        raise ModelError(f"the tokenizer for {spec} could not be loaded ({brief(e)})") from e

    model = model.to(dev).eval().requires_grad_(False)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ModelError(f"{spec}: non-square inputs ({size[0]}x{size[1]}) are not supported")
        size = size[0]
    # The width of the joint space sits in a different place in each tower type; asking the model
    # is the one answer that holds for all of them.
    with torch.no_grad():
        embed_dim = int(model.encode_text(tokenizer([""]).to(dev)).shape[-1])
    clip = ClipModel(
        model=model,
        tokenizer=tokenizer,
        preprocess=preprocess,
        image_size=int(size),
        mean=tuple(float(m) for m in cfg["mean"]),
        std=tuple(float(s) for s in cfg["std"]),
        model_id=spec,
        tiny=arch == TINY_ARCH,
        device=dev,
        dtype=dtype,
        embed_dim=embed_dim,
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
    )
    log.info("loaded CLIP %s on %s (%s, embed %d)", spec, dev, dtype, clip.embed_dim)
    return clip


def _check_arch(arch: str) -> None:
    known = open_clip.list_models()
    if arch not in known:
        near = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ModelError(
            f"unknown CLIP architecture {arch!r}{hint} (one of the {len(known)} names in "
            "open_clip.list_models())"
        )


@functools.lru_cache(maxsize=8)
def _tokenizer(name: str, cache_dir: str | None) -> Callable[[Sequence[str]], torch.Tensor]:
    # Building the BPE tokenizer parses its whole vocabulary; every model of an arch shares one.
    return open_clip.get_tokenizer(name, cache_dir=cache_dir)


# The manifests spell dtypes out, as torch does; open_clip's short names are accepted too.
_PRECISION_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _resolve_precision(precision: str, dev: torch.device) -> torch.dtype:
    precision = _PRECISION_ALIASES.get(precision, precision)
    if precision == "auto":
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if precision == "fp32":
        return torch.float32
    if precision not in _AUTOCAST:
        raise ModelError(f"precision {precision!r} is not one of auto, fp32, bf16, fp16")
    if precision == "fp16" and dev.type != "cuda":
        raise ModelError("precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU")
    return _AUTOCAST[precision]
