"""The download stage: each shard's URLs fetched by img2dataset, then committed as one dgaug shard."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
import sys
from typing import Any

import pyarrow.parquet as pq

from dgaug.pipeline.manifest import (
    ImageFolderSource,
    ShardsSource,
    SyntheticSource,
    UrlListSource,
    expand_paths,
)
from dgaug.pipeline.stage import ShardResult, ShardTask, Stage, StageContext
from dgaug.stages.download import ingest
from dgaug.stages.download.merge import merge_shards
from dgaug.stages.download.sources import list_image_folder, listing_digest, resolve_url_list
from dgaug.stages.download.urls import KEY_COL, file_sizes, split_url_list

# albumentations (imported by img2dataset) asks the network for updates on import: never here.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _img2dataset_context():
    """The multiprocessing context that starts img2dataset's per-shard child processes.

    A forkserver, not a plain fork of the worker: the worker can be a Ray actor or a Ray driver,
    whose gRPC threads and sockets a forked child inherits half-way (a fork there has cut the
    driver off from Ray's control store and hung the run). The server is a fresh, single-threaded
    process with img2dataset imported once, so each child still starts warm in milliseconds, and
    it exits when the worker does.
    """
    import multiprocessing
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["img2dataset", __name__])  # no effect once the server runs
    forkserver.ensure_running()
    return ctx


def _img2dataset_child(kwargs: dict[str, Any], log_path: str) -> None:
    """Runs in a child of the forkserver: img2dataset prints, sets signal handlers, starts a pool."""
    with contextlib.suppress(OSError, AttributeError):
        # Die with the forkserver, which dies with the worker: a killed run leaves no orphan
        # writing into a removed folder.
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    from img2dataset import download

    _skip_img2dataset_process_start_up()
    download(**kwargs)


class _NoStatsLogger:
    """Stands in for img2dataset's LoggerProcess: dgaug merges the per-shard stats itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.done_shards: set[int] = set()

    def start(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def terminate(self) -> None:
        pass


def _skip_img2dataset_process_start_up() -> None:
    """Avoid img2dataset's *spawned* processes, each of which re-imports torch (~5 s a call).

    img2dataset starts a spawned stats-logger process and a spawned pool for every call, which
    is fine once per dataset but dominates once per shard. The logger only prints aggregate
    stats (dgaug keeps its own), and this child has one thread with every module loaded, so its
    pool can be forked safely. If a future img2dataset renames these, it spawns as before.
    """
    import importlib
    import multiprocessing

    # By module path: the package re-exports a function named `main` over the module's name.
    main = importlib.import_module("img2dataset.main")
    distributor = importlib.import_module("img2dataset.distributor")
    if hasattr(main, "LoggerProcess"):
        main.LoggerProcess = _NoStatsLogger
    if hasattr(distributor, "get_context"):
        distributor.get_context = lambda *_: multiprocessing.get_context("fork")


class DownloadStage(Stage):
    name = "download"
    output_dir = "real"
    upstream = ()

    def default_resources(self):
        from dgaug.pipeline.manifest import StageResources

        return StageResources(workers=1, num_cpus=self.config.processes, num_gpus=0)

    def fingerprint_config(self) -> dict[str, Any]:
        """Source and download settings, and which source files (set by plan: call it first)."""
        cfg = self.config.model_dump(mode="json", exclude=set(self.config.PERFORMANCE_FIELDS))
        synthetic = isinstance(self.manifest.source, SyntheticSource)
        return {
            "source": self.manifest.source.model_dump(mode="json"),
            "source_files": self._source_files,
            "seed": self.manifest.seed if synthetic else None,
            "shard_size": self.manifest.shard_size,
            "download": cfg,
        }

    def _outputs(self, shard_id: int) -> tuple[str, ...]:
        n = self.shard_name(shard_id)
        return (f"{n}.tar", f"{n}.parquet", f"{n}_stats.json")

    # -- plan
    def plan(self, ctx: StageContext) -> list[ShardTask]:
        src = self.manifest.source
        shard_size = self.manifest.shard_size
        # What the fingerprint knows of the source beyond its settings, so that a url list
        # replaced under the same name is not mixed with shards made from the old one.
        self._source_files: Any = None
        if isinstance(src, ShardsSource):
            paths = ingest.expand_shards(src.path)
            self._source_files = file_sizes(paths)
            return [
                ShardTask(self.name, i, inputs=(p,), outputs=self._outputs(i))
                for i, p in enumerate(paths)
            ]
        listing = None
        if isinstance(src, UrlListSource):
            self._source_files = file_sizes(expand_paths(src.path))
        elif isinstance(src, ImageFolderSource):
            listing = list_image_folder(src)
            self._source_files = listing_digest(listing)
            if ctx.dry_run:
                return self._count_only(math.ceil(listing.num_rows / shard_size))
        elif ctx.dry_run:  # synthetic: fully described by its settings and the seed
            return self._count_only(math.ceil(src.num_images / shard_size))
        url_list = resolve_url_list(self.manifest, ctx.storage, listing)
        folder, n = split_url_list(url_list, shard_size, ctx.storage, dry_run=ctx.dry_run)
        return [
            ShardTask(
                self.name,
                i,
                inputs=(ctx.storage.url(f"{folder}/{i:05d}.parquet"),),
                outputs=self._outputs(i),
            )
            for i in range(n)
        ]

    def _count_only(self, n: int) -> list[ShardTask]:
        return [ShardTask(self.name, i, outputs=self._outputs(i)) for i in range(n)]

    # -- work
    def setup(self, ctx: StageContext) -> None:
        if not isinstance(self.manifest.source, ShardsSource):
            _img2dataset_context()  # start the forkserver now, not inside the first shard

    def process(self, task: ShardTask, ctx: StageContext) -> ShardResult:
        out = os.path.join(task.tmp_dir, self.shard_name(task.shard_id))
        if isinstance(self.manifest.source, ShardsSource):
            return ingest.ingest_tar(
                task.inputs[0], task.shard_id, f"{out}.tar", f"{out}.parquet", f"{out}_stats.json"
            )
        return self._download(task, ctx, out)

    def _download(self, task: ShardTask, ctx: StageContext, out: str) -> ShardResult:
        import fsspec

        cfg = self.config
        with fsspec.open(task.inputs[0], "rb") as f:
            table = pq.read_table(f)
        has_caption = "caption" in table.column_names
        rows = table.to_pylist()
        expected = [r[KEY_COL] for r in rows]
        skipped, valid = [], []
        for r in rows:
            if not (r.get("url") or "").strip():
                skipped.append({**r, "status": "skipped", "error_message": "missing url"})
            elif has_caption and not (r.get("caption") or "").strip():
                skipped.append({**r, "status": "skipped", "error_message": "empty caption"})
            else:
                valid.append(r)

        i2d_dir = os.path.join(task.tmp_dir, "img2dataset")
        os.makedirs(i2d_dir)
        if valid:
            inp = os.path.join(task.tmp_dir, "urls.parquet")
            pq.write_table(table.from_pylist(valid, schema=table.schema), inp)
            extra = [c for c in table.column_names if c not in ("url", "caption")]
            per_process = math.ceil(len(valid) / cfg.processes)
            kwargs = dict(
                url_list=inp,
                output_folder=i2d_dir,
                input_format="parquet",
                url_col="url",
                caption_col="caption" if has_caption else None,
                save_additional_columns=extra,
                output_format="webdataset",
                number_sample_per_shard=max(per_process, 1),
                processes_count=cfg.processes,
                thread_count=cfg.threads,
                image_size=cfg.image_size,
                resize_mode=cfg.resize_mode,
                resize_only_if_bigger=cfg.resize_only_if_bigger,
                encode_quality=cfg.encode_quality,
                min_image_size=cfg.min_image_size,
                max_aspect_ratio=cfg.max_aspect_ratio or float("inf"),
                timeout=cfg.timeout,
                retries=cfg.retries,
                user_agent_token=cfg.user_agent_token,
                disallowed_header_directives=cfg.disallowed_header_directives,
                incremental_mode="incremental",  # "overwrite" deletes its own _tmp folder
                distributor="multiprocessing",
                enable_wandb=False,
                compute_hash="sha256",
                max_shard_retry=1,
            )
            self._run_img2dataset(kwargs, os.path.join(task.tmp_dir, "img2dataset.log"))
        samples, counts, failures = merge_shards(
            i2d_dir, f"{out}.tar", f"{out}.parquet", f"{out}_stats.json", expected, skipped
        )
        return ShardResult(samples=samples, counts=counts, failures=failures)

    def _run_img2dataset(self, kwargs: dict[str, Any], log_path: str) -> None:
        proc = _img2dataset_context().Process(
            target=_img2dataset_child, args=(kwargs, log_path), daemon=False
        )
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            tail = ""
            with contextlib.suppress(OSError), open(log_path, errors="replace") as f:
                tail = "".join(f.readlines()[-15:])
            raise RuntimeError(f"img2dataset exited with code {proc.exitcode}:\n{tail}")
        # img2dataset reports a failed sub-shard only in its log: merge_shards checks every row.
