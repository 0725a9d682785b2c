"""The package's shape, checked: one list per set of names, dependencies pointing down, library knowledge in models/."""

import argparse
import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cliptune import config
from cliptune.data import negatives
from cliptune.losses import OBJECTIVES
from cliptune.models import BACKENDS, WRAPPERS, composed, heads

SRC = Path(config.__file__).parent


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def test_config_choices_are_the_registries():
    assert config.choices_of(_field(config.ModelConfig, "backend")) == tuple(BACKENDS)
    assert config.choices_of(_field(config.LossConfig, "name")) == tuple(OBJECTIVES)
    assert config.choices_of(_field(config.FinetuneConfig, "heads")) == ("none", *heads.HEADS)
    # fixed lists that a test keeps equal to their owner's
    assert config.choices_of(_field(config.ModelConfig, "head")) == tuple(composed.HEADS)
    assert config.choices_of(_field(config.LossConfig, "tagger")) == negatives.TAGGERS
    assert tuple(config.LossConfig().negative_kinds) == negatives.KINDS
    assert not set(WRAPPERS) & set(BACKENDS)  # wrappers are no backends one could build from a config


def test_cli_export_formats_are_the_export_table():
    from cliptune.cli import _parser
    from cliptune.export import FORMATS

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    export = sub.choices["export"]
    fmt = next(a for a in export._actions if a.dest == "format")
    assert tuple(fmt.choices) == tuple(FORMATS)


def test_an_unregistered_name_is_a_config_error_listing_the_registry():
    with pytest.raises(config.ConfigError, match=r"model\.backend: 'nope' is not allowed; choose one of openclip"):
        config.build({"model": {"backend": "nope"}})
    with pytest.raises(config.ConfigError, match=r"loss\.name: 'nope' is not allowed; choose one of clip, siglip"):
        config.build({"loss": {"name": "nope"}})


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({}, "no training data configured"),
        ({"data": {"train": "x.csv"}, "loss": {"name": "ce"}}, "data.labelled"),
        ({"data": {"train": "x.csv"}, "loss": {"name": "fsc"}, "train": {"chunk_size": 4}}, "train.chunk_size"),
        ({"data": {"shards": "x"}, "loss": {"name": "unicl"}}, "data.shards"),
    ],
)
def test_cross_field_errors_come_from_config_validation(sections, message):
    """Reported by `config.check_training` from the config alone: no model, file or data is touched."""
    with pytest.raises(config.ConfigError, match=message):
        config.check_training(config.build(sections))


def _imports(path: Path) -> set[str]:
    """The modules a file imports, at module level or inside a function (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "cliptune":  # `from cliptune import api`: each name is a part of cliptune
                found.update(f"cliptune.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _registries(path: Path) -> set[str]:
    """The modules a file names as a registry (`"cliptune.models:BACKENDS"`): imported by name when it is read."""
    strings = (n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant))
    return {s.partition(":")[0] for s in strings if isinstance(s, str) and re.fullmatch(r"cliptune(\.\w+)+:\w+", s)}


@pytest.mark.parametrize("package", ["models", "data", "features", "losses", "tuning", "eval"])
def test_lower_packages_never_import_train(package):
    for path in (SRC / package).rglob("*.py"):
        assert not any(m.startswith("cliptune.train") for m in _imports(path)), path


# Every part of cliptune (sub-package or top-level module) from the bottom up: each imports (even lazily, inside a
# function, or by name) only the parts before it, so no two depend on each other; `__init__` is the package's own
# public API. Inference sits below training: loading a model never imports training code.
LAYERS = (
    *("utils", "metrics", "config"),
    *("models", "data", "features", "losses", "tuning", "eval"),
    *("export", "inference", "index", "train", "serve", "api", "cli", "__init__"),
)
# The references that still point up, each with its reason. Any other fails the test, and so does one of these once
# it is gone (then delete its line), so the list stays true.
KNOWN_UPWARD = {
    ("config", "models"): "choices of model.backend / finetune.heads come from their registries, model.preset's "
    "specs from models/presets.py",
    ("config", "losses"): "loss.name's choices and check_training's rules come from the objective table",
    ("config", "train"): "optim.optimizer's choices come from train/optim.py's table",
    ("export", "inference"): "export() takes a run directory or model spec (inference.load_any), while loading "
    "reads exported folders back (export.read_export)",
}


def _part(path: Path) -> str:
    """The part of cliptune a source file belongs to: its sub-package, or its module's name at the top level."""
    top = path.relative_to(SRC).parts[0]
    return top.removesuffix(".py")


