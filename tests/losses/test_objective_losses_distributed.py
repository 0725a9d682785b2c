"""The objective losses in a 2-process gloo run equal the single-process losses on the concatenated batch.

One spawn runs every case (each loss with equal, unequal and empty local batches, and a real DistributedDataParallel
model per loss) and saves what each rank saw; the tests compare that with one process in float64. Convention checked,
as for `gathered_clip_loss` (test_gather.py): each rank's loss value is the global loss; the raw gradient of a
rank's per-row inputs (features, negatives, tokens) is world_size times the single-process gradient of those rows;
the gradient of the replicated scalars (logit_scale, logit_bias) averaged over ranks is the single-process one; and
the parameter gradients of a DDP model, which DDP averages over ranks, equal the single-process ones.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cliptune.losses.fsc import fsc_loss, global_hn_loss, local_hn_loss
from cliptune.losses.negclip import negclip_loss, negclip_terms
from cliptune.losses.siglip import siglip_loss, siglip_terms
from cliptune.losses.unicl import unicl_loss, unicl_terms
from tests.helpers import gloo_group, spawn_ranks

WORLD = 2
D, N, P, L = 4, 2, 3, 4
ROWS = ("img", "txt", "neg", "mask", "labels", "patch", "text_tok", "text_mask", "neg_tok", "neg_tok_mask")
GRADS = ("img", "txt", "neg", "patch", "text_tok", "neg_tok")  # per-row inputs with a gradient
SIZES = {"equal": (3, 3), "unequal": (2, 5), "empty-rank": (0, 4)}


def _loss(name: str, x: dict) -> torch.Tensor:
    """Loss `name` of the (normalised where it matters) batch `x`."""
    img, txt, neg = (F.normalize(x[k], dim=-1) for k in ("img", "txt", "neg"))
    tokens = (x["patch"], x["text_tok"], x["text_mask"], x["neg_tok"], x["neg_tok_mask"])
    if name == "siglip":
        return siglip_loss(img, txt, x["scale"], x["bias"])
    if name == "negclip":
        return negclip_loss(img, txt, x["scale"], neg, x["mask"])
    if name == "unicl":
        return unicl_loss(img, txt, x["scale"], x["labels"])
    if name == "global_hn":
        return global_hn_loss(img, txt, neg, x["mask"], x["scale"])
    if name == "local_hn":
        return local_hn_loss(*tokens, x["mask"], x["scale"])
    assert name == "fsc"
    return fsc_loss(img, txt, x["scale"], neg, x["mask"], *tokens)


def _parts(name: str, x: dict) -> dict[str, torch.Tensor]:
    """The parts of loss `name` that the training log shows (detached global values)."""
    img, txt, neg = (F.normalize(x[k], dim=-1) for k in ("img", "txt", "neg"))
    if name == "siglip":
        return siglip_terms(img, txt, x["scale"], x["bias"])[1]
    if name == "negclip":
        return negclip_terms(img, txt, x["scale"], neg, x["mask"])[1]
    assert name == "unicl"
    return unicl_terms(img, txt, x["scale"], x["labels"])[1]


LOSSES = ("siglip", "negclip", "unicl", "global_hn", "local_hn", "fsc")
WITH_PARTS = ("siglip", "negclip", "unicl")
CASES = {f"{loss}-{sizes}": (loss, SIZES[sizes]) for loss in LOSSES for sizes in SIZES}


def _batch(rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A float64 global batch; rows 0 and 4 have no valid negative, labels repeat across ranks."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    mask = torch.rand(rows, N, generator=g) < 0.6
    mask[[r for r in (0, 4) if r < rows]] = False
    text_mask = torch.rand(rows, L, generator=g) < 0.7
    text_mask[:, 1] = True
    neg_tok_mask = torch.rand(rows, N, L, generator=g) < 0.7
    neg_tok_mask[..., 1] = True
    return {
        "img": randn(rows, D),
        "txt": randn(rows, D),
        "neg": randn(rows, N, D),
        "mask": mask,
        "labels": torch.arange(rows) % 3,
        "patch": randn(rows, P, D),
        "text_tok": randn(rows, L, D),
        "text_mask": text_mask,
        "neg_tok": randn(rows, N, L, D),
        "neg_tok_mask": neg_tok_mask,
        "scale": torch.tensor(math.log(1 / 0.07), dtype=torch.float64),
        "bias": torch.tensor(-2.0, dtype=torch.float64),
    }


def _rows(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] if k in ROWS else v for k, v in batch.items()}


def _loss_and_grads(name: str, batch: dict) -> dict[str, torch.Tensor]:
    keys = (*GRADS, "scale", "bias")
    leaves = {k: v.clone().requires_grad_() if k in keys else v for k, v in batch.items()}
    loss = _loss(name, leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)
    return {"loss": loss.detach()} | {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(keys, grads)}


class _Towers(nn.Module):
    """Two linear 'towers' (applied to features and tokens alike), a learnable temperature and, for SigLIP, a bias."""

    def __init__(self, bias: bool):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(D, D).double()
        self.text = nn.Linear(D, D).double()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0, dtype=torch.float64)) if bias else None

    def forward(self, x: dict) -> dict:
        image = {k: self.image(x[k]) for k in ("img", "patch")}
        text = {k: self.text(x[k]) for k in ("txt", "neg", "text_tok", "neg_tok")}
        return x | image | text | {"scale": self.logit_scale, "bias": self.logit_bias}


DDP_ROWS = 3  # per rank


def _ddp_grads(model: nn.Module, name: str, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad()
    _loss(name, model(batch)).backward()
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {key: p.grad.clone() for key, p in module.named_parameters()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    gloo_group(rank, WORLD, init_file)
    try:
        results = {}
        for case, (name, sizes) in CASES.items():
            batch = _rows(_batch(sum(sizes)), sum(sizes[:rank]), sum(sizes[: rank + 1]))
            results[case] = _loss_and_grads(name, batch)
            if name in WITH_PARTS:
                results[case]["parts"] = _parts(name, batch)
        batch = _rows(_batch(WORLD * DDP_ROWS, seed=1), rank * DDP_ROWS, (rank + 1) * DDP_ROWS)
        for name in ("siglip", "negclip", "unicl", "fsc"):
            ddp = nn.parallel.DistributedDataParallel(_Towers(bias=name == "siglip"))
            results[f"ddp-{name}"] = _ddp_grads(ddp, name, batch)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the two gloo ranks computed, per case."""
    return spawn_ranks(_worker, tmp_path_factory.mktemp("objective-losses"), WORLD)


