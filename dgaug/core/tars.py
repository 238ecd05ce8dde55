"""Tar shards: the one streaming reader (adjacency and truncation checked) and the deterministic writer."""

from __future__ import annotations

import contextlib
import tarfile
from collections.abc import Iterator
from typing import Any


def member_key(name: str) -> tuple[str, str]:
    """(key, extension) as webdataset splits a member name: the folder stays in the key, and the
    key ends at the first dot of the base name (`d/a.b.jpg` -> `d/a`, `b.jpg`); lower-case ext."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


class TarDamage(RuntimeError):
    """The archive is cut or corrupt. Raised after every whole sample before the damage was
    yielded; `lost` is the key of the sample the damage cut (None if it fell between samples)."""

    def __init__(self, error: str, lost: str | None):
        self.error = error
        self.lost = lost
        super().__init__(error)


class _EndRecordingTarInfo(tarfile.TarInfo):
    """Remembers on the TarFile why its member list ended.

    tarfile ends the list silently at any bad header after the first: a zero block (the proper
    end), but also a file cut at or inside a header. Only the first is a whole archive.
    """

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            tarfile_.dgaug_end = e  # type: ignore[attr-defined]
            raise


def stream_samples(fileobj: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, grouping adjacent members by key, streamed; raises
    TarDamage at damage.

    A member whose extension the sample already has starts a new sample with the same key
    (`a.jpg a.txt a.jpg a.txt` is two samples `a`): nothing is overwritten. At damage the sample
    being read is dropped and named in TarDamage.lost: the one the cut member belongs to, or the
    last one when the cut fell on a header (its later members may be gone).
    """
    current: tuple[str, dict[str, bytes]] | None = None
    reading: str | None = None  # key of the member being read when the damage struck
    joins = False  # whether that member belongs to the current sample (else it starts one)
    error = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndRecordingTarInfo) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = member_key(m.name)
                joins = current is not None and current[0] == key and ext not in current[1]
                reading = key
                data = tf.extractfile(m).read()
                reading = None
                if joins:
                    current[1][ext] = data
                else:
                    if current is not None:
                        yield current
                    current = (key, {ext: data})
            end = getattr(tf, "dgaug_end", None)
            if end is not None and not isinstance(end, tarfile.EOFHeaderError):
                error = f"no end-of-archive block ({type(end).__name__}: {end})"
    except (tarfile.TarError, EOFError, OSError) as e:
        error = f"{type(e).__name__}: {e}"
    if not error:
        if current is not None:
            yield current
        return
    lost = reading
    if current is not None:
        if reading is None or joins:
            lost = current[0]
        else:  # the cut member started a new sample: the one before it is whole
            yield current
    raise TarDamage(error, lost)


def read_tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of one of dgaug's shards (local path or fsspec URL),
    streamed. Its samples' members are adjacent and its keys unique: a key met again is a
    malformed shard (RuntimeError), and a cut or corrupt archive raises TarDamage."""
    import fsspec

    seen: set[str] = set()
    with fsspec.open(url, "rb") as f:
        for key, members in stream_samples(f):
            if key in seen:
                raise RuntimeError(f"{url}: members of sample {key!r} are not adjacent")
            seen.add(key)
            yield key, members


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
