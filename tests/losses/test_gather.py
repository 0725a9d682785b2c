"""The gathered CLIP loss of a 2-process gloo run equals the single-process loss on the concatenated batch.

One spawn runs every case (both `local_loss` modes; equal, unequal and empty local batches; a clamped temperature; a
real DistributedDataParallel model) and saves what each rank saw; the tests compare that with one process in float64.
Convention checked: each rank's loss value is the global loss, the raw gradient of a rank's features is world_size
times the single-process gradient of its rows, and gradients averaged over ranks as DDP does them are the
single-process ones.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cliptune.losses.clip import clip_loss, clip_loss_directions
from cliptune.losses.gather import gather_with_grad, gathered_clip_loss, gathered_clip_terms
from tests.helpers import gloo_group, spawn_ranks

WORLD = 2
DIM = 5
CLIP_TEMPERATURE = math.log(1 / 0.07)
# name -> (local_loss, rows on each rank, log inverse temperature)
CASES = {
    "local": (True, (3, 3), CLIP_TEMPERATURE),
    "global": (False, (3, 3), CLIP_TEMPERATURE),
    "local-unequal": (True, (2, 5), CLIP_TEMPERATURE),
    "global-unequal": (False, (2, 5), CLIP_TEMPERATURE),
    "local-empty-rank": (True, (0, 4), 1.0),
    "global-empty-rank": (False, (0, 4), 1.0),
    "local-clamped": (True, (3, 3), 5.0),  # above log 100: no temperature gradient
}
DDP_ROWS = 4  # per rank


def _features(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Un-normalised image and text features of the global batch (float64)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, DIM, generator=g, dtype=torch.float64), torch.randn(
        rows, DIM, generator=g, dtype=torch.float64
    )


def _normalised(img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def _loss_and_grads(img: torch.Tensor, txt: torch.Tensor, log_scale: float, loss_fn) -> dict[str, torch.Tensor]:
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    loss = loss_fn(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale)
    loss.backward()
    return {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad}


class _Towers(nn.Module):
    """Two linear 'towers' and a learnable temperature, as in a CLIP model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(DIM, 3).double()
        self.text = nn.Linear(DIM, 3).double()
        self.logit_scale = nn.Parameter(torch.tensor(CLIP_TEMPERATURE, dtype=torch.float64))

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1)


