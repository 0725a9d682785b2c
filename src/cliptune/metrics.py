"""Exact, deterministic retrieval recall@k and classification accuracy computed from embeddings or logits."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence

import numpy as np
import torch

# Callers pass numpy arrays, torch tensors or (for index vectors) plain Python sequences.
ArrayLike = np.ndarray | torch.Tensor | Sequence
# The one number per eval set: mean recall for retrieval, top-1 accuracy for classification.
HEADLINE = ("mean_recall", "acc1")


def headline(values: dict[str, float]) -> float | None:
    """An eval set's headline figure (`HEADLINE`), None when its metrics have none."""
    return next((values[k] for k in HEADLINE if k in values), None)


# Bytes one score costs while a chunk is ranked, measured (tests/test_metrics.py): the float32 score, two boolean
# masks of the same shape, and what the matmul and the row counts hold on the side (~7 bytes; 9 leaves a margin).
_BYTES_PER_SCORE = 9
MEMORY_BUDGET = 256 * 2**20


def retrieval(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: ArrayLike,
    ks: Iterable[int] = (1, 5, 10),
    chunk_size: int | None = None,
    memory_bytes: int = MEMORY_BUDGET,
) -> dict[str, float]:
    """Text-to-image and image-to-text recall@k (percent) for L2-normalised embeddings scored by dot product.

    `text_to_image[j]` is the image that caption j describes; an image may have several captions, each its own
    row. A caption's text-to-image hit at k means its image is among the top k images; an image's image-to-text
    hit at k means any of its captions is among the top k captions. Candidates are ordered by (score descending,
    index ascending), so ties resolve the same way on every run and every chunk size. The full similarity matrix
    is never built: scores are computed `chunk_size` query rows at a time; by default as many rows as keep one
    chunk's working set (its scores and two boolean masks of their shape) within `memory_bytes`.

    Returns `t2i_R@k` and `i2t_R@k` for each k, then `mean_recall`, the mean of all of them.
    """
    ks = _check_ks(ks)
    if chunk_size is not None:
        chunk_size = _check_positive_int(chunk_size, "chunk_size")
    memory_bytes = _check_positive_int(memory_bytes, "memory_bytes")
    device = _device_of(image_emb, text_emb)
    img = _as_embeddings(image_emb, "image_emb", device)
    txt = _as_embeddings(text_emb, "text_emb", device)
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image_emb and text_emb must share the embedding dim, got {img.shape[1]} and {txt.shape[1]}")
    owner = _as_index_vector(text_to_image, "text_to_image", txt.shape[0], img.shape[0], device)
    captionless = torch.nonzero(torch.bincount(owner, minlength=img.shape[0]) == 0).flatten()
    if captionless.numel():
        # Image-to-text recall of an image with no caption is undefined; silently counting it as a miss would
        # bias the score, so the caller must drop such images (or their captions are missing from the data).
        raise ValueError(
            f"{captionless.numel()} of {img.shape[0]} images have no caption in text_to_image "
            f"(first: image {int(captionless[0])}); drop them or supply their captions"
        )
    with torch.no_grad():
        t2i = _t2i_positions(img, txt, owner, chunk_size or _rows_within(memory_bytes, img.shape[0]))
        i2t = _i2t_positions(img, txt, owner, chunk_size or _rows_within(memory_bytes, txt.shape[0]))
    out = {f"t2i_R@{k}": _percent_below(t2i, k) for k in ks}
    out.update({f"i2t_R@{k}": _percent_below(i2t, k) for k in ks})
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def _rows_within(memory_bytes: int, candidates: int) -> int:
    return max(1, memory_bytes // (_BYTES_PER_SCORE * candidates))


def classification(logits: ArrayLike, labels: ArrayLike, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy `acc{k}` and `mean_per_class_recall` (percent) of logits (N, C) against labels (N,).

    Ties use the same stable rule as `retrieval` (score descending, class index ascending). `acc{k}` is left out
    when k > C, since e.g. top-5 accuracy means nothing with fewer than 5 classes. The per-class recall is top-1
    and averaged over the classes that occur in `labels`, as absent classes have no recall to measure.
    """
    ks = _check_ks(ks)
    device = _device_of(logits, labels)
    scores = _as_real_tensor(logits, "logits", device)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"logits must be a non-empty 2-D (N, C) array, got shape {tuple(scores.shape)}")
    # Ranking only compares values, so logits keep their dtype: casting float64 to float32 could invent ties.
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError("logits contain NaN, which cannot be ranked")
    n_classes = scores.shape[1]
    y = _as_index_vector(labels, "labels", scores.shape[0], n_classes, device)
    with torch.no_grad():
        pos = _positions(scores, y)
    out = {f"acc{k}": _percent_below(pos, k) for k in ks if k <= n_classes}
    support = torch.bincount(y, minlength=n_classes)
    correct = torch.bincount(y[pos == 0], minlength=n_classes)
    present = support > 0
    recalls = correct[present].double() / support[present].double()
    out["mean_per_class_recall"] = 100.0 * float(recalls.mean())
    return out


class _Workspace:
    """One chunk's scores and two boolean masks, allocated once per pass and reused by every chunk.

    A fresh allocation per chunk is returned to a fragmented heap rather than to the system: measured on glibc with
    16 MiB chunks, the peak grew to 200 MiB over 8 chunks; with these buffers it stays at the chunk's size.
    """

    def __init__(self, rows: int, candidates: torch.Tensor) -> None:
        self.candidates = candidates
        shape, device = (rows, candidates.shape[0]), candidates.device
        self.scores = torch.empty(shape, device=device)
        self.masks = (
            torch.empty(shape, dtype=torch.bool, device=device),
            torch.empty_like(self.scores, dtype=torch.bool),
        )

    def scores_of(self, queries: torch.Tensor) -> torch.Tensor:
        return torch.matmul(queries, self.candidates.T, out=self.scores[: queries.shape[0]])


def _t2i_positions(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Position of each caption's own image among all images, `chunk_size` captions at a time."""
    parts = []
    work = _Workspace(min(chunk_size, txt.shape[0]), img)
    for start in range(0, txt.shape[0], chunk_size):
        scores = work.scores_of(txt[start : start + chunk_size])
        parts.append(_positions(scores, owner[start : start + chunk_size], work.masks))
    return torch.cat(parts)


def _i2t_positions(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Best position of any of each image's captions among all captions, `chunk_size` images at a time.

    Position is strictly increasing along the (score descending, index ascending) order, so the best position
    over an image's captions is the position of its first caption in that order: ranking that one caption alone
    needs only the scores of the image's own captions, gathered from the chunk (no captions x candidates mask).
    """
    parts = []
    by_image = torch.argsort(owner, stable=True)  # caption indices grouped by image, ascending within each
    counts = torch.bincount(owner, minlength=img.shape[0])
    ends = torch.cumsum(counts, 0)
    work = _Workspace(min(chunk_size, img.shape[0]), txt)
    for start in range(0, img.shape[0], chunk_size):
        stop = min(start + chunk_size, img.shape[0])
        scores = work.scores_of(img[start:stop])
        captions = by_image[int(ends[start] - counts[start]) : int(ends[stop - 1])]
        rows = owner[captions] - start
        own = scores[rows, captions]
        best = torch.full((stop - start,), float("-inf"), device=scores.device).scatter_reduce(0, rows, own, "amax")
        top = own == best[rows]  # every caption tied for its image's best score; the lowest index among them wins
        first = torch.full((stop - start,), txt.shape[0], device=scores.device, dtype=torch.long)
        parts.append(_positions(scores, first.scatter_reduce(0, rows[top], captions[top], "amin"), work.masks))
    return torch.cat(parts)


def _positions(
    scores: torch.Tensor, targets: torch.Tensor, masks: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """0-based rank of each row's target candidate under (score descending, index ascending), by comparisons.

    position(c) = #(score > s_c) + #(score == s_c and index < c); no sort, so it is exact and O(rows x candidates).
    `masks` are two boolean buffers of at least the scores' shape to write the comparisons into.
    """
    rows = scores.shape[0]
    if masks is None:
        masks = (torch.empty_like(scores, dtype=torch.bool), torch.empty_like(scores, dtype=torch.bool))
    compared, before = masks[0][:rows], masks[1][:rows]
    target_scores = scores.gather(1, targets[:, None])
    cand = torch.arange(scores.shape[1], device=scores.device)
    above = _count_rows(torch.gt(scores, target_scores, out=compared))
    torch.eq(scores, target_scores, out=compared)
    compared &= torch.lt(cand[None, :], targets[:, None], out=before)
    return above + _count_rows(compared)


def _count_rows(mask: torch.Tensor) -> torch.Tensor:
    """True entries per row, a few rows at a time: torch sums a boolean tensor through an int64 copy of all of it
    (8 bytes per entry, measured), which would be the largest tensor of a chunk."""
    rows = max(1, 2**21 // (8 * max(1, mask.shape[1])))
    return torch.cat([block.sum(dim=1) for block in mask.split(rows)])


def _percent_below(positions: torch.Tensor, k: int) -> float:
    # Integer hit counts keep the result exact and independent of chunking; a k beyond the candidate count
    # simply makes every position a hit.
    return 100.0 * int((positions < k).sum()) / positions.numel()


def _check_ks(ks: Iterable[int]) -> list[int]:
    """Validated, de-duplicated ks in the caller's order (duplicates would skew `mean_recall`)."""
    out: list[int] = []
    for k in ks:
        k = _check_positive_int(k, "each k")
        if k not in out:
            out.append(k)
    if not out:
        raise ValueError("ks must name at least one k")
    return out


def _check_positive_int(value: object, name: str) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {number}")
    return number


def _device_of(*arrays: object) -> torch.device:
    # Compute where the caller's tensors already live: copying big embedding matrices is the costly part.
    for array in arrays:
        if isinstance(array, torch.Tensor):
            return array.device
    return torch.device("cpu")


def _as_real_tensor(x: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    tensor = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {tensor.dtype}")
    return tensor.to(device)


def _as_embeddings(x: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    emb = _as_real_tensor(x, name, device)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (N, D) array, got shape {tuple(emb.shape)}")
    emb = emb.to(torch.float32)
    # NaN or inf would make comparisons meaningless (and the -inf start of the best-caption search).
    if not torch.isfinite(emb).all():
        raise ValueError(f"{name} contains NaN or inf")
    return emb


def _as_index_vector(x: ArrayLike, name: str, length: int, upper: int, device: torch.device) -> torch.Tensor:
    """A (length,) long tensor of indices in [0, upper), or ValueError naming the first bad entry."""
    idx = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if idx.ndim != 1 or idx.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(idx.shape)}")
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"{name} must hold integer indices, got dtype {idx.dtype}")
    idx = idx.to(device=device, dtype=torch.long)
    bad = torch.nonzero((idx < 0) | (idx >= upper)).flatten()
    if bad.numel():
        first = int(bad[0])
        raise ValueError(
            f"{name}[{first}] = {int(idx[first])} is out of range [0, {upper}) ({bad.numel()} bad entries)"
        )
    return idx
