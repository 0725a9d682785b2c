"""Tests of cliptune.metrics against a brute-force reference written with plain Python loops and sorts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cliptune import metrics
from cliptune.metrics import classification, retrieval

# ---------------------------------------------------------------------------------------------------------------
# Independent reference: full score table, explicit sort per query with the (score descending, index ascending) rule.
# ---------------------------------------------------------------------------------------------------------------


def _dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def _rank(scores: list[float]) -> list[int]:
    n = len(scores)
    return sorted(range(n), key=lambda c: (-scores[c], c))


def brute_retrieval(image_emb, text_emb, text_to_image, ks=(1, 5, 10)) -> dict[str, float]:
    image_emb, text_emb = np.asarray(image_emb, dtype=np.float64), np.asarray(text_emb, dtype=np.float64)
    n_img, n_txt = len(image_emb), len(text_emb)
    score = [[_dot(image_emb[i], text_emb[j]) for j in range(n_txt)] for i in range(n_img)]
    t2i_pos = []
    for j in range(n_txt):
        order = _rank([score[i][j] for i in range(n_img)])
        t2i_pos.append(order.index(int(text_to_image[j])))
    i2t_pos = []
    for i in range(n_img):
        order = _rank(score[i])
        i2t_pos.append(min(order.index(j) for j in range(n_txt) if int(text_to_image[j]) == i))
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * sum(p < k for p in t2i_pos) / n_txt
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * sum(p < k for p in i2t_pos) / n_img
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def brute_classification(logits, labels, ks=(1, 5)) -> dict[str, float]:
    logits = np.asarray(logits, dtype=np.float64)
    n, n_classes = logits.shape
    pos = [_rank([float(v) for v in logits[r]]).index(int(labels[r])) for r in range(n)]
    out = {f"acc{k}": 100.0 * sum(p < k for p in pos) / n for k in ks if k <= n_classes}
    recalls = []
    for c in range(n_classes):
        rows = [r for r in range(n) if int(labels[r]) == c]
        if rows:
            recalls.append(sum(pos[r] == 0 for r in rows) / len(rows))
    out["mean_per_class_recall"] = 100.0 * sum(recalls) / len(recalls)
    return out


def assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def quantised_data(seed: int, n_img: int = 23, dim: int = 6, levels: int = 2):
    """Embeddings on a coarse dyadic grid, 1-5 captions per image, some duplicated rows.

    Grid values (multiples of 1/4) make every dot product exact in float32 whatever the summation order, so the
    float32 metric and the float64 reference see identical scores, and the coarse grid makes exact ties common.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(-levels, levels + 1, size=(n_img, dim)) / 4.0
    images[1] = images[0]  # duplicate images: tied in every caption's row
    counts = rng.integers(1, 6, size=n_img)
    text_to_image = np.repeat(np.arange(n_img), counts)
    rng.shuffle(text_to_image)
    texts = rng.integers(-levels, levels + 1, size=(len(text_to_image), dim)) / 4.0
    texts[3] = texts[2]  # duplicate captions: tied in every image's row
    return images.astype(np.float32), texts.astype(np.float32), text_to_image


def normalised_data(seed: int, n_img: int = 17, dim: int = 16):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n_img, dim))
    text_to_image = np.repeat(np.arange(n_img), rng.integers(1, 6, size=n_img))
    rng.shuffle(text_to_image)
    texts = images[text_to_image] + 1.5 * rng.standard_normal((len(text_to_image), dim))
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return images.astype(np.float32), texts.astype(np.float32), text_to_image


E = [1.0, 0.0, 0.0, 0.0]  # one-hot / all-0.5 vectors: unit norm and exactly representable dot products
F = [0.0, 1.0, 0.0, 0.0]
G = [0.0, 0.0, 1.0, 0.0]
H = [0.5, 0.5, 0.5, 0.5]


# ---------------------------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("levels", [1, 3])
def test_retrieval_matches_brute_force_with_ties(seed: int, levels: int) -> None:
    images, texts, text_to_image = quantised_data(seed, levels=levels)
    ks = (1, 2, 5, 10)
    want = brute_retrieval(images, texts, text_to_image, ks)
    assert_same(retrieval(images, texts, text_to_image, ks=ks), want)


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_matches_brute_force_normalised(seed: int) -> None:
    images, texts, text_to_image = normalised_data(seed)
    assert_same(retrieval(images, texts, text_to_image), brute_retrieval(images, texts, text_to_image))