def _ddp_grads(model: nn.Module, images, texts, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad()
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    loss_fn(*model(images, texts), module.logit_scale).backward()
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    gloo_group(rank, WORLD, init_file)
    try:
        results = {}
        for name, (local_loss, sizes, log_scale) in CASES.items():
            img, txt = _features(sum(sizes))
            rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))

            def loss_fn(i, t, s, local_loss=local_loss):
                return gathered_clip_loss(i, t, s, local_loss=local_loss)

            results[name] = _loss_and_grads(img[rows], txt[rows], log_scale, loss_fn)
            scale = torch.tensor(log_scale, dtype=torch.float64)
            parts = gathered_clip_terms(*_normalised(img[rows], txt[rows]), scale, local_loss=local_loss)[1]
            results[name]["parts"] = parts

        x = torch.arange(DIM, dtype=torch.float64)
        results["gathered"] = gather_with_grad(x[: rank + 1] + 10 * rank)

        images, texts = _features(WORLD * DDP_ROWS, seed=1)
        rows = slice(rank * DDP_ROWS, (rank + 1) * DDP_ROWS)
        ddp = nn.parallel.DistributedDataParallel(_Towers())
        for local_loss in (True, False):

            def loss_fn(i, t, s, local_loss=local_loss):
                return gathered_clip_loss(i, t, s, local_loss=local_loss)

            results[f"ddp-local={local_loss}"] = _ddp_grads(ddp, images[rows], texts[rows], loss_fn)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the two gloo ranks computed, per case."""
    return spawn_ranks(_worker, tmp_path_factory.mktemp("gather"), WORLD)


@pytest.mark.parametrize("name", list(CASES))
def test_loss_value_on_each_rank_is_the_global_loss(ranks, name):
    _, sizes, log_scale = CASES[name]
    expected = _loss_and_grads(*_features(sum(sizes)), log_scale, clip_loss)["loss"]
    for rank in range(WORLD):
        torch.testing.assert_close(ranks[rank][name]["loss"], expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_logged_directions_on_each_rank_are_those_of_the_global_batch(ranks, name):
    """The image->text and text->image parts the training log shows, the same on every rank; their mean is the loss."""
    _, sizes, log_scale = CASES[name]
    scale = torch.tensor(log_scale, dtype=torch.float64)
    expected = clip_loss_directions(*_normalised(*_features(sum(sizes))), scale)
    for rank in range(WORLD):
        parts = ranks[rank][name]["parts"]
        torch.testing.assert_close(parts["image_to_text"], expected[0], atol=1e-10, rtol=0)
        torch.testing.assert_close(parts["text_to_image"], expected[1], atol=1e-10, rtol=0)
        mean = (parts["image_to_text"] + parts["text_to_image"]) / 2
        torch.testing.assert_close(mean, ranks[rank][name]["loss"], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_feature_gradients_are_world_size_times_the_single_process_ones(ranks, name):
    """Raw `.grad` of rank r's rows = WORLD x single-process gradient; DDP's division by WORLD makes them equal."""
    _, sizes, log_scale = CASES[name]
    expected = _loss_and_grads(*_features(sum(sizes)), log_scale, clip_loss)
    for rank in range(WORLD):
        rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        for key in ("img", "txt"):
            torch.testing.assert_close(ranks[rank][name][key] / WORLD, expected[key][rows], atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_temperature_gradient_averaged_over_ranks_is_the_single_process_one(ranks, name):
    _, sizes, log_scale = CASES[name]
    expected = _loss_and_grads(*_features(sum(sizes)), log_scale, clip_loss)["scale"]
    averaged = sum(ranks[rank][name]["scale"] for rank in range(WORLD)) / WORLD
    torch.testing.assert_close(averaged, expected, atol=1e-10, rtol=0)
    if log_scale > math.log(100):
        assert expected == 0


@pytest.mark.parametrize("local_loss", [True, False])
def test_ddp_parameter_gradients_equal_the_single_process_ones(ranks, local_loss):
    """A real DistributedDataParallel model: its averaged gradients, no scaling of the loss, are the full-batch ones."""
    images, texts = _features(WORLD * DDP_ROWS, seed=1)
    expected = _ddp_grads(_Towers(), images, texts, clip_loss)
    for rank in range(WORLD):
        got = ranks[rank][f"ddp-local={local_loss}"]
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-10, rtol=0, msg=name)


def test_gather_with_grad_concatenates_unequal_ranks_in_rank_order(ranks):
    x = torch.arange(DIM, dtype=torch.float64)
    expected = torch.cat([x[:1], x[:2] + 10])
    for rank in range(WORLD):
        torch.testing.assert_close(ranks[rank]["gathered"], expected, atol=0, rtol=0)


@pytest.mark.parametrize("local_loss", [True, False])
def test_without_a_process_group_it_is_the_clip_loss(local_loss):
    assert not dist.is_initialized()
    img, txt = _features(6)
    expected = _loss_and_grads(img, txt, CLIP_TEMPERATURE, clip_loss)
    got = _loss_and_grads(
        img, txt, CLIP_TEMPERATURE, lambda i, t, s: gathered_clip_loss(i, t, s, local_loss=local_loss)
    )
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-12, rtol=0)
    assert gather_with_grad(img) is img


def test_mismatched_rows_are_rejected():
    img, txt = _features(4)
    with pytest.raises(ValueError, match="same number of rows"):
        gathered_clip_loss(img, txt[:3], torch.tensor(0.0))