def _part_imports(part: str) -> dict[str, set[str]]:
    """Each other part of cliptune that a file of `part` imports or names as a registry -> the files that do."""
    files = sorted((SRC / part).rglob("*.py")) if (SRC / part).is_dir() else [SRC / f"{part}.py"]
    found: dict[str, set[str]] = {}
    for path in files:
        for module in _imports(path) | _registries(path):
            parts = module.split(".")
            if parts[0] == "cliptune" and len(parts) > 1 and parts[1] != part:
                found.setdefault(parts[1], set()).add(str(path.relative_to(SRC)))
    return found


def _upward() -> dict[tuple[str, str], list[str]]:
    return {
        (part, other): sorted(files)
        for part in LAYERS
        for other, files in _part_imports(part).items()
        if other in LAYERS and LAYERS.index(other) >= LAYERS.index(part)
    }


def test_every_part_has_a_layer():
    parts = {_part(p) for p in SRC.glob("*.py")} | {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert parts == set(LAYERS)


def test_imports_are_absolute():
    """The import checks read absolute module names: a relative import would pass them unseen."""
    relative = {
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level
    }
    assert not relative


def test_parts_import_only_lower_parts():
    upward = _upward()
    new = {edge: files for edge, files in upward.items() if edge not in KNOWN_UPWARD}
    assert not new, f"imports of higher parts (each part may import only those before it in LAYERS): {new}"
    gone = set(KNOWN_UPWARD) - set(upward)
    assert not gone, f"no longer imported, delete from KNOWN_UPWARD: {sorted(gone)}"


def test_models_depend_on_no_other_package():
    """A backend is written against torch and its library alone: models/ reads only the config and utils."""
    assert set(_part_imports("models")) <= {"config", "utils"}


def test_tests_mirror_the_packages():
    """tests/<name>/ holds the tests of src/cliptune/<name>/ (benchmarks/: of the scripts there); each is a package."""
    tests = Path(__file__).parent
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    packages = {p.parent.name for p in SRC.glob("*/__init__.py")}
    assert folders - {"benchmarks"} <= packages
    assert all((tests / name / "__init__.py").is_file() for name in folders)


def test_import_check_sees_lazy_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text(
        "def f():\n    from cliptune.eval.zeroshot import evaluate_zeroshot\n    import cliptune.train\n"
        "    from cliptune import api\n    return table('cliptune.losses:OBJECTIVES')\n"
    )
    assert _imports(source) == {"cliptune.eval.zeroshot", "cliptune.train", "cliptune", "cliptune.api"}
    assert _registries(source) == {"cliptune.losses"}


@pytest.mark.parametrize("package", ["train", "tuning", "losses", "eval"])
def test_model_libraries_are_the_backends_business(package):
    """Training, tuning, losses and evaluation ask the model (its hooks), never open_clip, timm or transformers."""
    libraries = ("open_clip", "timm", "transformers", "efficientnet_lite_pytorch")
    for path in (SRC / package).rglob("*.py"):
        # timm.optim is optimizers, not models: the trainer builds LAMB / Lion from it (optim.optimizer).
        used = {m for m in _imports(path) if m.split(".")[0] in libraries and m != "timm.optim"}
        assert not used, f"{path.relative_to(SRC)} imports {used}"


def test_importing_the_lower_packages_loads_no_training_code():
    code = (
        "import sys, cliptune.models, cliptune.data, cliptune.losses, cliptune.eval, cliptune.tuning.strategies, "
        "cliptune.inference, cliptune.export, cliptune.index, "
        "cliptune.tuning.param_groups, cliptune.tuning.lora, cliptune.tuning.wise, cliptune.tuning.ema;"
        "print(sorted(m for m in sys.modules if m.startswith('cliptune.train')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
