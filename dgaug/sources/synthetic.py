"""The synthetic source: procedural images of classes in visual styles, the offline demo's data."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Literal

from pydantic import Field

from dgaug.core.atomic import atomic_write, remove_temporaries
from dgaug.core.storage import Storage
from dgaug.sources.base import SourceConfig, SourceItems, generated_dir
from dgaug.sources.url_list import UrlListSource

EVAL_DIR = "eval"
EVAL_SEED_OFFSET = 1_000_003  # any fixed offset: only its difference from the run's seed matters


class SyntheticSource(SourceConfig):
    """Procedural images of classes in visual styles (domains): the offline demo's data."""

    kind: Literal["synthetic"]
    num_images: int = Field(256, ge=1, le=1_000_000)
    image_size: int = Field(64, ge=16, le=1024)
    classes: list[str] | None = Field(None, description="null: the generator's default classes.")
    styles: list[str] | None = Field(None, description="null: photo, sketch, cartoon, painting.")
    eval_images: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="Also draw this many images with another seed into OUTPUT/eval/images/"
        "<style>/<class>/: an evaluation image folder held out from the run's data.",
    )

    def data_record(self) -> dict[str, Any]:
        """The fields that decide the run's own images (the evaluation folder is not one)."""
        return self.model_dump(mode="json", exclude={"eval_images"})

    def fingerprint_record(self, seed: int) -> dict[str, Any]:
        return {"source": self.data_record(), "seed": seed}

    def items(self, storage: Storage, seed: int, *, dry_run: bool) -> SourceItems:
        # Fully described by its settings and the seed: a dry run draws nothing.
        if dry_run:
            return SourceItems(count=self.num_images)
        return SourceItems(url_list=self._write_images(storage, seed))

    def _names(self) -> dict[str, list[str]]:
        """The class and style lists the manifest sets (null keeps the generator's defaults)."""
        return {k: v for k, v in (("classes", self.classes), ("styles", self.styles)) if v}

    def _write_images(self, storage: Storage, seed: int) -> UrlListSource:
        """The run's images drawn once into the generated folder; their url list."""
        from dgaug.sources.imageset import URL_LIST_NAME, write_synthetic_dataset

        out = generated_dir(storage, "synthetic", {"seed": seed, **self.data_record()})
        done = os.path.join(out, "_SUCCESS")
        if not os.path.exists(done):
            write_synthetic_dataset(
                out,
                num_images=self.num_images,
                seed=seed,
                image_size=self.image_size,
                **self._names(),
            )
            atomic_write(done, "ok\n")
        if self.eval_images:
            self.write_eval_images(storage, seed)
        return UrlListSource.generated(os.path.join(out, URL_LIST_NAME))

    def write_eval_images(self, storage: Storage, seed: int) -> None:
        """The demo's held-out evaluation set: OUTPUT/eval/images/<style>/<class>/*.jpg.

        Drawn like the run's images but from another seed, so no evaluation image is a training
        one. Written once per count (`eval/_SUCCESS` holds it), not re-checked image by image on
        every run and plan. An object store output gets them drawn locally, then uploaded,
        `_SUCCESS` last.
        """
        from dgaug.sources.imageset import write_synthetic_dataset

        done = f"{EVAL_DIR}/_SUCCESS"
        try:
            if storage.read_text(done).strip() == str(self.eval_images):
                return
        except FileNotFoundError:
            pass
        if storage.is_local:
            out = storage.path(EVAL_DIR)
            # A run killed inside an atomic write leaves `.NAME.XXXXXXXX.tmp` here, outside
            # _dgaug's scratch.
            remove_temporaries(out, recursive=True)
        else:
            out = tempfile.mkdtemp(prefix="dgaug-eval-")
        try:
            write_synthetic_dataset(
                out,
                num_images=self.eval_images,
                seed=seed + EVAL_SEED_OFFSET,
                image_size=self.image_size,
                **self._names(),
            )
            if not storage.is_local:
                storage.upload_tree(out, EVAL_DIR)
        finally:
            if not storage.is_local:
                shutil.rmtree(out, ignore_errors=True)
        storage.write_text(done, f"{self.eval_images}\n")
