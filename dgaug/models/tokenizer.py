"""The CLIP BPE tokenizer as a transformers CLIPTokenizer, built offline from open_clip's vocabulary."""

from __future__ import annotations

import gzip
import importlib.resources
import json
import logging
import os
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from dgaug.core.atomic import atomic_write
from dgaug.core.hashing import sha256_hex

log = logging.getLogger(__name__)

# The original CLIP vocabulary: 256 byte tokens, the same with "</w>", 48,894 merges, 2 specials.
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_BPE_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the BPE's base alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _bpe_bytes() -> bytes:
    # open_clip ships the same BPE file as OpenAI's CLIP (and SD's tokenizer), so no download.
    return (importlib.resources.files("open_clip") / _BPE_RESOURCE).read_bytes()


def _vocab_and_merges(bpe_gz: bytes) -> tuple[dict[str, int], list[str]]:
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    # Line 0 is a version header; the rest up to _NUM_MERGES are the merges CLIP uses.
    merges = lines[1 : _NUM_MERGES + 1]
    tokens = list(_bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += list(_SPECIALS)
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary has {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def _cache_root() -> Path:
    if os.environ.get("DGAUG_CACHE_DIR"):
        return Path(os.environ["DGAUG_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "dgaug"


def _write_files(folder: Path, bpe_gz: bytes) -> None:
    vocab, merges = _vocab_and_merges(bpe_gz)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    # transformers skips the first line of merges.txt, as CLIP's own loader does.
    atomic_write(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")


def clip_tokenizer_files() -> Path:
    """The folder holding vocab.json and merges.txt, written once per vocabulary and reused."""
    bpe_gz = _bpe_bytes()
    # Keyed by the BPE file's hash, so another open_clip vocabulary never reuses stale files.
    key = sha256_hex(bpe_gz)[:16]
    folder = _cache_root() / "clip-tokenizer" / key
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    try:
        _write_files(folder, bpe_gz)
    except OSError as exc:
        # A read-only home (some clusters) must not stop a run: a private temp folder will do.
        folder = Path(tempfile.mkdtemp(prefix="dgaug-clip-tokenizer-"))
        log.warning("cannot write the tokenizer cache (%s); using %s", exc, folder)
        _write_files(folder, bpe_gz)
    return folder


def clip_tokenizer(model_max_length: int = CONTEXT_LENGTH) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer (as SD uses it: 77 tokens, padded with <|endoftext|>), offline."""
    folder = clip_tokenizer_files()
    return CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )
