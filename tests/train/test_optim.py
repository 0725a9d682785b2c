"""optim.optimizer and optim.warmup_epochs: each optimizer takes the per-group lr and weight decay, SGD's first step
is the hand-computed one, and warm-up in epochs is the same schedule as its count of steps."""

import pytest
import torch
from torch import nn

from cliptune.config import OptimConfig, build
from cliptune.models.base import ClipModel
from cliptune.train.optim import OPTIMIZERS, build_optimizer, build_scheduler, lr_factor, warmup_steps


class Tiny(ClipModel):
    """A stand-in model: one linear layer, all of it the image tower."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 3)

    def tower_of(self, name: str) -> str:
        return "image"

    def tower_modules(self, tower: str) -> list[nn.Module]:
        return [self.proj] if tower == "image" else []


def _step(model: Tiny, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model.proj(torch.ones(2, 4)).pow(2).sum().backward()
    optimizer.step()


def test_sgd_first_step_is_momentum_sgd_with_l2_on_weights_only():
    model = Tiny()
    cfg = OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.01)
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.SGD)
    weight, bias = model.proj.weight.detach().clone(), model.proj.bias.detach().clone()
    _step(model, optimizer)
    out = torch.ones(2, 4) @ weight.T + bias
    grad_w, grad_b = (2 * out).T @ torch.ones(2, 4), (2 * out).sum(0)
    # first step: the momentum buffer is the gradient itself; decay is added to the weight's gradient, not the bias'
    torch.testing.assert_close(model.proj.weight.detach(), weight - 0.1 * (grad_w + 0.01 * weight))
    torch.testing.assert_close(model.proj.bias.detach(), bias - 0.1 * grad_b)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_trains_with_the_groups_lr_and_decay(name):
    model = Tiny()
    optimizer = build_optimizer(model, OptimConfig(optimizer=name, lr=0.01, weight_decay=0.1))
    before = model.proj.weight.detach().clone()
    _step(model, optimizer)
    assert not torch.equal(model.proj.weight, before)
    decays = sorted(group["weight_decay"] for group in optimizer.param_groups)
    assert decays == [0.0, 0.1] and all(group["lr"] == 0.01 for group in optimizer.param_groups)


def test_warmup_in_epochs_is_the_same_schedule_as_its_steps():
    cfg = OptimConfig(warmup_epochs=1.5, warmup_steps=99)
    assert warmup_steps(cfg, steps_per_epoch=10) == 15 and warmup_steps(OptimConfig(), 10) == 10
    model = Tiny()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=40, steps_per_epoch=10)
    factors = []
    for _ in range(40):
        factors.append(scheduler.get_last_lr()[0] / cfg.lr)
        optimizer.step()
        scheduler.step()
    assert factors == pytest.approx([lr_factor(s, 15, 40, "cosine") for s in range(40)])
    assert factors[14] == pytest.approx(1.0) and factors[13] < 1.0


def test_warmup_epochs_must_not_be_negative():
    with pytest.raises(ValueError, match=r"optim.warmup_epochs"):
        build({"optim": {"warmup_epochs": -1}})


def _gradient_step(model: Tiny, optimizer: torch.optim.Optimizer, grads: tuple[torch.Tensor, torch.Tensor]) -> None:
    model.proj.weight.grad, model.proj.bias.grad = (g.clone() for g in grads)
    optimizer.step()


@pytest.mark.parametrize(("name", "reference"), [("lamb", "Lamb"), ("lion", "Lion")])
def test_timm_optimizers_step_exactly_as_timm_on_the_same_groups(name, reference, tmp_path):
    """LAMB / Lion: three steps equal timm's optimizer built directly over the same groups and hyper-parameters
    (timm's defaults otherwise), and a state saved after the first step and read back continues bit for bit. The
    later gradients point partly against the first, so every beta shows (Lion's update is only a sign)."""
    import timm.optim

    from cliptune.train.checkpoint import read_state, write_state

    generator = torch.Generator().manual_seed(0)
    first = (torch.randn(3, 4, generator=generator), torch.randn(3, generator=generator))
    grads = [first] + [tuple(-0.15 * g * (0.5 + torch.rand(g.shape, generator=generator)) for g in first)] * 2
    cfg = OptimConfig(optimizer=name, lr=0.01, weight_decay=0.1, beta1=0.8, beta2=0.95, eps=1e-5)
    ours, theirs, resumed = Tiny(), Tiny(), Tiny()
    optimizer = build_optimizer(ours, cfg)
    assert type(optimizer) is getattr(timm.optim, reference)
    kwargs = {"lr": 0.01, "betas": (0.8, 0.95), **({"eps": 1e-5} if name == "lamb" else {})}
    groups = [
        {"params": [theirs.proj.weight], "weight_decay": 0.1},
        {"params": [theirs.proj.bias], "weight_decay": 0.0},
    ]
    direct = getattr(timm.optim, reference)(groups, **kwargs)
    _gradient_step(ours, optimizer, grads[0])
    _gradient_step(theirs, direct, grads[0])
    write_state(tmp_path, {"epoch": 0, "step": 1, "rng": {}, "optimizer": optimizer.state_dict()})
    resumed.load_state_dict(ours.state_dict())
    again = build_optimizer(resumed, cfg)
    again.load_state_dict(read_state(tmp_path)["optimizer"])
    before = ours.proj.weight.detach().clone()
    for model, opt in ((ours, optimizer), (theirs, direct), (resumed, again)):
        for step_grads in grads[1:]:
            _gradient_step(model, opt, step_grads)
    assert not torch.equal(ours.proj.weight, before)
    for model in (theirs, resumed):
        assert torch.equal(ours.proj.weight, model.proj.weight) and torch.equal(ours.proj.bias, model.proj.bias)
