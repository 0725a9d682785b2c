"""Contrastive batches larger than memory: the gradient-cache method (GradCache, Gao et al. 2021).

A contrastive loss couples every sample of the batch, so a large batch cannot simply be split into accumulated
sub-batches. `chunked_backward` computes exactly the full-batch gradient with the memory of one chunk:

1. pass 1: encode the images and the texts chunk by chunk under `torch.no_grad()`, recording the RNG state before
   each chunk, and keep only the features;
2. compute the loss ONCE on the whole batch of features (detached leaf copies) and back-propagate it as far as the
   features: d loss / d features is cached, and the gradient of `logit_scale` (and of anything else the loss
   reads) is accumulated once;
3. pass 2: for each chunk, restore its RNG state, recompute its features with autograd on and back-propagate the
   cached gradient through them (`torch.autograd.backward(features, cached_grad)`); the parameter gradients add up to
   the full-batch ones.

Restoring the RNG makes dropout draw the same masks in pass 2 as in pass 1, so the recomputed features are the ones
the loss saw. open_clip's `--accum-freq` neither restores it (with dropout its cached and recomputed features differ)
nor counts the `logit_scale` gradient once (it is `accum_freq` times too large), and it all-reduces on every sub-step;
with DDP, pass `no_sync=ddp.no_sync` here and only the last chunk synchronises.

How the trainer calls it (`cliptune.train.loop._chunked`; the optimizer step and `zero_grad` stay in the trainer,
as do gradient clipping, the scheduler, the `logit_scale` clamp and EMA): the encoders go through the trainer's
forward module (cached trunks, locked towers, DDP), the loss is the run's objective on the whole batch's features
(`Objective`, with the batch's group ids or negative mask), and only trainable towers are listed in `towers`.

`forward_context` is entered around every encoder call of both passes but not around the loss, as `train_step`
runs the encoders under autocast and the loss outside it. Under bf16 autocast the features (and so the leaf copies
the loss differentiates) keep whatever dtype the encoders return; each cached gradient is cast to its recomputed
chunk's dtype before it is back-propagated.

BatchNorm in training mode normalises each chunk by that chunk's statistics (a property of chunking, not of this
method); the running statistics are updated by pass 1 only: pass 2 puts them back after each recomputation.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from cliptune.models.base import ENCODERS, ClipModel, Tower

Encoder = Callable[[torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (image, text, logit_scale) -> loss
ContextFactory = Callable[[], AbstractContextManager]


class _RngState:
    """The CPU generator's state and the default generators' states of the given CUDA devices.

    Dropout draws from the default generator of the device its tensor lives on (`torch.get_rng_state` for CPU
    tensors; per-device `torch.cuda.get_rng_state`, a Philox seed and offset, for CUDA ones), so restoring these
    reproduces its masks exactly. `torch.random.fork_rng` saves and restores the same states around a block; here the
    state must be taken at one point and restored at another, hence the explicit capture.
    """

    def __init__(self, cpu: torch.Tensor, cuda: dict[int, torch.Tensor]) -> None:
        self.cpu, self.cuda = cpu, cuda

    @classmethod
    def capture(cls, cuda_devices: Iterable[int]) -> _RngState:
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in cuda_devices})

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)


def _cuda_devices(model: nn.Module, *tensors: torch.Tensor) -> list[int]:
    """CUDA devices the encoders may draw random numbers on: those of the inputs and of the model's parameters."""
    devices = {t.device for t in tensors} | {p.device for p in model.parameters()}
    return sorted(d.index if d.index is not None else torch.cuda.current_device() for d in devices if d.type == "cuda")


class _RunningStats:
    """The running statistics of the BatchNorm layers that a training-mode forward updates."""

    def __init__(self, model: nn.Module) -> None:
        self.norms = [
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
        ]
        self.saved: list[list[torch.Tensor | None]] = []

    def save(self) -> None:
        self.saved = [[_clone(b) for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in self.norms]

    def restore(self) -> None:
        with torch.no_grad():
            for m, saved in zip(self.norms, self.saved):
                for buffer, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved):
                    if buffer is not None and value is not None:
                        buffer.copy_(value)


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


def _chunk_sizes(chunk_size: int | tuple[int, int]) -> tuple[int, int]:
    sizes = (chunk_size, chunk_size) if isinstance(chunk_size, int) else chunk_size
    if (
        not isinstance(sizes, tuple | list)
        or len(sizes) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)
    ):
        raise ValueError(f"chunk_size must be a positive int or a pair of them (images, texts), got {chunk_size!r}")
    return sizes[0], sizes[1]


