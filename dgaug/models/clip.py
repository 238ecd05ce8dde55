"""Load a frozen open_clip CLIP from a spec string and encode pixels, PIL images and captions with it.

Spec grammar (`load_clip(spec)`):

- ``tiny-random``: the tiny architecture ``dgaug-tiny`` (embed 32, 32 px, 2+2 layers) with
  weights drawn from ``seed``; for the demo and tests, marked ``tiny=True``.
- ``ARCH:TAG``, e.g. ``ViT-B-32:laion2b_s34b_b79k``, ``ViT-L-14:openai``: an open_clip
  architecture and one of its pretrained tags, read from the Hugging Face cache (downloaded there
  first when the hub can be reached).
- ``hf-hub:ORG/NAME``: a model published with an ``open_clip_config.json`` on the Hugging Face Hub,
  loaded by open_clip itself; cache rules as above.
- ``ARCH:PATH`` where PATH contains a ``/``, starts with ``.`` or ``~``, or ends in ``.safetensors``,
  ``.pt``, ``.pth``, ``.bin`` or ``.ckpt``: the architecture with weights from a local file (a
  state dict, or ``{"state_dict": ...}`` with an optional ``module.`` prefix as open_clip training
  writes). ``dgaug-tiny`` is a valid ARCH here, so a trained tiny model round-trips.

Every failure to load is a one-line `ModelError`; no weights are ever fetched when the hub is
offline (``HF_HUB_OFFLINE=1``), and pickles are read only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import difflib
import functools
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import open_clip
import safetensors.torch
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from PIL import Image

from dgaug.models.errors import ModelError

log = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
TINY_ARCH = "dgaug-tiny"
# Small enough for a batch of 16 in milliseconds on a CPU, but a real open_clip CLIP (ViT image
# tower, causal text transformer, the standard 49408-token BPE vocabulary) so every code path that
# runs on a real model runs on this one.
TINY_CONFIG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
SPEC_GRAMMAR = (
    "'tiny-random', 'ARCH:TAG' (e.g. ViT-B-32:laion2b_s34b_b79k), 'hf-hub:ORG/NAME' or "
    "'ARCH:/path/to/weights.safetensors' (.pt/.pth/.bin also read)"
)
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
# open_clip's file names on the hub (open_clip.constants); the safetensors one is preferred.
_HF_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_CONFIG = "open_clip_config.json"
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
    - ``"checkpoint"``: ``ARCH:PATH`` -> ("checkpoint", ARCH, PATH); PATH is told from a TAG by
      containing a ``/``, starting with ``.`` or ``~``, or ending in a checkpoint suffix.
    ARCH may be written the OpenAI way (``ViT-B/32``); it is returned as open_clip names it.
    """
    spec = spec.strip()
    if spec == TINY_RANDOM:
        return "tiny-random", TINY_ARCH, None
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
        or rest.lower().endswith(_CHECKPOINT_SUFFIXES)
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
    dev = _resolve_device(device)
    dtype = _resolve_precision(precision, dev)
    register_tiny_config()
    if kind == "tiny-random":
        model, preprocess = _build_tiny(seed)
        tokenizer_name = TINY_ARCH
    elif kind == "checkpoint":
        path = Path(ref).expanduser()
        state = _read_state_dict(path)  # first: a bad file fails before a large model is built
        model, preprocess = _build_for_checkpoint(arch)
        _load_state(model, state, path, arch)
        tokenizer_name = arch
    elif kind == "pretrained":
        model, preprocess = _build_pretrained(arch, ref, cache_dir)
        tokenizer_name = arch
    else:
        model, preprocess = _build_hf_hub(ref, cache_dir)
        tokenizer_name = f"hf-hub:{ref}"
    try:
        tokenizer = _tokenizer(tokenizer_name, cache_dir)
    except Exception as e:
        raise ModelError(f"the tokenizer for {spec} could not be loaded ({_brief(e)})") from e

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