def test_chunk_size_does_not_change_results() -> None:
    images, texts, text_to_image = quantised_data(5, levels=1)
    n_img, n_txt = len(images), len(texts)
    ks = (1, 3, 5)
    want = brute_retrieval(images, texts, text_to_image, ks)
    # Smaller than both, equal to either, between them, larger than both.
    for chunk_size in (1, 2, 7, n_img - 1, n_img, n_img + 1, n_txt, n_txt + 1, 10_000):
        assert retrieval(images, texts, text_to_image, ks=ks, chunk_size=chunk_size) == pytest.approx(want), chunk_size
    results = [retrieval(images, texts, text_to_image, ks=ks, chunk_size=c) for c in (1, 4, n_img, 10_000)]
    assert all(r == results[0] for r in results)  # bit-identical, not just close


def test_hand_computed_three_images() -> None:
    # Scores (rows: images i0=E, i1=F, i2=G; columns: captions c0=E, c1=H, c2=F, c3=G):
    #   i0: 1.0 0.5 0 0    i1: 0 0.5 1.0 0    i2: 0 0.5 0 1.0
    # t2i positions: c0->i0: 0; c1->i1: all three tie at 0.5, i0 goes first -> 1;
    #   c2->i2: i1 scores higher, i0 ties and has a lower index -> 2; c3->i2: 0.
    # i2t positions: i0 owns c0 -> 0; i1 owns c1, c2 outranks it -> 1; i2 owns c2 (pos 2) and c3 (pos 0) -> 0.
    images = np.array([E, F, G], dtype=np.float32)
    texts = np.array([E, H, F, G], dtype=np.float32)
    got = retrieval(images, texts, [0, 1, 2, 2], ks=(1, 2, 10))
    want = {
        "t2i_R@1": 50.0,
        "t2i_R@2": 75.0,
        "t2i_R@10": 100.0,
        "i2t_R@1": 200.0 / 3,
        "i2t_R@2": 100.0,
        "i2t_R@10": 100.0,
    }
    want["mean_recall"] = sum(want.values()) / 6
    assert_same(got, want)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 100])
def test_tie_rule_hand_computed_all_equal(chunk_size: int) -> None:
    # Every image and caption is the same vector, so every score is 1.0 and ranks follow the index alone.
    # t2i: c0 -> i2 sits at position 2, c1 -> i0 at 0, c2 -> i1 at 1.
    # i2t: i0 owns c1 -> 1, i1 owns c2 -> 2, i2 owns c0 -> 0.
    images = np.array([E, E, E], dtype=np.float32)
    texts = np.array([E, E, E], dtype=np.float32)
    got = retrieval(images, texts, np.array([2, 0, 1]), ks=(1, 2, 3), chunk_size=chunk_size)
    third = 100.0 / 3
    want = {
        "t2i_R@1": third,
        "t2i_R@2": 2 * third,
        "t2i_R@3": 100.0,
        "i2t_R@1": third,
        "i2t_R@2": 2 * third,
        "i2t_R@3": 100.0,
    }
    want["mean_recall"] = sum(want.values()) / 6
    assert_same(got, want)


def test_tie_rule_best_caption_of_image() -> None:
    # i0's row: c0 (owned by i1) = 1.0, c1 (i0) = 1.0, c2 (i0) = 1.0, c3 (i1) = 0.
    # i0's captions c1 and c2 tie with c0, which has a lower index: best position 1, so no R@1 hit.
    # i1's row: c0 = 0, c1 = 0, c2 = 0, c3 = 1.0 -> its caption c3 is first.
    images = np.array([E, F], dtype=np.float32)
    texts = np.array([E, E, E, F], dtype=np.float32)
    got = retrieval(images, texts, [1, 0, 0, 1], ks=(1, 2))
    assert got["i2t_R@1"] == 50.0
    assert got["i2t_R@2"] == 100.0
    # t2i: c0 -> i1 scores 0 vs i0's 1.0: position 1; c1, c2 -> i0 at 0; c3 -> i1 at 0.
    assert got["t2i_R@1"] == 75.0
    assert got["t2i_R@2"] == 100.0


def test_k_larger_than_candidates() -> None:
    images, texts, text_to_image = quantised_data(7, n_img=5)
    got = retrieval(images, texts, text_to_image, ks=(1, 1000))
    assert got["t2i_R@1000"] == 100.0 and got["i2t_R@1000"] == 100.0
    assert_same(got, brute_retrieval(images, texts, text_to_image, ks=(1, 1000)))
    one = retrieval(images[:1], texts[:2], [0, 0], ks=(1, 5))  # a single image: always rank 0
    assert set(one.values()) == {100.0}


