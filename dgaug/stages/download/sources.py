"""Every source kind as a url list: synthetic images and image folders become `file://` lists."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dgaug.core.storage import DGAUG_DIR, Storage
from dgaug.job.manifest import (
    ImageFolderSource,
    Manifest,
    SyntheticSource,
    UrlListSource,
)
from dgaug.stages.download.urls import SourceError

SOURCE_DIR = f"{DGAUG_DIR}/source"


def _local_dir(storage: Storage, name: str, record: dict) -> str:
    """A local folder for generated source files: in the output if local, else a temp folder.

    img2dataset reads them through `file://` URLs, so they must be on this machine.
    """
    fp = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    if storage.is_local:
        return storage.path(f"{SOURCE_DIR}/{name}-{fp}")
    return os.path.join(tempfile.gettempdir(), f"dgaug-source-{name}-{fp}")


# dgaug writes these lists itself, of its own files: file:// is the only scheme they hold.
GENERATED_SCHEMES = ("file",)


def _as_url_list(path: str) -> UrlListSource:
    return UrlListSource(
        kind="url_list",
        path=path,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        label_col="label",
        domain_col="domain",
        allowed_schemes=list(GENERATED_SCHEMES),
    )


def allowed_schemes(manifest: Manifest) -> tuple[str, ...]:
    """The URL schemes the download stage may fetch for this manifest's source.

    A url list: what the manifest allows (http and https unless it says otherwise). Synthetic
    images and image folders: file://, since dgaug lists those files itself.
    """
    src = manifest.source
    if isinstance(src, UrlListSource):
        return tuple(src.allowed_schemes)
    if isinstance(src, (SyntheticSource, ImageFolderSource)):
        return GENERATED_SCHEMES
    return ()


def synthetic_url_list(src: SyntheticSource, storage: Storage, seed: int) -> UrlListSource:
    from dgaug.sources import synthetic

    record = {"seed": seed, **src.data_record()}
    out = _local_dir(storage, "synthetic", record)
    done = os.path.join(out, "_SUCCESS")
    urls = os.path.join(out, "urls.parquet")
    if not os.path.exists(done):
        synthetic.write_synthetic_dataset(
            out, num_images=src.num_images, seed=seed, image_size=src.image_size, **_names(src)
        )
        Path(done).write_text("ok\n")
    if src.eval_images:
        write_eval_images(src, storage, seed)
    return _as_url_list(urls)


def _names(src: SyntheticSource) -> dict[str, list[str]]:
    """The class and style lists the manifest sets (null keeps the generator's defaults)."""
    return {k: v for k, v in (("classes", src.classes), ("styles", src.styles)) if v}


EVAL_DIR = "eval"


def write_eval_images(src: SyntheticSource, storage: Storage, seed: int) -> None:
    """The demo's held-out evaluation set: OUTPUT/eval/images/<style>/<class>/*.jpg.

    Drawn like the run's images but from another seed, so no evaluation image is a training one.
    Written once per count (`eval/_SUCCESS` holds it), not re-checked image by image on every run
    and plan. An object store output gets them drawn locally, then uploaded, `_SUCCESS` last.
    """
    from dgaug.sources import synthetic

    done = f"{EVAL_DIR}/_SUCCESS"
    try:
        if storage.read_text(done).strip() == str(src.eval_images):
            return
    except FileNotFoundError:
        pass
    if storage.is_local:
        out = storage.path(EVAL_DIR)
        # A run killed inside an atomic write leaves `.NAME.PID.tmp` here, outside _dgaug's scratch.
        for stale in Path(out).rglob(".*.tmp") if os.path.isdir(out) else ():
            stale.unlink(missing_ok=True)
    else:
        out = tempfile.mkdtemp(prefix="dgaug-eval-")
    try:
        synthetic.write_synthetic_dataset(
            out,
            num_images=src.eval_images,
            seed=seed + EVAL_SEED_OFFSET,
            image_size=src.image_size,
            **_names(src),
        )
        if not storage.is_local:
            storage.upload_tree(out, EVAL_DIR)
    finally:
        if not storage.is_local:
            shutil.rmtree(out, ignore_errors=True)
    storage.write_text(done, f"{src.eval_images}\n")


EVAL_SEED_OFFSET = 1_000_003  # any fixed offset: only its difference from the run's seed matters


IMAGE_FOLDER_COLUMNS = ("url", "caption", "label", "domain")


def list_image_folder(src: ImageFolderSource) -> pa.Table:
    """root/<domain>/<class>/<file> -> rows sorted by path, captions from the template."""
    try:
        return _list_image_folder(src)
    except OSError as e:  # unreadable folder, a file vanishing while listed: one clear line
        raise SourceError([f"source.path: cannot list {src.path}: {e}"]) from None


def _list_image_folder(src: ImageFolderSource) -> pa.Table:
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


def listing_digest(table: pa.Table) -> str:
    """A digest of an image-folder listing: which files, with which labels and captions."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()


def image_folder_url_list(
    src: ImageFolderSource, storage: Storage, table: pa.Table | None = None
) -> UrlListSource:
    table = list_image_folder(src) if table is None else table
    buf = io.BytesIO()
    pq.write_table(table, buf)
    record = {"listing": listing_digest(table)}
    out = _local_dir(storage, "image_folder", record)
    urls = os.path.join(out, "urls.parquet")
    if not os.path.exists(urls):
        os.makedirs(out, exist_ok=True)
        tmp = f"{urls}.tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, urls)
    return _as_url_list(urls)


def resolve_url_list(
    manifest: Manifest, storage: Storage, listing: pa.Table | None = None
) -> UrlListSource:
    """The manifest's source as a url list (generating files for synthetic and image_folder)."""
    src = manifest.source
    if isinstance(src, UrlListSource):
        return src
    if isinstance(src, SyntheticSource):
        return synthetic_url_list(src, storage, manifest.seed)
    if isinstance(src, ImageFolderSource):
        return image_folder_url_list(src, storage, listing)
    raise TypeError(f"source kind {src.kind!r} has no url list")


def check_source_readable(m: Manifest) -> list[str]:
    """Problems that stop the source from being read; empty when it can be."""
    from dgaug.stages.download.ingest import expand_shards
    from dgaug.stages.download.urls import check_source

    src = m.source
    try:
        if isinstance(src, UrlListSource):
            check_source(src)
        elif isinstance(src, ImageFolderSource):
            list_image_folder(src)
        elif src.kind == "shards":
            expand_shards(src.path)
    except SourceError as e:
        return e.problems
    return []
