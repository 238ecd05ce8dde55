"""Check the str.format templates a config gives (captions, prompts) before any work uses them."""

from __future__ import annotations

import string


def check_template(v: str, allowed: tuple[str, ...]) -> str:
    """A str.format template whose fields are only `allowed` names (no `{domain.attr}`, `{0}`).

    Raises ValueError, which pydantic turns into a field problem, so a bad template is reported
    with the manifest's other problems instead of failing at format time deep inside a run.
    """
    names = ", ".join("{" + k + "}" for k in allowed)
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        v.format(**{k: "x" for k in allowed})
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"may use only {names} ({e})") from None
    other = sorted({f for f in fields if f not in allowed})
    if other:  # `{domain.__class__}` formats without error, and means nothing
        raise ValueError(f"may use only {names}, not {other}")
    return v
