"""The costs a scan at 41,000 shards per stage depends on, kept: listings of sizes only, the
garbage collector paused and restored, S3 listing timestamps parsed fast and as botocore does."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from dgaug.core.storage import Storage, _parse_timestamp
from dgaug.pipeline.scan import gc_paused, scan_stage


def test_list_sizes_is_list_detail_without_the_stamps(tmp_path: Path) -> None:
    s = Storage(str(tmp_path))
    s.write_bytes("st/00000.tar", b"x" * 10)
    s.write_bytes("st/00001.tar", b"")
    s.makedirs("st/_state")
    assert s.list_sizes("st") == {n: size for n, (size, _) in s.list_detail("st").items()}
    assert s.list_sizes("st") == {"00000.tar": 10, "00001.tar": 0}  # the _state folder is no file
    assert s.list_sizes("nowhere") == {}


@pytest.mark.parametrize("enabled", [True, False])
def test_a_scan_pauses_the_collector_and_leaves_it_as_it_was(tmp_path: Path, enabled: bool) -> None:
    s = Storage(str(tmp_path))
    s.write_bytes("st/00000.tar", b"x" * 4)
    marker = {"fingerprint": "f", "samples": 1, "outputs": {"00000.tar": {"bytes": 4}}}
    s.write_bytes("st/_state/00000.json", json.dumps(marker).encode())
    seen = []
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        with gc_paused():
            seen.append(gc.isenabled())
            with gc_paused():  # nested (scan_stages around scan_stage): the outer one restores
                pass
            seen.append(gc.isenabled())
        assert sorted(scan_stage(s, "st").committed("f")) == [0]
        seen.append(gc.isenabled())
    finally:
        (gc.enable if was else gc.disable)()
    assert seen == [False, False, enabled]


@pytest.mark.parametrize(
    "text",
    [
        "2026-12-06T17:34:56.000Z",  # ListObjectsV2's LastModified
        "2026-12-06T17:34:56Z",
        "2026-12-06T17:34:56.123456+02:00",
        "Sun, 06 Dec 2026 17:34:56 GMT",  # a Last-Modified header: botocore's own parser
        "1796578175",  # epoch seconds
    ],
)
def test_s3_timestamps_parse_to_what_botocore_gives(text: str) -> None:
    from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

    got, want = _parse_timestamp(text), DEFAULT_TIMESTAMP_PARSER(text)
    assert got == want and got.utcoffset() == want.utcoffset()
