"""`dgaug report`'s composition: the report reads a run with the pipeline's status and the graph's order."""

from __future__ import annotations

from typing import Any

from dgaug.job.registry import STAGE_CLASSES
from dgaug.pipeline.status import read_status
from dgaug.report.build import ReportResult, build_report


def report_run(output: str, **options: Any) -> ReportResult:
    """Write the report of the run in `output`; options as `dgaug.report.build.build_report`'s."""
    return build_report(output, read_status, list(STAGE_CLASSES), **options)
