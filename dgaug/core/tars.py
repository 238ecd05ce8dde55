"""Tar shards: the deterministic writer every stage's tars go through."""

from __future__ import annotations

import contextlib


def write_deterministic_tar(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Samples in the order given, members of a sample adjacent, fixed owner and mtime."""
    from webdataset import TarWriter  # imports torch: only where a tar is written

    with open(path, "wb") as f:
        # An integer mtime: a float one makes tarfile add a 1 KB PAX header to every member.
        writer = TarWriter(f, encoder=False, mtime=0, user="dgaug", group="dgaug", mode=0o444)
        try:
            for key, members in samples:
                writer.write({"__key__": key, **members})
        except BaseException:
            # Close the tar stream while its file is open (a full disk fails here again, quietly):
            # left to the garbage collector, it would write into the closed file and print an
            # "Exception ignored" traceback after the run's one-line error.
            with contextlib.suppress(Exception):
                writer.close()
            raise
        writer.close()