def chunked_backward(
    model: ClipModel,
    images: torch.Tensor,
    tokens: torch.Tensor,
    loss_fn: LossFn,
    chunk_size: int | tuple[int, int],
    encode_image: Encoder | None = None,
    encode_text: Encoder | None = None,
    no_sync: ContextFactory | None = None,
    *,
    forward_context: ContextFactory | None = None,
    towers: Collection[Tower] = ENCODERS,
) -> torch.Tensor:
    """Accumulate into the parameters' `.grad` the gradient of `loss_fn` over the whole batch, one chunk at a time.

    The result equals `loss.backward()` on the full batch (the loss `loss_fn(image_features, text_features,
    model.logit_scale.float())`), up to float rounding, with dropout on as well: each chunk's RNG state is
    replayed, so the loss and the gradients are those of the same random forward. Like `backward()`, it adds to
    existing gradients: zero them before, step the optimizer after, in the caller.

    Args:
        model: the (unwrapped) model; its `logit_scale` goes to the loss, and its encoders are the defaults.
        images, tokens: the whole batch of encoder inputs (raw, or cached trunk outputs if the encoders take those).
        loss_fn: `loss(image_features, text_features, logit_scale)` on the full batch, e.g. `clip_loss`.
        chunk_size: at most this many samples go through an encoder at once; a pair sets it for images and
            texts separately (the towers are chunked independently). It need not divide the batch.
        encode_image, encode_text: inputs -> features; default: `model.encode_image` / `model.encode_text`
            (normalised). Any callable works, e.g. heads over cached trunk features.
        no_sync: a context factory (DDP's `ddp_model.no_sync`) entered around the forward and the backward of every
            recomputed chunk except the last, so gradients are all-reduced once, on the last chunk's backward. DDP
            only arms its reducer in its own `forward`, and the last chunk's graph reaches one tower only: the
            encoders must run through the DDP wrapper, and the wrapper needs `find_unused_parameters=True` (DDP
            counts a parameter used in any no_sync chunk as used, so the other tower's and `logit_scale`'s
            gradients are all-reduced too; without it DDP raises "Expected to have finished reduction" on the next
            step). The last chunk must really back-propagate: list only trainable towers in `towers`.
        forward_context: a context factory entered around every encoder call, in both passes, but not around the
            loss (e.g. `lambda: autocast(device, "bf16")`).
        towers: the towers to back-propagate into. Leave a fully locked tower out: its features are then encoded
            once, in pass 1, and never recomputed (otherwise it is recomputed for nothing).

    Returns:
        The full-batch loss, detached. If it is not finite, no gradient is computed: the caller should raise.
    """
    encoders: dict[Tower, Encoder] = {
        "image": encode_image or model.encode_image,
        "text": encode_text or model.encode_text,
    }
    inputs: dict[Tower, torch.Tensor] = {"image": images, "text": tokens}
    sizes = dict(zip(ENCODERS, _chunk_sizes(chunk_size)))
    unknown = set(towers) - set(inputs)
    if unknown:
        raise ValueError(f"towers: {sorted(unknown)} unknown; choose among 'image' and 'text'")
    chunks = {tower: inputs[tower].split(sizes[tower]) for tower in inputs}
    context = forward_context or nullcontext
    devices = _cuda_devices(model, images, tokens) if torch.cuda.is_available() else []

    # Pass 1: features without a graph, and the RNG state each chunk started from.
    states: dict[Tower, list[_RngState]] = {"image": [], "text": []}
    features: dict[Tower, torch.Tensor] = {}
    with torch.no_grad():
        for tower in inputs:
            parts = []
            for chunk in chunks[tower]:
                states[tower].append(_RngState.capture(devices))
                with context():
                    parts.append(encoders[tower](chunk))
            features[tower] = torch.cat(parts)
    after_pass_1 = _RngState.capture(devices)
    running_stats = _RunningStats(model)
    running_stats.save()

    # The loss once, on the whole batch: d loss / d features is cached, logit_scale's gradient accumulated once.
    leaves = {tower: f.detach().requires_grad_(tower in towers) for tower, f in features.items()}
    loss = loss_fn(leaves["image"], leaves["text"], model.logit_scale.float())
    if not torch.isfinite(loss):
        return loss.detach()
    if loss.requires_grad:
        loss.backward()

    # Pass 2: each chunk recomputed from its own RNG state, back-propagating its slice of the cached gradient.
    # A tower whose features the loss does not read (no gradient) is skipped.
    grads = {tower: leaf.grad.split(sizes[tower]) for tower, leaf in leaves.items() if leaf.grad is not None}
    jobs = [(tower, i) for tower in grads for i in range(len(chunks[tower]))]
    try:
        for n, (tower, i) in enumerate(jobs):
            grad = grads[tower][i]
            states[tower][i].restore()
            with no_sync() if no_sync is not None and n < len(jobs) - 1 else nullcontext():
                with context():
                    recomputed = encoders[tower](chunks[tower][i])
                if recomputed.requires_grad:
                    torch.autograd.backward(recomputed, grad.to(recomputed.dtype))
            running_stats.restore()
    finally:
        after_pass_1.restore()  # the RNG goes on as if the batch had been encoded once
    return loss.detach()


__all__ = ["chunked_backward"]