@functools.lru_cache(maxsize=8)
def _tokenizer(name: str, cache_dir: str | None) -> Callable[[Sequence[str]], torch.Tensor]:
    # Building the BPE tokenizer parses its whole vocabulary; every model of an arch shares one.
    return open_clip.get_tokenizer(name, cache_dir=cache_dir)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} asked for, but no CUDA GPU is visible here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return dev


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


def _build_tiny(seed: int) -> tuple[torch.nn.Module, Callable]:
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


def _check_arch(arch: str) -> None:
    known = open_clip.list_models()
    if arch not in known:
        near = difflib.get_close_matches(arch, known, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ModelError(
            f"unknown CLIP architecture {arch!r}{hint} (one of the {len(known)} names in "
            "open_clip.list_models())"
        )


def _build_for_checkpoint(arch: str) -> tuple[torch.nn.Module, Callable]:
    _check_arch(arch)
    try:
        # pretrained_text/image False: tower weights come from the checkpoint, never the hub.
        with _no_random_init_warning():
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=None, pretrained_text=False, pretrained_image=False
            )
    except Exception as e:
        raise ModelError(f"CLIP architecture {arch} could not be built ({_brief(e)})") from e
    return model, preprocess


RANDOM_TAG = "random"  # ARCH:random, e.g. ViT-L-14:random: random weights for benchmarks


def _build_pretrained(
    arch: str, tag: str, cache_dir: str | None
) -> tuple[torch.nn.Module, Callable]:
    _check_arch(arch)
    if tag == RANDOM_TAG:
        # The architecture with freshly initialised weights: timing runs need the shapes only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(arch)
        return model, preprocess
    if not open_clip.is_pretrained_cfg(arch, tag):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        known = f"known tags: {', '.join(tags)}" if tags else "it has no pretrained tags"
        raise ModelError(
            f"unknown pretrained tag {tag!r} for {arch}; {known} "
            f"(or give local weights as {arch}:/path/to/weights.safetensors)"
        )
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    repo, filename = os.path.split(cfg.get("hf_hub", ""))
    files = [_weight_names(filename)] if repo else []
    advice = _advice(f"open_clip.create_model('{arch}', pretrained='{tag}')", arch)
    _ensure_cached(cfg, repo, files, f"{arch}/{tag}", advice, cache_dir)
    try:
        # The tag says whether its weights were trained with QuickGELU; open_clip only warns about
        # a mismatch, and the model would then compute with the wrong activation.
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=tag, force_quick_gelu=bool(cfg.get("quick_gelu")), cache_dir=cache_dir
        )
    except Exception as e:
        raise ModelError(f"CLIP {arch}:{tag} could not be loaded ({_brief(e)})") from e
    return model, preprocess


def _build_hf_hub(repo: str, cache_dir: str | None) -> tuple[torch.nn.Module, Callable]:
    what = f"hf-hub:{repo}"
    advice = _advice(f"open_clip.create_model('{what}')", None)
    # open_clip fetches these itself, but goes on with random weights when the weights fail to
    # come; fetching them first turns that into an error.
    _ensure_cached(
        {"hf_hub": f"{repo}/{_HF_CONFIG}"}, repo, [[_HF_CONFIG]], what, advice, cache_dir
    )
    _ensure_cached({"hf_hub": f"{repo}/"}, repo, [_weight_names("")], what, advice, cache_dir)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            f"hf-hub:{repo}", cache_dir=cache_dir
        )
    except Exception as e:
        raise ModelError(f"CLIP {what} could not be loaded ({_brief(e)})") from e
    return model, preprocess


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; reading it again here makes a setting
    # made later in the process (a test, a notebook) count too.
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(hf_constants.HF_HUB_OFFLINE) or any(
        f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags
    )


