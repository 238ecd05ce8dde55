"""The arguments and options that several `dgaug` commands share, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ManifestArg = Annotated[
    Path, typer.Argument(help="Manifest YAML, e.g. manifests/cc12m.yaml.", show_default=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a manifest field: --set stages.download.threads=64 (repeatable; the value "
        "is read as YAML, so 0.3 is a number and [a,b] a list).",
        show_default=False,
    ),
]
