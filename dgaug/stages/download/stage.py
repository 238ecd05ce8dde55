"""The download stage: each shard's URLs fetched by img2dataset, then committed as one dgaug shard."""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq

from dgaug.core.constants import MAX_ASPECT_RATIO
from dgaug.pipeline.stage import Plan, ShardResult, ShardTask, Stage, StageContext
from dgaug.stages.download import ingest
from dgaug.stages.download.launcher import launcher
from dgaug.stages.download.merge import (
    SubShardsOutOfOrder,
    finished_subshards,
    merge_shards,
    merge_status,
    stream_tar,
)
from dgaug.stages.download.urls import KEY_COL, pre_download_skip, split_url_list

# img2dataset's keep_ratio and center_crop resize the short side first: a 5,000 x 1 sliver (a
# 94-byte PNG) became 1,280,000 x 256 pixels, 1.1 GB, before its crop; 50,000 x 1 would take 11
# GB. Unless the manifest sets a limit, those modes skip images more elongated than the edsam and
# features stages take (img2dataset checks it before resizing: counted as filtered_size).
_SHORT_SIDE_MODES = ("keep_ratio", "center_crop")


# img2dataset's sub-shards of a dgaug shard: small enough that most of the merge overlaps the
# download (the sub-shards close one after another), large enough that img2dataset's cost per
# sub-shard (a thread pool, writers, a stats file) stays small.
SUB_SHARD_ROWS = 500


def subshard_rows(valid: int, processes: int) -> int:
    """Rows per img2dataset sub-shard: every process busy, and at most SUB_SHARD_ROWS."""
    return max(1, min(math.ceil(valid / processes), SUB_SHARD_ROWS))