def _single_process(case: str) -> dict[str, torch.Tensor]:
    name, sizes = CASES[case]
    return _loss_and_grads(name, _batch(sum(sizes)))


@pytest.mark.parametrize("case", list(CASES))
def test_loss_value_on_each_rank_is_the_global_loss(ranks, case):
    expected = _single_process(case)["loss"]
    for rank in range(WORLD):
        torch.testing.assert_close(ranks[rank][case]["loss"], expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", [case for case, (name, _) in CASES.items() if name in WITH_PARTS])
def test_logged_parts_on_each_rank_are_those_of_the_global_batch(ranks, case):
    name, sizes = CASES[case]
    expected = _parts(name, _batch(sum(sizes)))
    for rank in range(WORLD):
        got = ranks[rank][case]["parts"]
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-10, rtol=0, msg=key)


@pytest.mark.parametrize("case", list(CASES))
def test_row_gradients_are_world_size_times_the_single_process_ones(ranks, case):
    """Raw `.grad` of rank r's rows = WORLD x single-process gradient; DDP's division by WORLD makes them equal."""
    _, sizes = CASES[case]
    expected = _single_process(case)
    for rank in range(WORLD):
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        for key in GRADS:
            torch.testing.assert_close(ranks[rank][case][key] / WORLD, expected[key][rows], atol=1e-10, rtol=0, msg=key)


@pytest.mark.parametrize("case", list(CASES))
def test_scale_and_bias_gradients_averaged_over_ranks_are_the_single_process_ones(ranks, case):
    expected = _single_process(case)
    for key in ("scale", "bias"):
        averaged = sum(ranks[rank][case][key] for rank in range(WORLD)) / WORLD
        torch.testing.assert_close(averaged, expected[key], atol=1e-10, rtol=0, msg=key)


@pytest.mark.parametrize("name", ["siglip", "negclip", "unicl", "fsc"])
def test_ddp_parameter_gradients_equal_the_single_process_ones(ranks, name):
    """A real DistributedDataParallel model: its averaged gradients, no scaling of the loss, are the full-batch ones."""
    expected = _ddp_grads(_Towers(bias=name == "siglip"), name, _batch(WORLD * DDP_ROWS, seed=1))
    for rank in range(WORLD):
        got = ranks[rank][f"ddp-{name}"]
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-10, rtol=0, msg=key)


def test_the_hard_negative_means_run_over_the_global_batch():
    """In the unequal case the ranks hold different numbers of rows with a negative: a per-rank mean would differ."""
    sizes = SIZES["unequal"]
    mask = _batch(sum(sizes))["mask"]
    counts = [int(mask[sum(sizes[:r]) : sum(sizes[: r + 1])].any(dim=1).sum()) for r in range(WORLD)]
    assert counts[0] != counts[1] and min(counts) > 0
