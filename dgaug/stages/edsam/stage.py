"""The edsam stage: M transported LDM samples per real image, one edsam shard per real shard."""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from dgaug.core.prefetch import prefetch
from dgaug.core.tars import write_deterministic_tar
from dgaug.pipeline.stage import ModelStage, Plan, ShardResult, ShardTask, StageContext
from dgaug.stages.edsam.config import EdsamConfig
from dgaug.stages.edsam.io import decoded_chunks, encode_jpeg, sample_json

# A source whose short side is upscaled more than this to the generation size is counted and
# warned about: beyond it the LDM encodes a visibly blurred picture.
MAX_UPSCALE = 1.25


def _mean(total: int, n: int) -> float | None:
    return round(total / n, 1) if n else None


class EdsamStage(ModelStage):
    name = "edsam"
    output_dir = "edsam"
    upstream = ("download",)
    model_attrs = ("_ldm", "_clip", "_sampler")

    @property
    def config(self) -> EdsamConfig:
        return self.manifest.stages.edsam

    @property
    def letterboxed(self) -> bool:
        """Whether the real shards hold img2dataset `border` images (bands around the picture),
        which the stage cuts back to the picture before the LDM sees them."""
        m = self.manifest
        return type(m.source).fetched and m.stages.download.resize_mode == "border"

    def fingerprint_config(self) -> dict[str, Any]:
        """The manifest seed (every sample's seed derives from it), the effective config, and
        how source images are cut (the picture of a letterboxed image, or the whole image)."""
        return {
            "seed": self.manifest.seed,
            "edsam": self.config.effective(),
            "source_cut": "picture" if self.letterboxed else "whole",
        }

    # -- plan
    def plan(self, ctx: StageContext) -> Plan:
        return Plan(
            [
                ShardTask(
                    self.name,
                    up.shard_id,
                    inputs=(ctx.upstream_url("download", up.shard_id),),
                    deps=(("download", up.shard_id),),
                    outputs=(f"{self.shard_name(up.shard_id)}.tar",),
                )
                for up in ctx.upstream["download"]
            ]
        )

    # -- work
    def setup(self, ctx: StageContext) -> None:
        """Load the LDM (and the reference CLIP for objective worst) once per worker."""
        from dgaug.models.ldm import load_ldm
        from dgaug.stages.edsam.sampler import EdsamSampler

        cfg = self.config
        t0 = time.perf_counter()
        self._ldm = load_ldm(
            cfg.model,
            device=cfg.device,
            dtype=cfg.dtype,
            compile=cfg.compile and cfg.lora is None,  # compiled after the LoRA is fused
            allow_large_on_cpu=cfg.allow_cpu,
            config=cfg.model_config_dir,
        )
        if cfg.lora is not None:
            from dgaug.models.ldm import compile_ldm
            from dgaug.models.ldm_addons import attach_lora

            attach_lora(self._ldm, cfg.lora)
            if cfg.compile:
                compile_ldm(self._ldm)
        if cfg.decoder == "tiny":
            from dgaug.models.ldm_addons import attach_tiny_decoder

            attach_tiny_decoder(self._ldm, cfg.tiny_decoder)
        if cfg.objective == "worst":
            from dgaug.models.clip import load_clip

            self._clip = load_clip(cfg.reference_clip, device=cfg.device, precision=cfg.dtype)
        self._sampler = EdsamSampler(self._ldm, cfg, self.manifest.seed, self._clip)
        self.log.info(
            "edsam models ready in %.1fs: %s on %s (%s)%s",
            time.perf_counter() - t0,
            self._ldm.model_id,
            self._ldm.device,
            self._ldm.dtype,
            f", reference {self._clip.model_id}" if self._clip is not None else "",
        )

    def process(self, task: ShardTask, ctx: StageContext) -> ShardResult:
        from dgaug.models.runtime import cpu_threads

        sampler = self._sampler
        sampler.seconds = {}
        failures: Counter[str] = Counter()
        stats = {"sources": 0, "samples": 0, "sample_bytes": 0, "source_bytes": 0, "upscaled": 0}
        started = time.perf_counter()
        out = os.path.join(task.tmp_dir, task.outputs[0])
        with (
            cpu_threads(self.config.cpu_threads, self._ldm.device),
            ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool,
        ):
            samples = self._samples(task.inputs[0], pool, failures, stats)
            try:
                write_deterministic_tar(out, samples)  # pulls the samples: streamed, not held
            finally:
                samples.close()  # on an error, stop the decoding thread now
        seconds = time.perf_counter() - started
        if failures:
            self.log.warning(
                "edsam shard %05d: skipped %d source(s): %s",
                task.shard_id,
                sum(failures.values()),
                dict(sorted(failures.items())),
            )
        info = {
            "device": str(self._ldm.device),
            "dtype": str(self._ldm.dtype).removeprefix("torch."),
            "tiny_random": sampler.tiny,
            "seconds": {k: round(v, 3) for k, v in sorted(sampler.seconds.items())},
            "samples_per_s": round(stats["samples"] / seconds, 3) if seconds > 0 else None,
            # What a sample costs on disk against its source: the output's size budget.
            "bytes_per_sample": _mean(stats["sample_bytes"], stats["samples"]),
            "source_bytes_per_image": _mean(stats["source_bytes"], stats["sources"]),
        }
        if stats["upscaled"]:
            self._warn_upscale_once(stats["upscaled"], task.shard_id)
        return ShardResult(
            samples=stats["samples"],
            counts={
                "sources": stats["sources"],
                "skipped_sources": sum(failures.values()),
                "upscaled_sources": stats["upscaled"],
            },
            failures=dict(sorted(failures.items())),
            info=info,
        )

    def _samples(
        self, url: str, pool: ThreadPoolExecutor, failures: Counter[str], stats: dict[str, int]
    ) -> Iterator[tuple[str, dict[str, bytes]]]:
        """The shard's output samples in key order, as the tar writer asks for them.

        Source images are decoded a chunk ahead in a thread; the JPEGs of one chunk are encoded
        in `pool` while the model works on the next chunk.
        """
        import torch

        cfg, sampler = self.config, self._sampler
        width = len(str(cfg.samples_per_image - 1))  # "_9" < "_10" as strings would not hold
        pending: deque[list[tuple[str, Future[bytes], bytes, bytes]]] = deque()
        last = ""
        chunks = decoded_chunks(url, cfg.image_size, cfg.source_batch, self.letterboxed)
        for chunk in prefetch(chunks, depth=1):
            used = [s for s in chunk if s.skip is None]
            failures.update(s.skip for s in chunk if s.skip is not None)
            if used:
                gen = sampler.generate(
                    torch.stack([s.pixels for s in used]),
                    [s.caption.decode("utf-8", errors="replace").strip() for s in used],
                    [s.key for s in used],
                )
                batch = []
                for g in gen:
                    src = used[g.source_index]
                    rec = {**g.record, **src.meta}
                    side = cfg.output_size or src.side
                    fut = pool.submit(encode_jpeg, g.image, cfg.jpeg_quality, side)
                    key = f"{src.key}_{g.j:0{width}d}"
                    batch.append((key, fut, src.caption, sample_json(rec)))
                pending.append(batch)
                stats["sources"] += len(used)
                stats["source_bytes"] += sum(s.image_bytes for s in used)
                stats["upscaled"] += sum(s.side * MAX_UPSCALE < cfg.image_size for s in used)
            while len(pending) > 1:
                for item in self._finish(pending.popleft(), stats):
                    last = self._check_order(last, item[0])
                    yield item
        while pending:
            for item in self._finish(pending.popleft(), stats):
                last = self._check_order(last, item[0])
                yield item

    @staticmethod
    def _finish(batch, stats: dict[str, int]) -> Iterator[tuple[str, dict[str, bytes]]]:
        for key, fut, txt, meta in batch:
            jpg = fut.result()
            stats["samples"] += 1
            stats["sample_bytes"] += len(jpg)
            yield key, {"jpg": jpg, "txt": txt, "json": meta}

    def _warn_upscale_once(self, n: int, shard_id: int) -> None:
        # Once per worker: every shard of a low-resolution download would say the same.
        if getattr(self, "_upscale_warned", False):
            return
        self._upscale_warned = True
        self.log.warning(
            "edsam shard %05d: %d source image(s) are upscaled more than %.2fx to the LDM's "
            "%d px (counted as upscaled_sources in each marker): the LDM sees blurred pictures. "
            "Download at stages.download.image_size >= %d, or lower stages.edsam.image_size",
            shard_id,
            n,
            MAX_UPSCALE,
            self.config.image_size,
            round(self.config.image_size / MAX_UPSCALE),
        )

    @staticmethod
    def _check_order(last: str, key: str) -> str:
        # Upstream shards are in key order, so ours are; a reader may rely on it.
        if key <= last:
            raise RuntimeError(f"edsam keys out of order: {key!r} after {last!r}")
        return key
