"""Speed and memory options: activation checkpointing, torch.compile, channels-last, the global batch sampler."""

import pytest
import torch

import cliptune
from cliptune.models import build_model
from cliptune.train.distributed import GlobalBatchSampler, World
from cliptune.train.logging import step_losses
from tests.helpers import CAPTIONS


def _grads(model, images, tokens) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks in both runs (checkpointing replays them in its recomputation)
    image, text = model.encode_image(images), model.encode_text(tokens)
    (image @ text.T).logsumexp(dim=1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["openclip-vit", "hf-clip", "composed"])
def test_grad_checkpointing_gives_the_same_gradients(backends, name):
    cfg = backends[name]
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    size = model.eval_transform.transforms[0].size if hasattr(model.eval_transform, "transforms") else 32
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(3, 3, size, size)
    tokens = model.tokenize(CAPTIONS[:3])
    plain = _grads(model, images, tokens)
    assert model.set_grad_checkpointing(True) > 0
    checkpointed = _grads(model, images, tokens)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-6, msg=key)


def test_grad_checkpointing_is_used_by_the_open_clip_blocks(backends):
    model = build_model(backends["openclip-vit"])
    model.set_grad_checkpointing(True)
    assert model.model.visual.transformer.grad_checkpointing
    assert model.model.transformer.grad_checkpointing


def test_a_model_without_checkpointing_support_says_which_key(monkeypatch, backends):
    model = build_model(backends["openclip-vit"])
    monkeypatch.setattr(type(model), "modules", lambda self: iter([self]))
    with pytest.raises(ValueError, match=r"train\.grad_checkpointing"):
        model.set_grad_checkpointing(True)


def _run(shapes, tmp_path, name: str, **extra) -> dict:
    cfg = {
        "name": name,
        "model": {"arch": "cliptune-tiny-rn"},
        "data": {"train": {"path": str(shapes / "train.csv")}},
        "train": {"epochs": 1, "batch_size": 32},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "runtime": {"output_dir": str(tmp_path), "progress": False, "seed": 0, "log_every": 1},
    }
    for key, value in extra.items():
        section, field = key.split("__")
        cfg[section][field] = value
    cliptune.finetune(cfg)
    return step_losses(tmp_path / name)


@pytest.mark.slow
def test_checkpointing_and_channels_last_train_like_the_default(shapes, tmp_path):
    plain = _run(shapes, tmp_path, "plain")
    checkpointed = _run(shapes, tmp_path, "checkpointed", train__grad_checkpointing=True)
    torch.testing.assert_close(torch.tensor(checkpointed), torch.tensor(plain), rtol=1e-4, atol=1e-5)
    # channels-last convolutions sum in another order: equal at the first step, close (not bitwise) after Adam steps
    channels_last = _run(shapes, tmp_path, "channels_last", runtime__channels_last=True)
    assert channels_last[0] == pytest.approx(plain[0], rel=1e-4)
    torch.testing.assert_close(torch.tensor(channels_last), torch.tensor(plain), rtol=2e-2, atol=1e-3)


@pytest.mark.slow
def test_compiled_training_matches_eager(shapes, tmp_path):
    plain = _run(shapes, tmp_path, "eager", train__epochs=1)
    compiled = _run(shapes, tmp_path, "compiled", runtime__compile=True)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(plain), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize(("size", "batch"), [(10, 3), (7, 9), (12, 6)])
def test_global_batches_split_over_ranks_concatenate_to_the_single_process_batches(world, size, batch):
    def batches(where: World) -> list[list[int]]:
        generator = torch.Generator().manual_seed(5)
        return list(GlobalBatchSampler(size, batch, generator, drop_last=size > batch, where=where))

    single = batches(World())
    order = torch.randperm(size, generator=torch.Generator().manual_seed(5)).tolist()
    expected_batches = [order[i : i + batch] for i in range(0, size, batch)]
    assert single == (expected_batches[: size // batch] if size > batch else expected_batches)
    per_rank = [batches(World(rank, world)) for rank in range(world)]
    assert all(len(b) == len(single) for b in per_rank)
    for step, expected in enumerate(single):
        assert [i for r in range(world) for i in per_rank[r][step]] == expected
    sampler = GlobalBatchSampler(size, batch, torch.Generator(), drop_last=size > batch, where=World(0, world))
    assert sampler.local_size == len(per_rank[0][0])
