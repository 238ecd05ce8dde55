"""Shard I/O shared by stages: stream a webdataset tar's samples, run an iterator ahead in a thread."""

from __future__ import annotations

import queue
import tarfile
import threading
from collections.abc import Iterable, Iterator
from typing import Any

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the members open_clip's loader takes as the image


def read_tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a webdataset tar, streamed (local path or fsspec URL).

    The key is the member name up to its first dot, as webdataset reads it; a sample's members are
    adjacent in dgaug's shards, and a key met again later would be a malformed shard.
    """
    import fsspec

    seen: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for m in tf:
            if not m.isfile():
                continue
            name = m.name.rsplit("/", 1)[-1]
            k, _, ext = name.partition(".")
            data = tf.extractfile(m).read()
            if k != key:
                if key is not None:
                    yield key, members
                if k in seen:
                    raise RuntimeError(f"{url}: members of sample {k!r} are not adjacent")
                seen.add(k)
                key, members = k, {}
            members[ext.lower()] = data
        if key is not None:
            yield key, members


_END = object()


def prefetch(items: Iterable[Any], depth: int = 1) -> Iterator[Any]:
    """Iterate `items` in a background thread, `depth` items ahead (decoding overlaps the model).

    An exception in the thread is raised here; stopping early stops the thread.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    t = threading.Thread(target=work, name="edsam-prefetch", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is _END:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        t.join(timeout=5)


def embedding_column(matrix: Any, dtype: str) -> Any:
    """A [N, D] float matrix (numpy or CPU tensor) as a Parquet-ready fixed-size-list column of
    `dtype` ("float16" or "float32"): one list of D numbers per row."""
    import numpy as np
    import pyarrow as pa

    arr = np.asarray(matrix, dtype=np.float16 if dtype == "float16" else np.float32)
    flat = pa.array(arr.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])
