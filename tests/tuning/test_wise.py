"""Tests of WiSE-FT weight interpolation (cliptune.tuning.wise): exact ends, midpoint, sweep, report, export."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import cliptune
from cliptune.config import FinetuneConfig
from cliptune.models import ClipModel, build_model, save_model
from cliptune.tuning.locking import apply_locking
from cliptune.tuning.wise import (
    DEFAULT_ALPHAS,
    INITIAL_FILE,
    export_alpha,
    initial_state,
    interpolate,
    load_initial,
    plot_sweep,
    save_initial,
    sweep,
    sweep_markdown,
)
from tests.helpers import CAPTIONS

BACKENDS = ["openclip-vit", "composed"]


def fine_tune(model: ClipModel, seed: int = 1) -> ClipModel:
    """A 'fine-tuned' copy: every trainable weight and every buffer moved, integer counters included."""
    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        for name, b in tuned.named_buffers():
            if name.endswith("running_var"):
                b.mul_(1.5)
            elif b.is_floating_point() and name in tuned.state_dict():
                b.add_(0.1)
            elif name.endswith("num_batches_tracked"):  # integer ids (BERT's token_type_ids) must stay valid
                b.add_(7)
    return tuned


def embeddings(model: ClipModel) -> tuple[torch.Tensor, torch.Tensor]:
    # 32 px: the tiny ViT's input size, and small enough for the composed ResNet to run fast on a shared CPU
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(model.tokenize(CAPTIONS))


def same_embeddings(a: ClipModel, b: ClipModel) -> bool:
    return all(torch.equal(x, y) for x, y in zip(embeddings(a), embeddings(b)))


def loaded(model: ClipModel, state: dict[str, torch.Tensor]) -> ClipModel:
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    return twin


@pytest.fixture(scope="module", params=BACKENDS)
def pair(request, backends) -> tuple[ClipModel, ClipModel]:
    """(initial, fine-tuned) models of one backend."""
    torch.manual_seed(0)
    start = build_model(backends[request.param]).eval()
    return start, fine_tune(start)


# ---------------------------------------------------------------------------------------------------------------
# interpolate


def test_ends_reproduce_initial_and_finetuned_exactly(pair) -> None:
    start, tuned = pair
    initial = initial_state(start)
    at_zero = loaded(tuned, interpolate(initial, tuned.state_dict(), 0.0))
    at_one = loaded(tuned, interpolate(initial, tuned.state_dict(), 1.0))
    assert same_embeddings(at_zero, start) and same_embeddings(at_one, tuned)
    assert not same_embeddings(start, tuned)
    for name, tensor in at_zero.state_dict().items():
        expected = start.state_dict()[name] if tensor.is_floating_point() else tuned.state_dict()[name]
        assert torch.equal(tensor, expected), name


def test_midpoint_and_non_float_buffers(pair) -> None:
    start, tuned = pair
    mixed = interpolate(initial_state(start), tuned.state_dict(), 0.5)
    a, b = start.state_dict(), tuned.state_dict()
    assert set(mixed) == set(b)
    for name, tensor in mixed.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, (a[name] + b[name]) / 2)
        else:
            assert torch.equal(tensor, b[name]) and not torch.equal(tensor, a[name]), name


def test_initial_state_skips_frozen_parameters(backends) -> None:
    torch.manual_seed(0)
    model = build_model(backends["composed"])
    apply_locking(model, FinetuneConfig(lock_image=True))
    initial = initial_state(model)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    buffers = set(model.state_dict()) - set(params)
    assert set(initial) == trainable | buffers
    assert any("running_mean" in n for n in initial)
    assert all(t.device.type == "cpu" for t in initial.values())
    # frozen weights come from the fine-tuned state unchanged
    tuned = fine_tune(model)
    mixed = interpolate(initial, tuned.state_dict(), 0.3)
    frozen = next(n for n, p in params.items() if not p.requires_grad)
    assert torch.equal(mixed[frozen], tuned.state_dict()[frozen])


@pytest.mark.parametrize("alpha", [-0.1, 1.01, float("nan")])
def test_alpha_out_of_range(alpha: float) -> None:
    w = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="alpha"):
        interpolate(w, w, alpha)


def test_unchanged_tensors_stay_exact() -> None:
    # (1 - a) * x + a * x can round away from x; a locked tower's buffers must not drift
    x = torch.tensor([0.1, 1 / 3, 7.3, float("-inf")])
    assert torch.equal(interpolate({"x": x}, {"x": x.clone()}, 0.3)["x"], x)


def test_mismatched_states() -> None:
    with pytest.raises(ValueError, match="lacks"):
        interpolate({"extra": torch.ones(1)}, {"w": torch.ones(1)}, 0.5)
    with pytest.raises(ValueError, match="shape"):
        interpolate({"w": torch.ones(2)}, {"w": torch.ones(3)}, 0.5)


def test_save_and_load_initial(pair, tmp_path: Path) -> None:
    start, _ = pair
    path = save_initial(start, tmp_path / INITIAL_FILE)
    back = load_initial(path)
    expected = initial_state(start)
    assert set(back) == set(expected) and all(torch.equal(back[k], expected[k]) for k in back)


# ---------------------------------------------------------------------------------------------------------------
# sweep and report


def test_sweep_evaluates_each_alpha_and_restores_finetuned(pair) -> None:
    start, tuned = pair
    model = copy.deepcopy(tuned)
    finetuned_state = copy.deepcopy(tuned.state_dict())
    name = next(n for n, p in model.named_parameters() if p.requires_grad)
    a, b = start.state_dict()[name], finetuned_state[name]

    def evaluate(m: ClipModel) -> dict[str, dict[str, float]]:
        # where the weight sits between its two ends: 0 at initial, 1 at fine-tuned
        where = ((m.state_dict()[name] - a).sum() / (b - a).sum()).item()
        return {"val": {"mean_recall": where}}

    results = sweep(model, initial_state(start), DEFAULT_ALPHAS, evaluate)
    assert list(results) == list(DEFAULT_ALPHAS)
    for alpha, values in results.items():
        assert values["val"]["mean_recall"] == pytest.approx(alpha, abs=1e-4)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, finetuned_state[key]), key
    assert same_embeddings(model, tuned)


def test_sweep_restores_after_a_failed_evaluation(pair) -> None:
    start, tuned = pair
    model = copy.deepcopy(tuned)

    def evaluate(m: ClipModel) -> dict[str, dict[str, float]]:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        sweep(model, initial_state(start), [0.5], evaluate)
    assert same_embeddings(model, tuned)
    with pytest.raises(ValueError, match="alpha"):
        sweep(model, initial_state(start), [0.5, 2.0], evaluate)  # checked before anything runs


def test_plot_and_markdown(tmp_path: Path) -> None:
    results = {
        alpha: {
            "coco": {"i2t_R@1": 1.0, "mean_recall": 50 + 10 * alpha - 12 * alpha**2},
            "pets": {"acc1": 80 - 20 * alpha, "acc5": 99.0},
        }
        for alpha in (0.0, 0.5, 1.0)
    }
    png = plot_sweep(results, tmp_path / "wise.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = sweep_markdown(results)
    lines = table.strip().splitlines()
    assert lines[0] == "| alpha | coco | pets |"
    assert lines[2] == "| 0 | 50.00 | **80.00** |"
    assert lines[3] == "| 0.5 | **52.00** | 70.00 |"
    assert lines[4] == "| 1 | 48.00 | 60.00 |"


# ---------------------------------------------------------------------------------------------------------------
# export


def fake_run(start: ClipModel, run_dir: Path) -> ClipModel:
    """A run directory as the trainer leaves it: initial weights at the start, the final model at the end."""
    save_initial(start, run_dir / INITIAL_FILE)
    tuned = fine_tune(start, seed=2)
    save_model(tuned, run_dir / "model")
    return tuned


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_round_trip(backends, backend: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    start = build_model(backends[backend]).eval()
    if backend == "composed":
        apply_locking(start, FinetuneConfig(lock_image=True))  # frozen weights are not in initial.safetensors
    tuned = fake_run(start, tmp_path / "run")
    for alpha, expected in ((0.0, start), (1.0, tuned)):
        out = export_alpha(tmp_path / "run", alpha, tmp_path / f"alpha{alpha}")
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "run" / "model").iterdir())
        # cliptune.load, what a user calls, reads the export as an ordinary model
        assert same_embeddings(cliptune.load(out, device="cpu").model, expected)


def test_export_needs_initial_weights_and_final_model(backends, tmp_path: Path) -> None:
    torch.manual_seed(0)
    start = build_model(backends["openclip-vit"])
    save_model(start, tmp_path / "old" / "model")
    with pytest.raises(ValueError, match=r"initial\.safetensors"):
        export_alpha(tmp_path / "old", 0.5, tmp_path / "out")
    save_initial(start, tmp_path / "interrupted" / INITIAL_FILE)
    with pytest.raises(ValueError, match="interrupted"):
        export_alpha(tmp_path / "interrupted", 0.5, tmp_path / "out")
    assert not (tmp_path / "out").exists()
