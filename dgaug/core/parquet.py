"""Parquet helpers shared by the stages that write embeddings."""

from __future__ import annotations

from typing import Any


def embedding_matrix(column: Any) -> Any:
    """A fixed-size-list column (as embedding_column writes it) -> a [rows, D] float32 numpy
    matrix; an empty column keeps its width."""
    import numpy as np

    combined = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    flat = np.asarray(combined.flatten(), dtype=np.float32)
    return flat.reshape(len(column), column.type.list_size)


def embedding_column(matrix: Any, dtype: str) -> Any:
    """A [N, D] float matrix (numpy or CPU tensor) as a Parquet-ready fixed-size-list column of
    `dtype` ("float16" or "float32"): one list of D numbers per row."""
    import numpy as np
    import pyarrow as pa

    arr = np.asarray(matrix, dtype=np.float16 if dtype == "float16" else np.float32)
    flat = pa.array(arr.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])
