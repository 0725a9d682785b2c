"""The faiss index over an index's embeddings: exact inner product while that stays fast, IVF above it.

Choice (autofaiss-style, by size): up to `EXACT_MAX` vectors a flat inner-product scan (exact; query latencies by
size are in benchmarks/RESULTS.md, `benchmarks/search.py`); above it an inverted-file index (`IVF{nlist},Flat`,
nlist ~ sqrt(N)) whose `nprobe` is raised until recall@10 against the exact scan, measured on held-out queries,
reaches `TARGET_RECALL`. IVF rather than HNSW: it keeps memory at the vectors themselves (HNSW adds its link lists
per vector) and trains in seconds on a sample. The measured recall is stored with the index so a reader knows what
it gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from cliptune.utils.files import atomic_write

EXACT_MAX = 100_000
TARGET_RECALL = 0.95
HELD_OUT = 500  # queries for the recall measurement
RECALL_K = 10


@dataclass
class AnnInfo:
    """What kind of faiss index was built and how good it is: stored in index.json."""

    kind: str
    nprobe: int = 0
    recall_at_10: float = 1.0
    queries: int = 0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "nprobe": self.nprobe, "recall_at_10": self.recall_at_10, "queries": self.queries}


def build(vectors: np.ndarray, exact_max: int = EXACT_MAX, seed: int = 0) -> tuple[faiss.Index, AnnInfo]:
    """A faiss index over `vectors` (rows = ids), exact or IVF with measured recall."""
    n, dim = vectors.shape
    if n <= exact_max:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, AnnInfo(kind="Flat")
    rng = np.random.default_rng(seed)
    held_out = rng.choice(n, size=min(HELD_OUT, n // 10), replace=False)
    # sqrt(N) lists keep both the k-means training (on 50 points per list) and a query's scan short; faiss wants
    # at least 39 training points per list
    nlist = max(1, int(min(math.sqrt(n), n // 50)))
    index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    train = np.setdiff1d(rng.choice(n, size=min(n, 50 * nlist), replace=False), held_out)
    index.train(vectors[train])
    index.add(vectors)
    index.nprobe, recall = tune_nprobe(index, vectors, held_out)
    return index, AnnInfo(f"IVF{nlist},Flat", int(index.nprobe), recall, len(held_out))


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return flat.search(queries, k)[1]


def recall_at(found: np.ndarray, truth: np.ndarray, self_ids: np.ndarray | None = None) -> float:
    """Mean share of the true top-k found; a query's own id (a held-out database vector) counts for neither."""
    hits = total = 0
    for row, (f, t) in enumerate(zip(found, truth)):
        own = {int(self_ids[row])} if self_ids is not None else set()
        want = [i for i in t if i not in own][:RECALL_K]
        hits += len(set(want) & set(f.tolist()))
        total += len(want)
    return hits / max(total, 1)


def tune_nprobe(index: faiss.Index, vectors: np.ndarray, held_out: np.ndarray) -> tuple[int, float]:
    """The smallest power-of-two nprobe whose recall@10 on the held-out queries reaches TARGET_RECALL."""
    queries = vectors[held_out]
    truth = exact_neighbours(vectors, queries, RECALL_K + 1)
    nprobe, recall = 1, 0.0
    while nprobe <= index.nlist:
        index.nprobe = nprobe
        recall = recall_at(index.search(queries, RECALL_K + 1)[1], truth, held_out)
        if recall >= TARGET_RECALL:
            break
        nprobe *= 2
    return min(nprobe, index.nlist), recall


def write(index: faiss.Index, path: Path) -> None:
    # faiss's own binary format: read back by faiss.read_index, which executes nothing
    with atomic_write(path) as tmp:
        faiss.write_index(index, str(tmp))


def read(path: Path, nprobe: int) -> faiss.Index:
    index = faiss.read_index(str(path))
    if nprobe:
        index.nprobe = nprobe
        index.make_direct_map()  # so a stored vector can be read back by id (search by a result)
    return index
