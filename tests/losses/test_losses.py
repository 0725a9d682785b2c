"""The CLIP loss agrees with open_clip's own ClipLoss, including the clamp of the inverse temperature."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from cliptune.losses import OBJECTIVES, clip_loss


@pytest.mark.parametrize("log_scale", [0.0, math.log(1 / 0.07), math.log(100.0), 6.0])
@pytest.mark.parametrize("batch", [2, 7, 32])
def test_matches_open_clip(batch, log_scale):
    g = torch.Generator().manual_seed(batch)
    img = F.normalize(torch.randn(batch, 16, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(batch, 16, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(log_scale, dtype=torch.float64)
    ours = clip_loss(img, txt, scale)
    theirs = ClipLoss()(img, txt, scale.exp().clamp(max=100.0))
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)


def test_gradients_match_open_clip():
    g = torch.Generator().manual_seed(0)
    base_img, base_txt = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    grads = []
    for fn in (lambda i, t, s: clip_loss(i, t, s), lambda i, t, s: ClipLoss()(i, t, s.exp())):
        img, txt = base_img.clone().requires_grad_(), base_txt.clone().requires_grad_()
        s = torch.tensor(2.0, requires_grad=True)
        fn(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), s).backward()
        grads.append((img.grad, txt.grad, s.grad))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_clamp_stops_the_temperature_gradient_above_100():
    s = torch.tensor(6.0, requires_grad=True)
    img = F.normalize(torch.randn(4, 8), dim=-1)
    clip_loss(img, img.flip(0), s).backward()
    assert s.grad == 0


def test_perfect_alignment_gives_low_loss_and_the_name_table():
    eye = torch.eye(5)
    assert clip_loss(eye, eye, torch.tensor(math.log(100.0))).item() < 1e-3
    assert OBJECTIVES["clip"].uses_text and not OBJECTIVES["clip"].negatives