def test_numpy_and_torch_inputs_agree() -> None:
    images, texts, text_to_image = quantised_data(11)
    want = retrieval(images, texts, text_to_image)
    as_list = retrieval(images, texts, text_to_image.tolist())
    as_torch = retrieval(torch.from_numpy(images), torch.from_numpy(texts), torch.from_numpy(text_to_image))
    as_f64 = retrieval(torch.from_numpy(images).double(), texts.astype(np.float64), text_to_image.astype(np.int32))
    with_grad = retrieval(torch.from_numpy(images).requires_grad_(), torch.from_numpy(texts), text_to_image)
    for got in (as_list, as_torch, as_f64, with_grad):
        assert got == want
    assert all(type(v) is float for v in want.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_cpu() -> None:
    images, texts, text_to_image = quantised_data(13)
    want = retrieval(images, texts, text_to_image, chunk_size=5)
    got = retrieval(torch.from_numpy(images).cuda(), torch.from_numpy(texts).cuda(), text_to_image, chunk_size=5)
    assert got == want
    logits, labels = np.random.default_rng(0).integers(0, 3, size=(40, 7)).astype(np.float32), np.arange(40) % 7
    assert classification(torch.from_numpy(logits).cuda(), labels) == classification(logits, labels)


def test_default_keys_and_mean() -> None:
    images, texts, text_to_image = quantised_data(3)
    got = retrieval(images, texts, text_to_image)
    keys = ["t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10"]
    assert list(got) == [*keys, "mean_recall"]
    assert got["mean_recall"] == pytest.approx(sum(got[k] for k in keys) / 6)
    assert all(0.0 <= v <= 100.0 for v in got.values())


def test_retrieval_errors() -> None:
    images = np.array([E, F, G], dtype=np.float32)
    texts = np.array([E, F, G, H], dtype=np.float32)
    good = [0, 1, 2, 2]
    with pytest.raises(ValueError, match="1 of 3 images have no caption"):
        retrieval(images, texts, [0, 0, 2, 2])
    with pytest.raises(ValueError, match="2 of 3 images have no caption"):
        retrieval(images, texts, [0, 0, 0, 0])
    with pytest.raises(ValueError, match="embedding dim"):
        retrieval(images, texts[:, :3], good)
    with pytest.raises(ValueError, match="image_emb"):
        retrieval(images[0], texts, good)
    with pytest.raises(ValueError, match="text_emb"):
        retrieval(images, texts[None], good)
    with pytest.raises(ValueError, match="text_to_image must have shape"):
        retrieval(images, texts, [0, 1, 2])
    with pytest.raises(ValueError, match="text_to_image must have shape"):
        retrieval(images, texts, [[0, 1, 2, 2]])
    with pytest.raises(ValueError, match="out of range"):
        retrieval(images, texts, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="out of range"):
        retrieval(images, texts, [0, 1, -1, 2])
    with pytest.raises(ValueError, match="integer"):
        retrieval(images, texts, [0.0, 1.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="image_emb"):
        retrieval(np.zeros((0, 4), dtype=np.float32), texts, good)
    with pytest.raises(ValueError, match="text_emb"):
        retrieval(images, np.zeros((0, 4), dtype=np.float32), [])
    with pytest.raises(ValueError, match="NaN"):
        retrieval(np.array([E, F, [math.nan, 0, 0, 0]], dtype=np.float32), texts, good)
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval(images, texts, good, chunk_size=0)
    with pytest.raises(ValueError, match="k"):
        retrieval(images, texts, good, ks=(0, 1))
    with pytest.raises(ValueError, match="ks"):
        retrieval(images, texts, good, ks=())


# ---------------------------------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_classes", [2, 5, 12])
def test_classification_matches_brute_force(seed: int, n_classes: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.integers(0, 4, size=(60, n_classes)).astype(np.float32)  # small integers: many exact ties
    labels = rng.integers(0, n_classes, size=60)
    ks = (1, 3, 5)
    assert_same(classification(logits, labels, ks=ks), brute_classification(logits, labels, ks=ks))
    assert_same(
        classification(torch.from_numpy(logits), torch.from_numpy(labels), ks=ks),
        brute_classification(logits, labels, ks=ks),
    )


def test_classification_hand_computed_imbalanced() -> None:
    # 4 classes, class 3 never occurs. Class 0: 4 of 4 right; class 1: 0 of 1; class 2: 1 of 2, the miss being a
    # tie between classes 1 and 2 that the lower index (1) wins.
    logits = np.array(
        [
            [5.0, 1.0, 0.0, 0.0],  # label 0, right
            [5.0, 1.0, 0.0, 0.0],  # label 0, right
            [2.0, 1.0, 0.0, 3.0],  # label 0, position 1 (class 3 above)
            [9.0, 1.0, 0.0, 0.0],  # label 0, right
            [1.0, 0.0, 2.0, 0.0],  # label 1, position 2
            [0.0, 2.0, 2.0, 0.0],  # label 2, tied with class 1, position 1
            [0.0, 0.0, 4.0, 1.0],  # label 2, right
        ]
    )
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    got = classification(logits, labels)
    # Row 2 is a miss too, so class 0 recall is 3/4: acc1 = 4/7, mean per class = (3/4 + 0 + 1/2) / 3.
    assert list(got) == ["acc1", "mean_per_class_recall"]  # acc5 omitted: only 4 classes
    assert got["acc1"] == pytest.approx(100.0 * 4 / 7)
    assert got["mean_per_class_recall"] == pytest.approx(100.0 * (0.75 + 0.0 + 0.5) / 3)
    got2 = classification(logits, labels, ks=(1, 2, 4, 5))
    assert list(got2) == ["acc1", "acc2", "acc4", "mean_per_class_recall"]
    assert got2["acc2"] == pytest.approx(100.0 * 6 / 7)
    assert got2["acc4"] == 100.0


def test_classification_acc5_present_with_enough_classes() -> None:
    logits = np.eye(6)[[0, 1, 2, 3, 4, 5]]
    got = classification(logits, np.array([0, 1, 2, 3, 4, 0]))
    assert list(got) == ["acc1", "acc5", "mean_per_class_recall"]
    assert got["acc1"] == pytest.approx(500 / 6)
    # Last row: true class 0 ties with 1-4 at 0 behind class 5 -> position 1, inside the top 5.
    assert got["acc5"] == 100.0
    assert got["mean_per_class_recall"] == pytest.approx(100.0 * (0.5 + 4) / 5)


def test_classification_float64_logits_keep_precision() -> None:
    # 1 + 1e-12 and 1 collapse to a tie in float32; ranking in float64 keeps class 1 ahead.
    got = classification(np.array([[1.0, 1.0 + 1e-12]]), [1])
    assert got["acc1"] == 100.0


def test_classification_errors() -> None:
    logits = np.zeros((3, 4))
    with pytest.raises(ValueError, match="logits"):
        classification(np.zeros(4), [0])
    with pytest.raises(ValueError, match="logits"):
        classification(np.zeros((0, 4)), [])
    with pytest.raises(ValueError, match="labels must have shape"):
        classification(logits, [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        classification(logits, [0, 1, 4])
    with pytest.raises(ValueError, match="out of range"):
        classification(logits, [0, -1, 2])
    with pytest.raises(ValueError, match="integer"):
        classification(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="NaN"):
        classification(np.full((3, 4), math.nan), [0, 1, 2])


_PEAK_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from cliptune import metrics

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

g = torch.Generator().manual_seed(0)
n_img, n_txt = int(sys.argv[1]), int(sys.argv[2])
img = torch.nn.functional.normalize(torch.randn(n_img, 32, generator=g), dim=1)
txt = torch.nn.functional.normalize(torch.randn(n_txt, 32, generator=g), dim=1)
owner = torch.arange(n_txt) % n_img
budget = int(sys.argv[3])
metrics.retrieval(img, txt, owner, memory_bytes=budget)  # pages in the code it runs (BLAS kernels are large)
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current resident size
base = kib("VmRSS")
metrics.retrieval(img, txt, owner, memory_bytes=budget)
print(kib("VmHWM") - base)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
def test_retrieval_peak_memory_stays_within_its_budget():
    """Issue 11.8: one chunk's working set is a few score-sized tensors, sized from the budget, far below the full
    similarity matrix (the old 1024-row chunks held ~18 bytes per score: 3.5x this matrix)."""
    n_img, n_txt, budget = 2000, 10000, 16 * 2**20
    matrix = n_img * n_txt * 4
    # Freed buffers go back to the system (glibc's standard tunables), so the peak is this call's working set,
    # not heap the first call left behind; the first call pages in the code, which is not the working set either.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(n_img), str(n_txt), str(budget)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    peak = int(proc.stdout.strip().splitlines()[-1])
    assert peak < budget < matrix / 4, f"peak {peak / 2**20:.1f} MiB for a {matrix / 2**20:.0f} MiB matrix"


def test_budget_sized_chunks_give_the_same_recall_as_one_chunk():
    g = torch.Generator().manual_seed(3)
    # Multiples of 1/8: every dot product is exact whatever the chunk's matmul blocking, and many of them tie.
    img = torch.randint(-4, 5, (50, 8), generator=g) / 8
    txt = torch.randint(-4, 5, (170, 8), generator=g) / 8
    owner = torch.randint(0, 50, (170,), generator=g)
    owner[:50] = torch.arange(50)
    whole = metrics.retrieval(img, txt, owner, chunk_size=10_000)
    assert metrics.retrieval(img, txt, owner, memory_bytes=6 * 170 * 3) == whole  # 3-row chunks
    assert metrics.retrieval(img, txt, owner, memory_bytes=1) == whole  # 1-row chunks
