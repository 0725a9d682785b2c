"""Tests of the EMA of trainable weights (cliptune.tuning.ema): arithmetic, what is tracked, swap, resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from cliptune.config import FinetuneConfig
from cliptune.models import build_model
from cliptune.tuning.ema import EMA
from cliptune.tuning.locking import apply_locking
from tests.helpers import CAPTIONS


class Small(nn.Module):
    """A trainable layer, a BatchNorm (buffers) and a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.frozen = nn.Linear(3, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.bn(self.fc(x)))


def small(seed: int = 0) -> Small:
    torch.manual_seed(seed)
    return Small()


def sgd_steps(model: Small, opt: torch.optim.Optimizer, ema: EMA, steps: range) -> None:
    """Deterministic training steps: the data of step k depends only on k."""
    model.train()
    for k in steps:
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(k))
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)


def test_update_matches_hand_computation() -> None:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.5)
    for value in (3.0, 5.0, 9.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    # 0.5*1 + 0.5*3 = 2; 0.5*2 + 0.5*5 = 3.5; 0.5*3.5 + 0.5*9 = 6.25
    assert ema.shadow[0].item() == 6.25
    assert ema.num_updates == 3


def test_update_matches_formula_on_tensors() -> None:
    model = small()
    ema = EMA(model, decay=0.9)
    expected = {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        ema.update(model)
        params = dict(model.named_parameters())
        for name in expected:
            expected[name] = 0.9 * expected[name] + 0.1 * params[name].detach().double()
    for name, shadow in zip(ema.param_names, ema.shadow):
        assert shadow.dtype == torch.float32
        torch.testing.assert_close(shadow.double(), expected[name], rtol=0, atol=1e-6)


def test_warmup_decay_schedule() -> None:
    model = nn.Linear(1, 1, bias=False)
    plain, warm = EMA(model, 0.9), EMA(model, 0.9, warmup=True)
    seen = []
    for _ in range(3):
        seen.append(warm.current_decay())
        warm.update(model)
    assert plain.current_decay() == 0.9
    assert seen[:3] == [1 / 10, 2 / 11, 3 / 12]
    warm.num_updates = 79
    assert warm.current_decay() == 80 / 89  # still below 0.9
    warm.num_updates = 81
    assert warm.current_decay() == 0.9  # 82 / 91 > 0.9: capped
    with torch.no_grad():
        model.weight.fill_(0.0)
    start = EMA(model, 0.99, warmup=True)
    with torch.no_grad():
        model.weight.fill_(10.0)
    start.update(model)
    assert start.shadow[0].item() == pytest.approx(9.0)  # 0.1 * 0 + 0.9 * 10


def test_only_trainable_parameters_are_tracked_and_buffers_copied() -> None:
    model = small()
    ema = EMA(model, decay=0.9)
    assert ema.param_names == ["fc.weight", "fc.bias", "bn.weight", "bn.bias"]
    assert ema.buffer_names == ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
    model.train()
    model(torch.randn(8, 4))  # moves the running statistics
    ema.update(model)
    for name, copy_ in zip(ema.buffer_names, ema.buffers):
        assert torch.equal(copy_, dict(model.named_buffers())[name]), name  # copied, not averaged
    assert set(ema.state_dict()["params"]) == set(ema.param_names)


def test_tracks_what_locking_leaves_trainable(backends) -> None:
    torch.manual_seed(0)
    model = build_model(backends["composed"])
    apply_locking(model, FinetuneConfig(lock_image=True))
    ema = EMA(model, decay=0.99)
    assert ema.param_names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert ema.param_names and not any(model.tower_of(n) == "image" for n in ema.param_names)


def test_applied_swaps_in_ema_weights_and_restores_raw_exactly() -> None:
    model = small()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ema = EMA(model, decay=0.8)
    sgd_steps(model, opt, ema, range(3))
    raw = copy.deepcopy(model.state_dict())
    with ema.applied(model) as inside:
        assert inside is model
        params = dict(model.named_parameters())
        for name, shadow in zip(ema.param_names, ema.shadow):
            assert torch.equal(params[name], shadow)
        assert not torch.equal(params["fc.weight"], raw["fc.weight"])
        assert torch.equal(params["frozen.weight"], raw["frozen.weight"])  # untracked: untouched
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, raw[name]), name
    with pytest.raises(RuntimeError), ema.applied(model):
        raise RuntimeError("evaluation failed")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, raw[name]), name


def test_applied_on_a_clip_model_gives_copy_to_embeddings(backends) -> None:
    torch.manual_seed(0)
    model = build_model(backends["openclip-vit"]).eval()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ema.update(model)
    tokens = model.tokenize(CAPTIONS)
    with torch.no_grad():
        raw = model.encode_text(tokens)
        with ema.applied(model):
            averaged = model.encode_text(tokens)
        twin = copy.deepcopy(model)
        ema.copy_to(twin)
        assert torch.equal(averaged, twin.encode_text(tokens))
        assert torch.equal(raw, model.encode_text(tokens))
        assert not torch.equal(raw, averaged)


def test_state_dict_round_trip() -> None:
    model = small()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ema = EMA(model, decay=0.9, warmup=True)
    sgd_steps(model, opt, ema, range(3))
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    other = EMA(small(seed=1), decay=0.5)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert (other.decay, other.warmup, other.num_updates) == (0.9, True, 3)
    for a, b in zip(ema.shadow + ema.buffers, other.shadow + other.buffers):
        assert torch.equal(a, b)
    unlocked = small()
    unlocked.frozen.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable parameters"):
        EMA(unlocked, 0.9).load_state_dict(ema.state_dict())


def test_resumed_sequence_equals_uninterrupted() -> None:
    def setup(seed: int) -> tuple[Small, torch.optim.Optimizer, EMA]:
        model = small(seed)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        return model, opt, EMA(model, decay=0.9, warmup=True)

    model, opt, ema = setup(0)
    sgd_steps(model, opt, ema, range(6))

    first, opt1, ema1 = setup(0)
    sgd_steps(first, opt1, ema1, range(3))
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "ema": ema1.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed, opt2, ema2 = setup(1)  # different initial weights: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    ema2.load_state_dict(checkpoint["ema"])
    sgd_steps(resumed, opt2, ema2, range(3, 6))

    assert ema2.num_updates == ema.num_updates == 6
    for a, b in zip(ema.shadow + ema.buffers, ema2.shadow + ema2.buffers):
        assert torch.equal(a, b)


def test_low_precision_model_keeps_float32_shadow() -> None:
    model = small().to(torch.bfloat16)
    ema = EMA(model, decay=0.999)
    assert all(t.dtype == torch.float32 for t in ema.shadow)
    before = ema.shadow[0].clone()
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    ema.update(model)
    # a 0.001 step is visible in float32, though below bf16's resolution near 1
    torch.testing.assert_close(ema.shadow[0] - before, torch.full_like(before, 0.001), rtol=0, atol=2e-5)
    with ema.applied(model):
        assert model.fc.weight.dtype == torch.bfloat16


def test_bad_decay() -> None:
    with pytest.raises(ValueError, match="decay"):
        EMA(small(), decay=1.5)