def _weight_names(filename: str) -> list[str]:
    """The names open_clip tries for a weights file on the hub, its safetensors twin first."""
    if not filename or filename in _HF_WEIGHTS:
        return list(_HF_WEIGHTS)
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _advice(how: str, arch: str | None) -> str:
    local = f"{arch or 'ARCH'}:/path/to/weights.safetensors"
    return (
        f"download them once on a machine with network ({how}, then copy the Hugging Face cache, "
        f"HF_HUB_CACHE), or give a local checkpoint ({local})"
    )


def _ensure_cached(
    cfg: dict, repo: str, files: list[list[str]], what: str, advice: str, cache_dir: str | None
) -> None:
    """Make sure the hub files behind `cfg` are in the local cache: look there offline, else fetch.

    files: groups of alternative names, one of each group needed (e.g. safetensors or .bin).
    """
    if not _hub_offline():
        try:
            open_clip.download_pretrained(cfg, cache_dir=cache_dir)
        except Exception as e:
            raise ModelError(
                f"weights for {what} are not in the local cache and the hub cannot be reached "
                f"({_brief(e)}); {advice}"
            ) from e
        return
    for names in files or [[]]:  # no file names: a URL-only tag, which has no hub cache entry
        found = [
            huggingface_hub.try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            for name in names
        ]
        if not any(isinstance(f, str) for f in found):
            raise ModelError(
                f"weights for {what} are not in the local cache and the hub cannot be reached "
                f"(offline: HF_HUB_OFFLINE is set); {advice}"
            )


def _load_state(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str
) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelError(
            f"checkpoint {path} does not fit {arch}: {len(missing)} missing keys "
            f"{_few(missing)}, {len(unexpected)} unexpected keys {_few(unexpected)}"
        )
    for key, value in state.items():
        # Scalar parameters (logit_scale) are saved as shape [] or [1] depending on the version.
        if value.shape != own[key].shape and value.numel() == own[key].numel() == 1:
            state[key] = value.reshape(own[key].shape)
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if v.shape != own[k].shape
    ]
    if wrong:
        raise ModelError(
            f"checkpoint {path} does not fit {arch}: {len(wrong)} tensors differ in shape "
            f"(checkpoint vs model): {_few(wrong)}"
        )
    model.load_state_dict(state, strict=True)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ModelError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise ModelError(f"checkpoint {path} is not a file")
    try:
        if path.suffix == ".safetensors":
            obj = safetensors.torch.load_file(str(path), device="cpu")
        else:
            # weights_only=True: a checkpoint is data, and loading one must never run its code.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch raises the same error for a pickle that would run code and for one that is
        # corrupt; only its message tells them apart.
        text = str(e)
        code = re.search(
            r"GLOBAL (\S+) was not an allowed global|whose module (\S+) is blocked", text
        )
        if code:
            raise ModelError(
                f"checkpoint {path} is refused: unpickling it would run code "
                f"({code.group(1) or code.group(2)}) and checkpoints are only read with "
                "torch.load(weights_only=True); re-save it as a plain state dict or safetensors"
            ) from e
        detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines() or ["?"]
        raise ModelError(f"checkpoint {path} could not be read ({detail[0]})") from e
    except Exception as e:
        raise ModelError(f"checkpoint {path} could not be read ({_brief(e)})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise ModelError(
            f"checkpoint {path} holds no state dict of tensors "
            "(expected a state dict, or {'state_dict': ...} as open_clip training writes)"
        )
    # open_clip training saves DistributedDataParallel-wrapped weights, named module.*
    return {k.removeprefix("module."): v for k, v in obj.items()}


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _no_random_init_warning() -> Iterator[None]:
    # open_clip warns "Model initialized randomly" on the root logger when it builds an
    # architecture for us to load a checkpoint into; that warning would mislead the reader.
    drop = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _few(items: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}]"


def _brief(e: BaseException) -> str:
    """The first line of an exception, shortened: ModelError messages stay on one line."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 240 else text[:237] + "..."