class _Call:
    """A function run in a daemon thread (an interrupt does not wait for it), its result later."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._result = fn(*args)
        except BaseException as e:  # handed to the caller by result()
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def _max_aspect_ratio(cfg: Any) -> float:
    if cfg.max_aspect_ratio:
        return cfg.max_aspect_ratio
    return float(MAX_ASPECT_RATIO) if cfg.resize_mode in _SHORT_SIDE_MODES else float("inf")


class DownloadStage(Stage):
    name = "download"
    output_dir = "real"
    upstream = ()

    def default_resources(self):
        from dgaug.pipeline.resources import StageResources

        return StageResources(workers=1, num_cpus=self.config.processes, num_gpus=0)

    def fingerprint_config(self) -> dict[str, Any]:
        """Source and download settings; plan adds which source files (`source_files`)."""
        cfg = self.config.model_dump(mode="json", exclude=set(self.config.PERFORMANCE_FIELDS))
        return {
            **self.manifest.source.fingerprint_record(self.manifest.seed),
            "shard_size": self.manifest.shard_size,
            "download": cfg,
        }

    def _outputs(self, shard_id: int) -> tuple[str, ...]:
        n = self.shard_name(shard_id)
        return (f"{n}.tar", f"{n}.parquet", f"{n}_stats.json")

    # -- plan
    def plan(self, ctx: StageContext) -> Plan:
        src = self.manifest.source
        shard_size = self.manifest.shard_size
        items = src.items(ctx.storage, ctx.seed, dry_run=ctx.dry_run)
        # What the fingerprint knows of the source beyond its settings, so that a url list
        # replaced under the same name is not mixed with shards made from the old one.
        inputs = {"source_files": items.files}
        if not src.fetched:  # existing shards: one task per tar
            tasks = [
                ShardTask(self.name, i, inputs=(p,), outputs=self._outputs(i))
                for i, p in enumerate(items.tars)
            ]
            return Plan(tasks, inputs)
        if items.url_list is None:  # a dry run of a generated source: counted, not written
            return Plan(self._count_only(math.ceil(items.count / shard_size)), inputs)
        folder, n = split_url_list(items.url_list, shard_size, ctx.storage, dry_run=ctx.dry_run)
        tasks = [
            ShardTask(
                self.name,
                i,
                inputs=(ctx.storage.url(f"{folder}/{i:05d}.parquet"),),
                outputs=self._outputs(i),
            )
            for i in range(n)
        ]
        return Plan(tasks, inputs)

    def _count_only(self, n: int) -> list[ShardTask]:
        return [ShardTask(self.name, i, outputs=self._outputs(i)) for i in range(n)]

    # -- work
    def setup(self, ctx: StageContext) -> None:
        if self.manifest.source.fetched:
            launcher().start()  # imports img2dataset now, not inside the first shard

    def process(self, task: ShardTask, ctx: StageContext) -> ShardResult:
        out = os.path.join(task.tmp_dir, self.shard_name(task.shard_id))
        if not self.manifest.source.fetched:
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
        allowed = self.manifest.source.fetch_schemes()
        skipped, valid = [], []
        for r in rows:
            # Missing url, a scheme the manifest does not allow, empty caption: never fetched.
            reason = pre_download_skip(r, has_caption, allowed)
            if reason:
                skipped.append({**r, "status": "skipped", "error_message": reason})
            else:
                valid.append(r)

        i2d_dir = os.path.join(task.tmp_dir, "img2dataset")
        os.makedirs(i2d_dir)
        if valid:
            inp = os.path.join(task.tmp_dir, "urls.parquet")
            pq.write_table(table.from_pylist(valid, schema=table.schema), inp)
            extra = [c for c in table.column_names if c not in ("url", "caption")]
            per_sub_shard = subshard_rows(len(valid), cfg.processes)
            kwargs = dict(
                url_list=inp,
                output_folder=i2d_dir,
                input_format="parquet",
                url_col="url",
                caption_col="caption" if has_caption else None,
                save_additional_columns=extra,
                output_format="webdataset",
                number_sample_per_shard=per_sub_shard,
                processes_count=cfg.processes,
                thread_count=cfg.threads,
                image_size=cfg.image_size,
                resize_mode=cfg.resize_mode,
                resize_only_if_bigger=cfg.resize_only_if_bigger,
                encode_quality=cfg.encode_quality,
                min_image_size=cfg.min_image_size,
                max_aspect_ratio=_max_aspect_ratio(cfg),
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
            log_path = os.path.join(task.tmp_dir, "img2dataset.log")
            n_sub = math.ceil(len(valid) / per_sub_shard)
            return self._fetch_and_merge(kwargs, log_path, n_sub, out, expected, skipped)
        samples, counts, failures = merge_shards(
            i2d_dir, f"{out}.tar", f"{out}.parquet", f"{out}_stats.json", expected, skipped
        )
        return ShardResult(samples=samples, counts=counts, failures=failures)

    def _fetch_and_merge(
        self,
        kwargs: dict[str, Any],
        log_path: str,
        n_sub: int,
        out: str,
        expected: list[str],
        skipped: list[dict[str, Any]],
    ) -> ShardResult:
        """img2dataset runs in the launcher's child while this thread merges the sub-shards it has
        closed: the merge of one sub-shard overlaps the download of the next, instead of the whole
        shard's merge running alone (one core idle) after its download."""
        i2d_dir = kwargs["output_folder"]
        # Started (if it is not running) from this thread: the launcher dies with the thread
        # that started it (PR_SET_PDEATHSIG), and the call's thread ends with the call.
        launcher().start()
        call = _Call(self._run_img2dataset, kwargs, log_path)
        try:
            written = stream_tar(finished_subshards(i2d_dir, n_sub, call.done), f"{out}.tar")
        except SubShardsOutOfOrder:
            written = -1  # not expected from img2dataset; the whole merge sorts them
        except Exception:
            call.result()  # the call ends before its scratch folder can go; its error first
            raise
        call.result()  # raises if img2dataset failed
        if written < 0:
            samples, counts, failures = merge_shards(
                i2d_dir, f"{out}.tar", f"{out}.parquet", f"{out}_stats.json", expected, skipped
            )
        else:
            samples, counts, failures = merge_status(
                i2d_dir, f"{out}.parquet", f"{out}_stats.json", expected, skipped, written
            )
        return ShardResult(samples=samples, counts=counts, failures=failures)

    def _run_img2dataset(self, kwargs: dict[str, Any], log_path: str) -> None:
        code = launcher().run(kwargs, log_path)
        if code != 0:
            tail = ""
            with contextlib.suppress(OSError), open(log_path, errors="replace") as f:
                tail = "".join(f.readlines()[-15:])
            raise RuntimeError(f"img2dataset exited with code {code}:\n{tail}")
        # img2dataset reports a failed sub-shard only in its log: merge_shards checks every row.
