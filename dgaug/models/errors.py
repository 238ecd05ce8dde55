"""The one error type the model loaders raise, so the CLI can print it as a single line."""

from __future__ import annotations

import pickle
import re

from dgaug.core.errors import INVALID, DgaugError


class ModelError(DgaugError):
    """A model that cannot be loaded or run here, said in one line the user can act on."""

    exit_code = INVALID


_BLOCKED = re.compile(r"GLOBAL (\S+) was not an allowed global|whose module (\S+) is blocked")


def code_in_pickle(exc: BaseException) -> str | None:
    """The callable a weights file asked to run, if `exc` (or what caused it, however a library
    wrapped it) is torch.load(weights_only=True) refusing it; None otherwise.

    torch raises the same UnpicklingError for a pickle that would run code and for a corrupt one;
    only the message tells them apart.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, pickle.UnpicklingError):
            m = _BLOCKED.search(str(e))
            if m:
                return m.group(1) or m.group(2)
        e = e.__cause__ or e.__context__
    return None


def brief(e: BaseException, limit: int | None = 240) -> str:
    """The first line of an exception, cut to `limit` characters: messages stay on one line."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
