"""The image_folder source: a class dataset laid out as root/<domain>/<class>/*.jpg."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from dgaug.core.atomic import atomic_write
from dgaug.core.hashing import sha256_hex
from dgaug.core.storage import Storage
from dgaug.core.templates import check_template
from dgaug.sources.base import SourceConfig, SourceItems, generated_dir
from dgaug.sources.errors import SourceError
from dgaug.sources.url_list import UrlListSource

if TYPE_CHECKING:
    import pyarrow as pa

IMAGE_FOLDER_COLUMNS = ("url", "caption", "label", "domain")


class ImageFolderSource(SourceConfig):
    """A class dataset laid out as root/<domain>/<class>/*.jpg (PACS, OfficeHome, DomainNet)."""

    kind: Literal["image_folder"]
    path: str
    domains: list[str] | None = Field(
        None, description="Domains (sub-folders) to take; null takes all. Single-source DG: one."
    )
    caption_template: str = "a {domain} of a {label}"
    extensions: list[str] = Field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])

    @field_validator("caption_template")
    @classmethod
    def _template(cls, v: str) -> str:
        return check_template(v, ("domain", "label"))

    def check(self) -> None:
        list_image_folder(self)

    def items(self, storage: Storage, seed: int, *, dry_run: bool) -> SourceItems:
        listing = list_image_folder(self)
        files = listing_digest(listing)
        if dry_run:
            return SourceItems(files=files, count=listing.num_rows)
        return SourceItems(files=files, url_list=_write_url_list(listing, storage))


def list_image_folder(src: ImageFolderSource) -> pa.Table:
    """root/<domain>/<class>/<file> -> rows sorted by path, captions from the template."""
    try:
        return _list_image_folder(src)
    except OSError as e:  # unreadable folder, a file vanishing while listed: one clear line
        raise SourceError([f"source.path: cannot list {src.path}: {e}"]) from None


def _list_image_folder(src: ImageFolderSource) -> pa.Table:
    import pyarrow as pa

    root = Path(src.path)
    if not root.is_dir():
        raise SourceError([f"source.path: not a folder: {root}"])
    exts = {e.lower().lstrip(".") for e in src.extensions}
    domains = sorted(d.name for d in root.iterdir() if d.is_dir())
    if src.domains is not None:
        missing = sorted(set(src.domains) - set(domains))
        if missing:
            raise SourceError([f"source.domains: {missing} not found under {root} (has {domains})"])
        domains = [d for d in domains if d in set(src.domains)]
    cols: dict[str, list[str]] = {c: [] for c in IMAGE_FOLDER_COLUMNS}
    for domain in domains:
        for cls_dir in sorted(p for p in (root / domain).iterdir() if p.is_dir()):
            for f in sorted(cls_dir.iterdir()):
                if f.is_file() and f.suffix.lower().lstrip(".") in exts:
                    label = cls_dir.name
                    cols["url"].append(f.resolve().as_uri())
                    cols["caption"].append(src.caption_template.format(domain=domain, label=label))
                    cols["label"].append(label)
                    cols["domain"].append(domain)
    if not cols["url"]:
        raise SourceError([f"source.path: no images ({sorted(exts)}) in {root}/<domain>/<class>/"])
    return pa.table(cols)


def _parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def listing_digest(table: pa.Table) -> str:
    """A digest of an image-folder listing: which files, with which labels and captions."""
    return sha256_hex(_parquet_bytes(table))


def _write_url_list(table: pa.Table, storage: Storage) -> UrlListSource:
    """The listing as a url list of `file://` URLs, written once per listing."""
    data = _parquet_bytes(table)
    out = generated_dir(storage, "image_folder", {"listing": sha256_hex(data)})
    urls = os.path.join(out, "urls.parquet")
    if not os.path.exists(urls):
        atomic_write(urls, data)
    return UrlListSource.generated(urls)
