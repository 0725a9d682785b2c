"""The one reader and writer of an index's Parquet tables: items (what, where, captions, size) and embeddings.

A table holds one row per image: `path`, `file`, `offset`, `length` (where its bytes are), `size`, `mtime_ns`
(its change key), `width`, `height`, `captions` and `embedding` (float32, L2-normalised). Chunks of a build in
progress and the finished index's `items.parquet` share this schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cliptune.index.sources import Item
from cliptune.utils.files import atomic_write

META_COLUMNS = ("path", "file", "offset", "length", "size", "mtime_ns", "width", "height", "captions")


def schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("path", pa.string()),
            ("file", pa.string()),
            ("offset", pa.int64()),
            ("length", pa.int64()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("captions", pa.list_(pa.string())),
            ("embedding", pa.list_(pa.float32(), dim)),
        ]
    )


def to_table(items: Sequence[Item], sizes: Sequence[tuple[int, int]], embeddings: np.ndarray) -> pa.Table:
    dim = embeddings.shape[1]
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    columns = {
        "path": [i.path for i in items],
        "file": [str(i.file) for i in items],
        "offset": [i.offset for i in items],
        "length": [i.length for i in items],
        "size": [i.size for i in items],
        "mtime_ns": [i.mtime_ns for i in items],
        "width": [w for w, _ in sizes],
        "height": [h for _, h in sizes],
        "captions": [list(i.captions) for i in items],
    }
    arrays = [pa.array(columns[name], type=schema(dim).field(name).type) for name in META_COLUMNS]
    return pa.Table.from_arrays([*arrays, pa.FixedSizeListArray.from_arrays(flat, dim)], schema=schema(dim))


def write(table: pa.Table, path: Path) -> None:
    """Atomically: a build killed mid-write leaves the previous file or none, never half of one."""
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp)


def read(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=list(columns) if columns else None)


def embeddings(table: pa.Table) -> np.ndarray:
    """The (N, D) float32 embeddings of a table."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def items(table: pa.Table) -> list[Item]:
    """The items of a table's rows, with the change keys they were encoded under."""
    data = table.select(["path", "file", "captions", "offset", "length", "size", "mtime_ns"]).to_pydict()
    return [
        Item(path, Path(file), tuple(caps), offset, length, size, mtime)
        for path, file, caps, offset, length, size, mtime in zip(*data.values())
    ]
