"""Where the toy world's trained models lie: folders shipped inside the package, named by alias."""

from __future__ import annotations

from pathlib import Path

from dgaug.core.constants import TOY_CLIP, TOY_LDM
from dgaug.models.errors import ModelError

TOY_DIR = Path(__file__).resolve().parent / "toy"
_FOLDERS = {TOY_LDM: "ldm", TOY_CLIP: "clip"}


def toy_path(name: str) -> Path:
    """The shipped folder of toy model `name` (toy-ldm or toy-clip); ModelError if it is missing
    (a source checkout whose weights were not remade, say)."""
    path = TOY_DIR / _FOLDERS[name]
    if not path.is_dir():
        raise ModelError(
            f"{name}: its weights are not in {path}; remake them with `make toy-models` "
            "(toy/README.md)"
        )
    return path
