"""CONTRIBUTING.md's three worked examples, run exactly as written there, from outside the package.

Each example's code block becomes a module of its own in a temporary folder (no cliptune file is edited), registers
itself in cliptune's table on import, and then trains through the public API: a backend, a loss and a strategy,
each for one step. The registries are restored afterwards, so other tests never see the additions.
"""

import copy
import csv
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cliptune
from cliptune.config import ModelConfig
from cliptune.losses import OBJECTIVES
from cliptune.models import BACKENDS, build_model
from cliptune.train.logging import step_losses
from cliptune.tuning.strategies import STRATEGIES
from tests.helpers import ROOT, tiny_run

GUIDE = ROOT / "CONTRIBUTING.md"
SECTIONS = {"backend": "## Add a backend", "loss": "## Add a loss", "strategy": "## Add a strategy"}


def example(kind: str) -> str:
    """The python code block of one section of the guide."""
    text = GUIDE.read_text()
    start = text.index(SECTIONS[kind])
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)
    assert len(blocks) == 1, f"the {kind} section should hold one python example"
    return blocks[0]


@pytest.fixture
def registries():
    """Snapshots of the three tables, restored after the test whatever the examples added."""
    saved = [(table, copy.copy(table)) for table in (BACKENDS, OBJECTIVES, STRATEGIES)]
    yield
    for table, before in saved:
        table.clear()
        table.update(before)


def load_example(kind: str, folder: Path):
    """Import the example as the module `ext_<kind>` from `folder`, as a user's own package would be."""
    path = folder / f"ext_{kind}.py"
    path.write_text(example(kind))
    spec = importlib.util.spec_from_file_location(f"ext_{kind}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pickling-free, but some libraries look modules up by name
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def one_step_table(shapes: Path, out: Path, rows: int = 8) -> Path:
    """The first `rows` shapes images as a table: with batch_size `rows`, one epoch is one step."""
    with (shapes / "train.csv").open() as f:
        kept = list(csv.DictReader(f))[:rows]
    table = out / "one-step.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows({"image": str(shapes / r["image"]), "caption": r["caption"]} for r in kept)
    return table


def train(shapes: Path, out: Path, **sections) -> Path:
    cfg = tiny_run(
        shapes,
        out,
        "ext",
        data={"train": {"path": str(one_step_table(shapes, out))}},
        train={"batch_size": 8},
        optim={"lr": 1e-2},
        runtime={"log_every": 1},
    )
    results = cliptune.finetune(cliptune.config.merge(cfg, sections))
    assert results["run"]["steps"] == 1
    run = Path(results["run_dir"])
    losses = step_losses(run)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses)).all()
    return run


def test_the_guide_claims_one_module_plus_one_registry_line():
    for kind, table in (("backend", "BACKENDS"), ("loss", "OBJECTIVES"), ("strategy", "STRATEGIES")):
        code = example(kind)
        assert len(re.findall(rf"^{table}\[", code, re.M)) == 1, f"the {kind} example registers once in {table}"
        code = re.sub(r"#[^\n]*", "", re.sub(r"^from cliptune[^\n]*$", "", code, flags=re.M))
        assert "cliptune" not in code, f"the {kind} example uses cliptune through its imports only"


def test_a_backend_from_outside_trains_saves_and_loads(shapes, tmp_path, registries):
    ext = load_example("backend", tmp_path)
    run = train(shapes, tmp_path, model={"backend": "bow"})
    model = cliptune.load(run).model  # rebuilt through BACKENDS from the saved spec
    assert isinstance(model, ext.BagOfWordsClip) and model.spec() == {"backend": "bow", "dim": 16, "vocab": 97}
    initial = load_file(str(run / "initial.safetensors"))
    assert not torch.equal(initial["image.1.weight"], model.image[1].weight.detach().cpu())  # it trained


def test_a_loss_from_outside_trains_with_its_own_parameter(shapes, tmp_path, registries):
    ext = load_example("loss", tmp_path)
    calls = []
    spec = OBJECTIVES["margin"]
    OBJECTIVES["margin"] = spec.__class__(lambda *a: calls.append(1) or ext.margin_loss(*a), parameters=ext.margin)
    train(shapes, tmp_path, loss={"name": "margin"})
    assert calls == [1]
    from cliptune.train.setup import build_trainer

    cfg = tiny_run(shapes, tmp_path, "ext-groups", data={"train": {"path": str(one_step_table(shapes, tmp_path))}})
    trainer = build_trainer(cliptune.api.resolve_config(cfg, loss={"name": "margin"}))
    shared = [g for g in trainer.optimizer.param_groups if "margin" in g["names"]]
    assert len(shared) == 1 and shared[0]["tower"] == "shared" and shared[0]["weight_decay"] == 0.0


def test_a_strategy_from_outside_changes_what_trains(shapes, tmp_path, registries):
    load_example("strategy", tmp_path)
    run = train(shapes, tmp_path)
    torch.manual_seed(0)  # the run's seed: the same random initial model
    before = build_model(ModelConfig(arch="cliptune-tiny-vit")).state_dict()
    final = load_file(str(run / "model" / "model.safetensors"))
    frozen = ["model.token_embedding.weight", "model.positional_embedding"]
    assert all(torch.equal(before[k], final[k]) for k in frozen)
    assert not torch.equal(before["model.ln_final.weight"], final["model.ln_final.weight"])  # the rest trains
    assert not torch.equal(before["model.visual.positional_embedding"], final["model.visual.positional_embedding"])
    assert not any(k in frozen for k in load_file(str(run / "initial.safetensors")))  # frozen before it was recorded
