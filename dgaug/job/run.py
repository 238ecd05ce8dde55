"""The composition: a manifest's stages and executor handed to the pipeline, to plan or to run."""

from __future__ import annotations

from dgaug.core.storage import Storage
from dgaug.job.graph import build_stages
from dgaug.job.manifest import Manifest, dump_manifest
from dgaug.job.view import score_view_filter
from dgaug.pipeline.executors import RunListener, make_executor
from dgaug.pipeline.run import RunSummary, StagePlan, plan_graph, run_graph


def plan_stages(manifest: Manifest, storage: Storage, *, dry_run: bool) -> dict[str, StagePlan]:
    """Plan every enabled stage and compare with what is committed. Writes nothing if dry_run."""
    return plan_graph(build_stages(manifest), manifest, storage, dry_run=dry_run)


def run_pipeline(
    manifest: Manifest, *, force: bool = False, listener: RunListener | None = None
) -> RunSummary:
    """Run (or resume) the manifest's stage graph. Raises LockHeld, FingerprintMismatch, ManifestError."""
    stages, storage = build_stages(manifest), Storage(manifest.output)
    return run_graph(
        stages,
        manifest,
        storage,
        lambda: make_executor(manifest.executor),
        manifest_text=dump_manifest(manifest),
        force=force,
        listener=listener,
        view_filter=score_view_filter(manifest, storage, stages),
    )
