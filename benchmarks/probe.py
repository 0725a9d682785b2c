"""Probe: hundreds of generated bad inputs through cliptune's Python API (and, with --slow, the CLI), each classified.

Every case is one input a user could get wrong (a config value, a YAML text, an override, a table, a model.json, a
checkpoint file, a command line). Its outcome is one of:
- clear: refused with a ValueError / FileNotFoundError (what the CLI turns into one message, exit code 2) whose
  message names the key, file or row;
- unclear: refused that way, but the message names none of them;
- warned: accepted with a warning that names the key or file;
- accepted: a legitimate input, accepted (cases marked legitimate or either-way);
- refused: a legitimate input refused;
- traceback: any other exception (the CLI would print a Python traceback);
- silent: a wrong input accepted without a word;
- hang: still running after the time limit.

Only public entry points that exist on every version are called (config.build / config.load,
data.read_caption_table, cliptune.load, cliptune.finetune, the `cliptune` command), so the same probe measures the
tree before and after a change:

    PYTHONPATH=src python benchmarks/probe.py                 # fast cases (also run by tests/benchmarks/test_probe.py)
    PYTHONPATH=src python benchmarks/probe.py --slow --write  # + checkpoints, NaN loss and CLI; into RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUTCOMES = ("clear", "warned", "accepted", "unclear", "refused", "traceback", "silent", "hang")
GOOD = ("clear", "warned", "accepted")
TIME_LIMIT_S = 60


@dataclass
class Case:
    id: str
    group: str
    run: Callable[[Path], Any]  # called with a scratch folder holding images/ (see `prepare`)
    mention: tuple[str, ...] = ()  # a clear message or warning names one of these
    bad: bool = True  # False: a legitimate input that must be accepted
    either: bool = False  # a clear refusal and acceptance are both right (e.g. a boundary value)
    limit_s: int = TIME_LIMIT_S  # a command line starts torch in a new process: slow on a loaded machine


# ---------------------------------------------------------------------------------------------------------------
# Running and classifying


class _Hang(Exception):
    pass


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _limit(seconds: int) -> Iterator[None]:
    def alarm(*_: Any) -> None:
        raise _Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def classify(case: Case, scratch: Path) -> tuple[str, str]:
    """(outcome, message) of one case run in its own copy of `scratch`."""
    work = Path(tempfile.mkdtemp(dir=scratch.parent))
    shutil.copytree(scratch, work, dirs_exist_ok=True)
    records = _Records()
    logger = logging.getLogger("cliptune")
    logger.addHandler(records)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught, _limit(case.limit_s):
            warnings.simplefilter("always")
            case.run(work)
        said = records.messages + [str(w.message) for w in caught]
    except _Hang:
        return "hang", f"still running after {case.limit_s} s"
    except (ValueError, FileNotFoundError) as e:
        message = str(e)
        if not case.bad and not case.either:
            return "refused", message
        named = not case.mention or any(m in message for m in case.mention)
        return ("clear" if named else "unclear"), message
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        return "traceback", f"{type(e).__name__}: {e}"
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
        shutil.rmtree(work, ignore_errors=True)
    if not case.bad or case.either:
        return "accepted", "; ".join(said)[:300]
    if any(m in text for text in said for m in case.mention):
        return "warned", "; ".join(said)[:300]
    return "silent", "; ".join(said)[:300]


def prepare(scratch: Path) -> Path:
    """Three small images under scratch/images, what the table cases point at."""
    from PIL import Image

    (scratch / "images").mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (8, 8), colour).save(scratch / "images" / f"{'abc'[i]}.png")
    return scratch


# ---------------------------------------------------------------------------------------------------------------
# Config values: every scalar key with wrong types and out-of-range values, as an override and in a YAML file

_SKIP_PREFIXES = ("model.image_tower.", "model.text_tower.", "data.train.", "data.labelled.", "eval.retrieval[")
_SKIP_PREFIXES += ("eval.zeroshot[", "eval.compositionality[", "eval.validation[")
_NEGATIVE_OK = {"loss.siglip_bias_init"}
_NUMBER_VALUES = ("abc", "[1]", "{a: 1}", "true", "nan", "inf", "-inf", "-1")
_INT_EXTRA = ("1.5",)
_BOOL_VALUES = ("maybe", "2", "[true]", "{a: 1}")
_CHOICE_VALUES = ("bogus", "[a]", "3")
_LIST_VALUES = ("[", "{a: 1}")


def _scalar_keys() -> list[tuple[str, str]]:
    from cliptune.config import describe

    return [(key, tp) for key, tp, _, _ in describe() if not key.startswith(_SKIP_PREFIXES)]


def _choices(key: str) -> tuple[str, ...] | None:
    import dataclasses

    from cliptune.config import RunConfig

    cls: Any = RunConfig
    *sections, name = key.split(".")
    for part in sections:  # by the fields' types: a section that is off by default (None) has no instance
        hint = typing.get_type_hints(cls)[part]
        cls = next(a for a in (*typing.get_args(hint), hint) if dataclasses.is_dataclass(a))
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}.get(name, {})
    return meta.get("choices")


def _values(key: str, tp: str) -> list[tuple[str, bool]]:
    """(raw value, whether it is legitimate) to try for `key` of type `tp`."""
    if tp.startswith(("float", "int")):
        values = [(v, v == "-1" and key in _NEGATIVE_OK) for v in _NUMBER_VALUES]
        return values + ([(v, False) for v in _INT_EXTRA] if tp.startswith("int") else [])
    if tp == "bool":
        return [(v, False) for v in _BOOL_VALUES]
    if tp.startswith("list"):
        return [(v, False) for v in _LIST_VALUES]
    if _choices(key):
        return [(v, False) for v in _CHOICE_VALUES]
    return []


def _nested_yaml(key: str, raw: str) -> str:
    parts = key.split(".")
    lines = [f"{'  ' * i}{part}:" for i, part in enumerate(parts[:-1])]
    lines.append(f"{'  ' * (len(parts) - 1)}{parts[-1]}: {raw}")
    return "\n".join(lines) + "\n"


def _override_case(key: str, raw: str, ok: bool) -> Case:
    from cliptune import config

    return Case(
        f"override {key}={raw}",
        "config values (override)",
        lambda w: config.build({}, [f"{key}={raw}"]),
        (key,),
        not ok,
    )


def _yaml_case(key: str, raw: str, ok: bool) -> Case:
    from cliptune import config

    def run(work: Path) -> Any:
        path = work / "c.yaml"
        path.write_text(_nested_yaml(key, raw))
        return config.load(path)

    return Case(f"yaml {key}: {raw}", "config values (YAML file)", run, (key, "c.yaml, line"), not ok)


def value_cases() -> list[Case]:
    cases = []
    for key, tp in _scalar_keys():
        for raw, ok in _values(key, tp):
            cases += [_override_case(key, raw, ok), _yaml_case(key, raw, ok)]
    return cases


# ---------------------------------------------------------------------------------------------------------------
# YAML texts


_YAML_TEXTS: list[tuple[str, str, tuple[str, ...], bool]] = [
    ("tab indentation", "optim:\n\tlr: 0.1\n", ("line",), True),
    ("bad indentation", "optim:\n  lr: 0.1\n warmup_steps: 3\n", ("line",), True),
    ("unclosed double quote", 'name: "abc\n', ("line",), True),
    ("unclosed single quote", "name: 'abc\n", ("line",), True),
    ("unclosed flow list", "eval:\n  wise_alphas: [0.5, 1\n", ("line",), True),
    ("unclosed flow mapping", "optim: {lr: 0.1\n", ("line",), True),
    ("several documents", "name: a\n---\nname: b\n", ("document",), True),
    (
        "alias bomb",
        "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
        ("alias", "line"),
        True,
    ),
    ("alias of a section", "optim: &o {lr: 0.1}\ntrain: *o\n", ("alias", "line"), True),
    ("merge key", "base: &b {lr: 0.1}\noptim:\n  <<: *b\n", ("alias", "line"), True),
    ("duplicate top key", "name: a\nname: b\n", ("name",), True),
    ("duplicate nested key", "optim:\n  lr: 0.1\n  lr: 0.2\n", ("lr",), True),
    ("duplicate section", "optim:\n  lr: 0.1\noptim:\n  warmup_steps: 2\n", ("optim",), True),
    ("python object tag", "name: !!python/object/apply:os.system ['true']\n", ("line", "python"), True),
    ("python name tag", "name: !!python/name:os.system\n", ("line", "python"), True),
    ("custom tag", "name: !secret abc\n", ("line", "secret"), True),
    ("top level list", "- a\n- b\n", ("top level",), True),
    ("top level scalar", "hello\n", ("top level",), True),
    ("top level number", "3\n", ("top level",), True),
    ("integer key", "1: 2\n", ("1",), True),
    ("list key", "[a, b]: 2\n", ("line", "key"), True),
    ("null key", "~: 2\n", ("None", "key"), True),
    ("boolean key", "true: 1\n", ("True", "key"), True),
    ("section as scalar", "optim: 3\n", ("optim",), True),
    ("section as list", "optim: [1, 2]\n", ("optim",), True),
    ("list where mapping", "eval:\n  retrieval: {path: x.csv}\n", ("eval.retrieval",), True),
    ("unknown section", "optimizer:\n  lr: 0.1\n", ("optimizer",), True),
    ("unknown nested key", "optim:\n  learning_rate: 0.1\n", ("learning_rate",), True),
    ("key with trailing space", "optim:\n  'lr ': 0.1\n", ("lr ",), True),
    ("binary garbage", "\x00\x01\x02\x03name: x\n", ("line", "c.yaml"), True),
    ("empty file", "", (), False),
    ("only a comment", "# nothing here\n", (), False),
    ("windows line endings", "name: crlf\r\noptim:\r\n  lr: 0.1\r\n", (), False),
    ("byte order mark", "\ufeffname: bom\n", (), False),
    ("deep nesting", "a: " + "[" * 2000 + "]" * 2000 + "\n", ("a", "line"), True),
    ("huge integer", "train:\n  epochs: " + "9" * 400 + "\n", ("train.epochs",), True),
    ("yaml 1.1 sexagesimal", "train:\n  epochs: 1:30\n", ("train.epochs", "line"), True),
    ("yaml 1.1 yes as string key", "runtime:\n  progress: yes\n", (), False),
    ("quoted number", "optim:\n  lr: '0.1'\n", (), False),
]


def _yaml_text_case(name: str, text: str, mention: tuple[str, ...], bad: bool) -> Case:
    from cliptune import config

    def run(work: Path) -> Any:
        path = work / "c.yaml"
        path.write_bytes(text.encode("utf-8"))
        return config.load(path)

    return Case(f"yaml text: {name}", "YAML syntax", run, mention, bad)


def _raw_file_case(name: str, data: bytes, mention: tuple[str, ...], folder: bool = False) -> Case:
    from cliptune import config

    def run(work: Path) -> Any:
        path = work / "c.yaml"
        if folder:
            path.mkdir()
        else:
            path.write_bytes(data)
        return config.load(path)

    return Case(f"config file: {name}", "YAML syntax", run, mention)


def yaml_cases() -> list[Case]:
    cases = [_yaml_text_case(*row) for row in _YAML_TEXTS]
    cases += [
        _raw_file_case("latin-1 byte in a value", "name: caf\xe9\n".encode("latin-1"), ("c.yaml",)),
        _raw_file_case("latin-1 byte in a comment", "# caf\xe9\nname: x\n".encode("latin-1"), ("c.yaml",)),
        _raw_file_case("UTF-16 file", "name: x\n".encode("utf-16"), ("c.yaml",)),
        _raw_file_case("a folder", b"", ("c.yaml",), folder=True),
    ]
    cases.append(Case("config file: missing", "YAML syntax", lambda w: _load(w / "nope.yaml"), ("nope.yaml",)))
    return cases


def _load(path: Path) -> Any:
    from cliptune import config

    return config.load(path)


# ---------------------------------------------------------------------------------------------------------------
# Override syntax and whole-config values


_OVERRIDES: list[tuple[str, tuple[str, ...], bool]] = [
    ("finetune.lock_image_patterns=!attnpool,!layer4", (), False),
    ("finetune.lock_text_patterns=!ln_final", (), False),
    ("name=try2", (), False),
    ("optim.lr=1e-4", (), False),
    ("optim.grad_clip=null", (), False),
    ("eval.wise_alphas=[0, 0.5, 1]", (), False),
    ("model.pretrained=openai", (), False),
    ("optim.lr=[", ("optim.lr",), True),
    ("optim.lr={", ("optim.lr",), True),
    ("a=: 3", ("'a'", "a="), True),
    ("optim.lr=: 3", ("optim.lr",), True),
    ("=3", ("=3",), True),
    ("optim.=3", ("optim.",), True),
    (".lr=3", (".lr",), True),
    ("optim..lr=3", ("optim..lr",), True),
    ("optim.lr", ("optim.lr",), True),
    ("optim.lr.x=3", ("optim.lr",), True),
    ("optim=3", ("optim",), True),
    ("name=!!python/object/apply:os.system ['true']", ("name", "python"), True),
    ("optim.lr=!!python/name:os.system", ("optim.lr", "python"), True),
    ("optim.lr=&a 3", ("optim.lr",), True),
    ("optim.lr=*a", ("optim.lr",), True),
    ("name=", ("name",), True),
    ("name=a/b", ("name",), True),
    ("name=..", ("name",), True),
    ("name=../escape", ("name",), True),
    ("name=/abs/path", ("name",), True),
    ("name= padded ", ("name",), True),
    ("name=a\\b", ("name",), True),
    ("runtime.device=tpu", ("runtime.device",), True),
    ("runtime.device=cuda:x", ("runtime.device", "cuda:x"), True),
    ("optim.lrr=3", ("optim.lrr",), True),
    ("data.samples_per_epoch=100", ("data.samples_per_epoch",), True),
    ("model.embed_dim=64", ("model.embed_dim",), True),
    ("data.shuffle_buffer=10", ("data.shuffle_buffer",), True),
    ("finetune.lora.alpha=0", ("finetune.lora.alpha",), True),
    ("optim.beta2=1", ("optim.beta2",), True),
    ("runtime.seed=99999999999", ("runtime.seed",), True),
]


# Checked with the whole training setup (`config.check_training` where the tree has it): a table is configured.
_TRAINING: list[tuple[str, tuple[str, ...]]] = [
    ("train.batch_size=1", ("train.batch_size",)),
    ("loss.hard_negatives=3", ("loss.hard_negatives",)),
    ("loss.focal_gamma=3", ("loss.focal_gamma",)),
    ("loss.label_smoothing=0.3", ("loss.label_smoothing",)),
    ("loss.siglip_bias_init=-3", ("loss.siglip_bias_init",)),
]


def _training_config(override: str) -> Any:
    from cliptune import config

    cfg = config.build({"data": {"train": "t.csv"}}, [override])
    check = getattr(config, "check_training", None)
    return check(cfg) if check else cfg


def override_cases() -> list[Case]:
    from cliptune import config

    def case(override: str, mention: tuple[str, ...], bad: bool) -> Case:
        return Case(
            f"override syntax: {override}", "override syntax", lambda w: config.build({}, [override]), mention, bad
        )

    def training(override: str, mention: tuple[str, ...]) -> Case:
        return Case(f"training setup: {override}", "override syntax", lambda w: _training_config(override), mention)

    return [case(*row) for row in _OVERRIDES] + [training(*row) for row in _TRAINING]


_DATA: list[tuple[str, Any, tuple[str, ...]]] = [
    ("integer key", {1: 2}, ("1",)),
    ("none key", {None: 2}, ("None",)),
    ("section list", {"optim": [1]}, ("optim",)),
    ("zeroshot two slots", {"eval": {"zeroshot": [{"path": "d", "templates": ["a {} of {}"]}]}}, ("templates",)),
    ("zeroshot named slot", {"eval": {"zeroshot": [{"path": "d", "templates": ["a {name}"]}]}}, ("templates",)),
    ("zeroshot index slot", {"eval": {"zeroshot": [{"path": "d", "templates": ["a {0} {1}"]}]}}, ("templates",)),
    ("zeroshot attribute slot", {"eval": {"zeroshot": [{"path": "d", "templates": ["a {.x}"]}]}}, ("templates",)),
    ("zeroshot unbalanced brace", {"eval": {"zeroshot": [{"path": "d", "templates": ["a {} }"]}]}}, ("templates",)),
    ("zeroshot no templates", {"eval": {"zeroshot": [{"path": "d", "templates": []}]}}, ("templates",)),
    ("zeroshot template number", {"eval": {"zeroshot": [{"path": "d", "templates": [3]}]}}, ("templates",)),
    ("labelled two slots", {"data": {"labelled": {"path": "d", "templates": ["{} {}"]}}}, ("templates",)),
    ("two data sources", {"data": {"train": "a.csv", "shards": "s"}}, ("data",)),
    ("resample without count", {"data": {"shards": "s", "shard_resample": True}}, ("samples_per_epoch",)),
    ("split on a csv", {"data": {"train": {"path": "a.csv", "split": "train"}}}, ("split",)),
    ("composed without towers", {"model": {"backend": "composed"}}, ("image_tower",)),
    ("tower without name", {"model": {"backend": "composed", "image_tower": {"source": "timm"}}}, ("name",)),
    ("table spec a number", {"data": {"train": 3}}, ("data.train",)),
    ("eval set a mapping", {"eval": {"retrieval": {"path": "x.csv"}}}, ("eval.retrieval",)),
    ("duplicate eval names", {"eval": {"retrieval": ["a/v.csv", "b/v.csv"]}}, ("v",)),
    ("wise alpha out of range", {"eval": {"wise_alphas": [1.5]}}, ("wise_alphas",)),
    ("lora tower unknown", {"finetune": {"lora": {"rank": 2, "towers": ["audio"]}}}, ("towers", "audio")),
    ("negative kind unknown", {"loss": {"negative_kinds": ["flip"]}}, ("negative_kinds",)),
    ("ema decay 1", {"finetune": {"ema_decay": 1.0}}, ("ema_decay",)),
    ("preset unknown", {"model": {"preset": "vit-huge-9000"}}, ("model.preset",)),
    ("lora keys without rank", {"finetune": {"lora": {"dropout": 0.5}}}, ("lora",)),
    ("composed keys on openclip", {"model": {"head": "mlp"}}, ("model.head",)),
    ("pretrained on composed", {"model": {"preset": "lite0-minilm", "pretrained": "openai"}}, ("model.pretrained",)),
]


def data_cases() -> list[Case]:
    from cliptune import config

    def case(name: str, data: Any, mention: tuple[str, ...]) -> Case:
        return Case(f"config data: {name}", "config data (API)", lambda w: config.build(data), mention)

    return [case(*row) for row in _DATA]


# Sections that are off by default (data.augment, train.early_stopping, train.select) and eval.validation entries:
# values of the right type that are still wrong, and wrong shapes of the sections themselves.
def _augment(**keys: Any) -> dict[str, Any]:
    return {"data": {"augment": keys}}


def _stopping(**keys: Any) -> dict[str, Any]:
    return {"train": {"early_stopping": keys}}


def _select(**keys: Any) -> dict[str, Any]:
    return {"train": {"select": keys}}


def _validation(*sets: Any) -> dict[str, Any]:
    return {"eval": {"validation": list(sets)}}


_SECTIONS: list[tuple[str, Any, tuple[str, ...], bool]] = [
    ("augment scale reversed", _augment(scale=[0.9, 0.1]), ("data.augment.scale",), True),
    ("augment scale from 0", _augment(scale=[0, 1]), ("data.augment.scale",), True),
    ("augment scale above 1", _augment(scale=[0.5, 2]), ("data.augment.scale",), True),
    ("augment scale of three", _augment(scale=[0.1, 0.5, 1]), ("data.augment.scale",), True),
    ("augment scale a number", _augment(scale=0.5), ("data.augment.scale",), True),
    ("augment ratio reversed", _augment(ratio=[2, 0.5]), ("data.augment.ratio",), True),
    ("augment ratio from 0", _augment(ratio=[0, 1]), ("data.augment.ratio",), True),
    ("augment ratio of one", _augment(ratio=[1]), ("data.augment.ratio",), True),
    ("augment hflip above 1", _augment(hflip=1.5), ("data.augment.hflip",), True),
    ("augment re_prob above 1", _augment(re_prob=2), ("data.augment.re_prob",), True),
    ("augment re_count 0", _augment(re_count=0), ("data.augment.re_count",), True),
    ("augment re_count huge", _augment(re_count=10**9), ("data.augment.re_count",), True),
    ("augment re_count at the bound", _augment(re_count=16), (), False),
    ("augment colour jitter negative", _augment(color_jitter=-0.2), ("data.augment.color_jitter",), True),
    ("augment policy unknown", _augment(auto_augment="bogus"), ("data.augment.auto_augment",), True),
    ("augment policy empty", _augment(auto_augment=""), ("data.augment.auto_augment",), True),
    ("augment interpolation unknown", _augment(interpolation="lanczos9"), ("data.augment.interpolation",), True),
    ("augment re_mode unknown", _augment(re_mode="noise"), ("data.augment.re_mode",), True),
    ("augment a list", {"data": {"augment": [1]}}, ("data.augment",), True),
    ("augment a word", {"data": {"augment": "yes"}}, ("data.augment",), True),
    ("augment unknown key", _augment(flip=0.5), ("data.augment.flip",), True),
    ("augment all defaults", _augment(), (), False),
    ("augment policy rand", _augment(auto_augment="rand-m9-mstd0.5-inc1"), (), False),
    ("stopping patience 0", _stopping(patience=0), ("train.early_stopping.patience",), True),
    ("stopping patience negative", _stopping(patience=-2), ("train.early_stopping.patience",), True),
    ("stopping patience fractional", _stopping(patience=1.5), ("train.early_stopping.patience",), True),
    ("stopping min_delta negative", _stopping(min_delta=-0.1), ("train.early_stopping.min_delta",), True),
    ("stopping min_delta nan", _stopping(min_delta=float("nan")), ("train.early_stopping.min_delta",), True),
    ("stopping a list", {"train": {"early_stopping": [3]}}, ("train.early_stopping",), True),
    ("stopping true", {"train": {"early_stopping": True}}, ("train.early_stopping",), True),
    ("stopping unknown key", _stopping(patients=3), ("train.early_stopping.patients",), True),
    ("stopping all defaults", _stopping(), (), False),
    ("select metric without set", _select(metric="mean_recall"), ("train.select.metric",), True),
    ("select metric of three parts", _select(metric="a/b/c"), ("train.select.metric",), True),
    ("select metric empty set", _select(metric="/mean_recall"), ("train.select.metric",), True),
    ("select metric empty name", {**_select(metric="v/"), **_validation("v.csv")}, ("train.select.metric",), True),
    ("select metric of no set", {**_select(metric="w/acc1"), **_validation("v.csv")}, ("train.select.metric",), True),
    ("select metric a number", _select(metric=3), ("train.select.metric",), True),
    ("select mode unknown", _select(mode="up"), ("train.select.mode",), True),
    ("select a list", {"train": {"select": ["v/acc1"]}}, ("train.select",), True),
    ("select a validation metric", {**_select(metric="v/mean_recall"), **_validation("v.csv")}, (), False),
    ("validation entry a number", _validation(3), ("eval.validation[0]",), True),
    ("validation entry empty", _validation(""), ("eval.validation[0]", "path"), True),
    ("validation path empty", _validation({"path": " "}), ("eval.validation[0]", "path"), True),
    ("validation without path", _validation({"name": "v"}), ("eval.validation[0]", "path"), True),
    ("validation unknown key", _validation({"path": "v.csv", "bogus": 1}), ("eval.validation[0].bogus",), True),
    ("validation classnames a word", _validation({"path": "d", "classnames": "a,b"}), ("classnames",), True),
    ("validation template two slots", _validation({"path": "d", "templates": ["{} {}"]}), ("templates",), True),
    ("validation templates empty", _validation({"path": "d", "templates": []}), ("templates",), True),
    ("validation a mapping", {"eval": {"validation": {"path": "v.csv"}}}, ("eval.validation",), True),
    ("validation split on a csv", _validation({"path": "v.csv", "split": "val"}), ("split",), True),
    (
        "validation named as a retrieval set",
        {"eval": {"validation": [{"path": "a/v.csv"}], "retrieval": [{"path": "b/v.csv"}]}},
        ("v",),
        True,
    ),
    (
        "validation named as the split",
        {"data": {"train": "t.csv", "validation_split": 0.2}, "eval": {"validation": [{"path": "validation.csv"}]}},
        ("validation",),
        True,
    ),
    ("validation two sets", _validation("v.csv", {"path": "d", "templates": ["a {}"]}), (), False),
]


def _policy_case(policy: str) -> Case:
    """A policy string that passes the config's prefix check but that timm's parser rejects when training starts."""

    def run(work: Path) -> Any:
        from cliptune import config
        from cliptune.data.augment import train_transform
        from cliptune.models.base import ImagePreprocessing

        cfg = config.build(_augment(auto_augment=policy))
        return train_transform(cfg.data.augment, ImagePreprocessing(32, (0.5,) * 3, (0.5,) * 3, "bicubic"), False)

    return Case(f"config data: augment policy {policy}", "sections off by default", run, ("data.augment",))


def section_cases() -> list[Case]:
    from cliptune import config

    def case(name: str, data: Any, mention: tuple[str, ...], bad: bool) -> Case:
        return Case(f"config data: {name}", "sections off by default", lambda w: config.build(data), mention, bad)

    policies = ("rand-zz9", "rand-m9-n", "augmix-q7", "original-x", "v0-", "3a-bogus")
    return [case(*row) for row in _SECTIONS] + [_policy_case(p) for p in policies]


# ---------------------------------------------------------------------------------------------------------------
# Tables


_TABLES: list[tuple[str, str, bytes, dict[str, Any], tuple[str, ...], bool]] = [
    ("valid csv", "t.csv", b"image,caption\nimages/a.png,a red one\nimages/b.png,a green one\n", {}, (), False),
    ("semicolon csv", "t.csv", b"image;caption\nimages/a.png;a red one\nimages/b.png;a green one\n", {}, (), False),
    ("crlf csv", "t.csv", b"image,caption\r\nimages/a.png,a red one\r\nimages/b.png,green\r\n", {}, (), False),
    ("bom csv", "t.csv", b"\xef\xbb\xbfimage,caption\nimages/a.png,a red one\nimages/b.png,green\n", {}, (), False),
    ("latin-1 caption", "t.csv", "image,caption\nimages/a.png,caf\xe9\n".encode("latin-1"), {}, ("t.csv",), True),
    (
        "latin-1 jsonl",
        "t.jsonl",
        '{"image": "images/a.png", "caption": "caf\xe9"}\n'.encode("latin-1"),
        {},
        ("t.jsonl",),
        True,
    ),
    ("utf-16 csv", "t.csv", "image,caption\nimages/a.png,red\n".encode("utf-16"), {}, ("t.csv",), True),
    ("field over csv limit", "t.csv", b'image,caption\nimages/a.png,"' + b"x" * 200_000 + b'"\n', {}, ("t.csv",), True),
    (
        "unclosed quote swallows rows",
        "t.csv",
        b'image,caption\nimages/a.png,"a red one\nimages/b.png,green\nimages/c.png,blue\n',
        {},
        ("t.csv",),
        True,
    ),
    (
        "extra fields",
        "t.csv",
        b"image,caption\nimages/a.png,a red one,extra\nimages/b.png,green\n",
        {},
        ("t.csv",),
        True,
    ),
    ("nul byte", "t.csv", b"image,caption\nimages/a.png,a red\x00one\nimages/b.png,green\n", {}, ("t.csv",), True),
    (
        "duplicate rows",
        "t.csv",
        b"image,caption\nimages/a.png,red\nimages/a.png,red\nimages/b.png,green\n",
        {},
        ("t.csv",),
        True,
    ),
    (
        "one image two spellings",
        "t.csv",
        b"image,caption\nimages/a.png,red\nimages/../images/a.png,red one\nimages/b.png,g\n",
        {},
        ("t.csv",),
        True,
    ),
    ("missing caption cell", "t.csv", b"image,caption\nimages/a.png\nimages/b.png,green\n", {}, ("t.csv",), True),
    ("empty file", "t.csv", b"", {}, ("t.csv",), True),
    ("header only", "t.csv", b"image,caption\n", {}, ("t.csv",), True),
    ("wrong image key", "t.csv", b"img,caption\nimages/a.png,red\n", {}, ("image",), True),
    ("wrong caption key", "t.csv", b"image,text\nimages/a.png,red\n", {}, ("caption",), True),
    ("empty image cell", "t.csv", b"image,caption\n,red\nimages/b.png,green\n", {}, ("line",), True),
    ("no readable image", "t.csv", b"image,caption\nimages/zz.png,red\n", {}, ("t.csv",), True),
    (
        "some missing images",
        "t.csv",
        b"image,caption\nimages/zz.png,red\nimages/b.png,green\n",
        {},
        ("t.csv", "zz.png"),
        True,
    ),
    ("tsv with commas", "t.tsv", b"image,caption\nimages/a.png,red\n", {}, ("t.tsv",), True),
    ("unknown suffix", "t.xlsx", b"image,caption\n", {}, ("t.xlsx",), True),
    ("no suffix", "table", b"image,caption\n", {}, ("table",), True),
    ("jsonl invalid line", "t.jsonl", b'{"image": "images/a.png", "caption": "red"}\n{oops\n', {}, ("line 2",), True),
    ("jsonl list line", "t.jsonl", b'["images/a.png", "red"]\n', {}, ("line 1",), True),
    ("jsonl caption number", "t.jsonl", b'{"image": "images/a.png", "caption": 3}\n', {}, ("line 1",), True),
    (
        "jsonl caption list of numbers",
        "t.jsonl",
        b'{"image": "images/a.png", "caption": [1, 2]}\n',
        {},
        ("line 1",),
        True,
    ),
    ("jsonl image number", "t.jsonl", b'{"image": 7, "caption": "red"}\n', {}, ("line 1",), True),
    ("jsonl missing key", "t.jsonl", b'{"image": "images/a.png"}\n', {}, ("caption",), True),
    ("jsonl nan", "t.jsonl", b'{"image": "images/a.png", "caption": NaN}\n', {}, ("line 1",), True),
    (
        "jsonl captions in other key",
        "t.jsonl",
        b'{"image": "images/a.png", "texts": ["red"]}\n',
        {"caption_key": "texts"},
        (),
        False,
    ),
    ("json not coco", "t.json", b"[1, 2, 3]", {}, ("t.json",), True),
    ("coco without images", "t.json", b'{"annotations": []}', {}, ("t.json",), True),
    ("coco truncated", "t.json", b'{"images": [', {}, ("t.json",), True),
    (
        "coco annotation of unknown image",
        "t.json",
        b'{"images": [{"id": 1, "file_name": "images/a.png"}], "annotations": [{"image_id": 9, "caption": "x"}]}',
        {},
        ("t.json",),
        True,
    ),
    (
        "caption json list in csv",
        "t.csv",
        b'image,caption\nimages/a.png,"[""red"", ""a red one""]"\nimages/b.png,g\n',
        {},
        (),
        False,
    ),
    ("table is a folder", "t.csv/", b"", {}, ("t.csv",), True),
    (
        "images_root missing",
        "t.csv",
        b"image,caption\nimages/a.png,red\n",
        {"images_root": "nowhere"},
        ("nowhere",),
        True,
    ),
    (
        "very long caption",
        "t.csv",
        b"image,caption\nimages/a.png," + b"word " * 5000 + b"\nimages/b.png,g\n",
        {},
        (),
        False,
    ),
]


def _table_case(name: str, file: str, data: bytes, spec: dict[str, Any], mention: tuple[str, ...], bad: bool) -> Case:
    def run(work: Path) -> Any:
        from cliptune.config import TableSpec
        from cliptune.data import read_caption_table

        path = work / file
        if file.endswith("/"):
            path.mkdir()
        else:
            path.write_bytes(data)
        table = read_caption_table(TableSpec(path=str(path), **spec))
        if not bad and len(table.images) < 1:
            raise AssertionError("no images read")
        return table

    return Case(f"table: {name}", "tables", run, mention, bad)


def table_cases() -> list[Case]:
    return [_table_case(*row) for row in _TABLES]


# ---------------------------------------------------------------------------------------------------------------
# Saved model folders (model.json)


_SPEC_EDITS: list[tuple[str, Callable[[dict], Any], tuple[str, ...]]] = [
    ("unknown backend", lambda s: s.update(backend="tensorflow"), ("backend",)),
    ("backend missing", lambda s: s.pop("backend"), ("backend",)),
    ("backend a number", lambda s: s.update(backend=3), ("backend",)),
    ("arch missing", lambda s: s.pop("arch"), ("arch",)),
    ("arch a number", lambda s: s.update(arch=7), ("arch",)),
    ("arch unknown", lambda s: s.update(arch="ViT-Q-99"), ("arch", "ViT-Q-99")),
    ("quick_gelu a string", lambda s: s.update(quick_gelu="yes"), ("quick_gelu",)),
    ("preprocess a list", lambda s: s.update(preprocess=[1, 2]), ("preprocess",)),
    ("mean of two", lambda s: s["preprocess"].update(mean=[0.5, 0.5]), ("mean",)),
    ("mean of strings", lambda s: s["preprocess"].update(mean=["a", "b", "c"]), ("mean",)),
    ("std zero", lambda s: s["preprocess"].update(std=[0.5, 0.0, 0.5]), ("std",)),
    ("std a string", lambda s: s["preprocess"].update(std="0.5"), ("std",)),
    ("interpolation unknown", lambda s: s["preprocess"].update(interpolation="lanczos9"), ("interpolation",)),
    ("resize mode unknown", lambda s: s["preprocess"].update(resize_mode="stretch"), ("resize_mode",)),
    ("heads base a list", lambda s: s.update(backend="heads", heads="linear", base=[]), ("base",)),
    ("heads base unknown", lambda s: s.update(backend="heads", heads="linear", base={"backend": "x"}), ("backend",)),
    ("prompted n a string", lambda s: s.update(backend="prompted", n="four", base=dict(s)), ("n",)),
    ("classifier without classes", lambda s: s.update(backend="classifier", dim=8, base=dict(s)), ("classes",)),
]


def _saved_model(work: Path) -> Path:
    """A saved tiny model, made once per probe run and copied into each case's scratch folder."""
    return work / "saved"


def _spec_case(name: str, edit: Callable[[dict], Any], mention: tuple[str, ...]) -> Case:
    def run(work: Path) -> Any:
        import cliptune

        folder = _saved_model(work)
        spec = json.loads((folder / "model.json").read_text())
        edit(spec)
        (folder / "model.json").write_text(json.dumps(spec))
        return cliptune.load(folder)

    return Case(f"model.json: {name}", "model folders", run, ("model.json", *mention))


def _folder_case(name: str, damage: Callable[[Path], Any], mention: tuple[str, ...]) -> Case:
    def run(work: Path) -> Any:
        import cliptune

        folder = _saved_model(work)
        damage(folder)
        return cliptune.load(folder)

    return Case(f"model folder: {name}", "model folders", run, mention)


def _link_outside(path: Path) -> None:
    outside = path.parent.parent / f"outside-{path.name}"
    shutil.move(path, outside)
    path.symlink_to(outside)


def model_cases() -> list[Case]:
    cases = [_spec_case(*row) for row in _SPEC_EDITS]
    cases += [
        _folder_case("model.json not JSON", lambda f: (f / "model.json").write_text("{"), ("model.json",)),
        _folder_case("model.json a list", lambda f: (f / "model.json").write_text("[]"), ("model.json",)),
        _folder_case(
            "model.json latin-1", lambda f: (f / "model.json").write_bytes(b'{"arch": "caf\xe9"}'), ("model.json",)
        ),
        _folder_case("weights truncated", lambda f: _halve(f / "model.safetensors"), ("model.safetensors",)),
        _folder_case("weights empty", lambda f: (f / "model.safetensors").write_bytes(b""), ("model.safetensors",)),
        _folder_case("weights of another model", _foreign_weights, ("model.safetensors",)),
        _folder_case("weights missing", lambda f: (f / "model.safetensors").unlink(), ("model.safetensors",)),
        _folder_case("weights linked outside", lambda f: _link_outside(f / "model.safetensors"), ("outside",)),
        _folder_case("model.json linked outside", lambda f: _link_outside(f / "model.json"), ("outside",)),
    ]
    return cases


def _halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _foreign_weights(folder: Path) -> None:
    from safetensors.torch import save_file

    from cliptune.config import ModelConfig
    from cliptune.models import build_model

    other = build_model(ModelConfig(arch="cliptune-tiny-rn"))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(folder / "model.safetensors"))


def pretrained_cases() -> list[Case]:
    """OpenCLIP `model.pretrained` files: a pickle that would run code, a truncated file, a foreign one."""

    def run(make: Callable[[Path], Path]) -> Callable[[Path], Any]:
        def go(work: Path) -> Any:
            from cliptune.config import ModelConfig
            from cliptune.models import build_model

            path = make(work)
            try:
                return build_model(ModelConfig(pretrained=str(path)))
            finally:
                if (work / "pwned").exists():
                    raise RuntimeError("the pickle payload ran")

        return go

    return [
        Case("pretrained: pickle payload", "model folders", run(_payload_file), ("weights.pt",)),
        Case("pretrained: truncated .pt", "model folders", run(lambda w: _bytes(w / "w.pt", b"PK\x03\x04")), ("w.pt",)),
        Case("pretrained: text as .bin", "model folders", run(lambda w: _bytes(w / "w.bin", b"hello")), ("w.bin",)),
        Case(
            "pretrained: empty safetensors",
            "model folders",
            run(lambda w: _bytes(w / "w.safetensors", b"")),
            ("w.safetensors",),
        ),
    ]


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _payload_file(work: Path) -> Path:
    path = work / "weights.pt"
    path.write_bytes(pickle.dumps({"state_dict": _Payload(work / "pwned")}))
    return path


def fast_cases() -> list[Case]:
    cases = value_cases() + yaml_cases() + override_cases() + data_cases() + section_cases() + table_cases()
    return cases + model_cases() + pretrained_cases()


def make_scratch(root: Path) -> Path:
    """The folder every case starts from: images/ and saved/ (a saved tiny model)."""
    from cliptune.config import ModelConfig
    from cliptune.models import build_model, save_model

    scratch = prepare(root / "scratch")
    save_model(build_model(ModelConfig()), scratch / "saved")
    return scratch


# ---------------------------------------------------------------------------------------------------------------
# Slow cases: resuming from damaged checkpoints, a diverging run, and the command line


def _shapes_config(work: Path, **sections: Any) -> dict[str, Any]:
    cfg = {
        "name": "run",
        "data": {"train": {"path": str(work / "shapes" / "train.csv")}},
        "train": {"epochs": 1, "batch_size": 8},
        "optim": {"warmup_steps": 1},
        "runtime": {"output_dir": str(work / "runs"), "progress": False},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def _trained(work: Path) -> Path:
    """The run trained once by `make_slow_scratch`, its config rewritten for this copy."""
    import yaml

    run = work / "runs" / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["runtime"]["output_dir"] = str(work / "runs")
    saved["data"]["train"]["path"] = str(work / "shapes" / "train.csv")
    saved["data"]["train"]["name"] = "train"
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    return run


def _resume_case(name: str, damage: Callable[[Path], Any], mention: tuple[str, ...]) -> Case:
    def run(work: Path) -> Any:
        import cliptune

        run_dir = _trained(work)
        damage(run_dir / "checkpoints")
        try:
            return cliptune.finetune(_shapes_config(work, train={"epochs": 2}), resume=True)
        finally:
            if (work / "pwned").exists():
                raise RuntimeError("the pickle payload ran")

    return Case(f"resume: {name}", "checkpoints (slow)", run, mention)


def _epoch(folder: Path) -> Path:
    return folder / "epoch_1"


def _pickled_state(folder: Path) -> None:
    for item in _epoch(folder).iterdir():
        if item.name != "model.safetensors":
            item.unlink()
    marker = folder.parents[2] / "pwned"
    (_epoch(folder) / "state.pt").write_bytes(pickle.dumps({"epoch": 1, "step": 1, "rng": _Payload(marker)}))


def _state_files(folder: Path) -> list[Path]:
    return [p for p in _epoch(folder).iterdir() if p.name != "model.safetensors"]


def slow_cases() -> list[Case]:
    cases = [
        _resume_case("pickled state.pt with a payload", _pickled_state, ("state.pt",)),
        _resume_case("latest points outside", lambda f: (f / "latest").write_text("../../../elsewhere"), ("latest",)),
        _resume_case("latest absolute", lambda f: (f / "latest").write_text("/tmp"), ("latest",)),
        _resume_case("latest garbage", lambda f: (f / "latest").write_text("epoch_x"), ("latest",)),
        _resume_case("epoch folder linked outside", lambda f: _link_outside(_epoch(f)), ("outside",)),
        _resume_case("weights truncated", lambda f: _halve(_epoch(f) / "model.safetensors"), ("model.safetensors",)),
        _resume_case("weights of another model", lambda f: _foreign_weights(_epoch(f)), ("model.safetensors",)),
        _resume_case("weights missing", lambda f: (_epoch(f) / "model.safetensors").unlink(), ("model.safetensors",)),
        _resume_case("state truncated", lambda f: [_halve(p) for p in _state_files(f)], ("epoch_1",)),
        _resume_case("state emptied", lambda f: [p.write_bytes(b"") for p in _state_files(f)], ("epoch_1",)),
        _resume_case("state deleted", lambda f: [p.unlink() for p in _state_files(f)], ("epoch_1",)),
        Case("train: NaN loss", "training (slow)", _diverge, ("optim.lr",)),
        Case("train: output_dir is a file", "training (slow)", _output_is_file, ("output_dir",)),
        Case("train: batch larger than the set", "training (slow)", _big_batch, ("batch_size",)),
        Case("train: skips leave less than a batch", "training (slow)", _skips_below_a_batch, ("train",)),
        Case("train: early stopping, no eval set", "training (slow)", _stop_blind, ("train.early_stopping",)),
        Case("train: select a metric the set lacks", "training (slow)", _select_missing, ("train.select.metric",)),
        Case("train: validation set missing", "training (slow)", _validation_missing, ("none.csv",)),
        Case("train: augment policy timm rejects", "training (slow)", _bad_policy, ("data.augment",)),
        Case("train: captions over the context", "training (slow)", _long_captions, ("train", "77 tokens")),
    ]
    return cases + cli_cases()


def _diverge(work: Path) -> Any:
    import cliptune

    cfg = _shapes_config(work, optim={"lr": 1e30, "warmup_steps": 0, "grad_clip": None}, train={"epochs": 2})
    cfg["name"] = "diverge"
    return cliptune.finetune(cfg)


def _output_is_file(work: Path) -> Any:
    import cliptune

    (work / "afile").write_text("x")
    return cliptune.finetune(_shapes_config(work, runtime={"output_dir": str(work / "afile")}))


def _big_batch(work: Path) -> Any:
    import cliptune

    cfg = _shapes_config(work, train={"batch_size": 500})
    cfg["name"] = "big"
    return cliptune.finetune(cfg)


def _finetune(work: Path, name: str, **sections: Any) -> Any:
    import cliptune

    cfg = _shapes_config(work, **sections)
    cfg["name"] = name
    return cliptune.finetune(cfg)


def _skips_below_a_batch(work: Path) -> Any:
    rows = (work / "shapes" / "train.csv").read_text().splitlines()
    gone = [f"gone_{i}.png,a shape that is gone" for i in range(20)]
    (work / "shapes" / "train.csv").write_text("\n".join([*rows[:5], *gone]) + "\n")
    return _finetune(work, "skips")


def _stop_blind(work: Path) -> Any:
    return _finetune(work, "blind", train={"early_stopping": {"patience": 1}})


def _select_missing(work: Path) -> Any:
    val = {"validation": [{"path": str(work / "shapes" / "val.csv"), "name": "val"}]}
    return _finetune(work, "select", train={"select": {"metric": "val/acc1"}}, eval=val)


def _validation_missing(work: Path) -> Any:
    return _finetune(work, "noval", eval={"validation": [str(work / "none.csv")]})


def _bad_policy(work: Path) -> Any:
    return _finetune(work, "policy", data={"augment": {"auto_augment": "rand-zz9"}})


def _long_captions(work: Path) -> Any:
    table = work / "shapes" / "train.csv"
    rows = table.read_text().splitlines()
    image = rows[1].split(",")[0]
    table.write_text("\n".join([*rows, f"{image},{' '.join(['a red square'] * 40)}"]) + "\n")
    return _finetune(work, "long")


class CliFailure(Exception):
    """A command that printed a traceback or exited with another code than 2."""


def _cli(*args: str) -> Callable[[Path], Any]:
    def run(work: Path) -> Any:
        argv = [a.replace("{w}", str(work)) for a in args]
        proc = subprocess.run([sys.executable, "-m", "cliptune.cli", *argv], capture_output=True, text=True, cwd=work)
        if "Traceback" in proc.stderr:
            raise CliFailure(proc.stderr.strip().splitlines()[-1])
        if proc.returncode == 2:
            raise ValueError(proc.stderr.strip())
        if proc.returncode != 0:
            raise CliFailure(f"exit code {proc.returncode}: {proc.stderr.strip()[-300:]}")
        return proc

    return run


def cli_cases() -> list[Case]:
    table = "{w}/shapes/val.csv"
    cases = [
        Case(
            "cli: eval --device tpu",
            "command line (slow)",
            _cli("eval", "--model", "{w}/saved", "--data", table, "--device", "tpu"),
            ("tpu",),
        ),
        Case(
            "cli: eval --device cuda",
            "command line (slow)",
            _cli("eval", "--model", "{w}/saved", "--data", table, "--device", "cuda"),
            ("cuda",),
        ),
        Case(
            "cli: encode --out a folder",
            "command line (slow)",
            _cli("encode", "--model", "{w}/saved", "--texts", "{w}/t.txt", "--out", "{w}/images"),
            ("--out",),
        ),
        Case(
            "cli: encode --out over its input",
            "command line (slow)",
            _cli("encode", "--model", "{w}/saved", "--texts", "{w}/t.npy", "--out", "{w}/t.npy"),
            ("--out",),
        ),
        Case("cli: train missing config", "command line (slow)", _cli("train", "{w}/none.yaml"), ("none.yaml",)),
        Case(
            "cli: train bad override", "command line (slow)", _cli("train", "{w}/cli.yaml", "optim.lr=["), ("optim.lr",)
        ),
        Case("cli: train config not UTF-8", "command line (slow)", _cli("train", "{w}/latin.yaml"), ("latin.yaml",)),
        Case(
            "cli: compositionality README command",
            "command line (slow)",
            _cli("compositionality", "--data", table, "--out", "{w}/comp.jsonl", "--tagger", "rules"),
            (),
            False,
        ),
        Case(
            "cli: eval a folder that is no model",
            "command line (slow)",
            _cli("eval", "--model", "{w}/images", "--data", table),
            ("images",),
        ),
    ]
    for case in cases:
        case.limit_s = 600
    return cases


def make_slow_scratch(scratch: Path) -> None:
    """Adds shapes/ (a tiny image-caption set), a trained one-epoch run, and files the CLI cases read."""
    import cliptune
    from cliptune.data.synthetic import make_shapes

    make_shapes(scratch / "shapes", n_train=32, n_val=8, image_size=16)
    cliptune.finetune(_shapes_config(scratch))
    (scratch / "t.txt").write_text("a red square\n")
    (scratch / "t.npy").write_text("a red square\n")
    (scratch / "cli.yaml").write_text("name: x\n")  # not c.yaml: the fast cases write that one
    (scratch / "latin.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))


# ---------------------------------------------------------------------------------------------------------------
# Report


def run_all(cases: list[Case], scratch: Path, progress: bool = True) -> list[tuple[Case, str, str]]:
    from tqdm import tqdm

    return [(case, *classify(case, scratch)) for case in tqdm(cases, disable=not progress, desc="probe")]


def table(results: list[tuple[Case, str, str]]) -> str:
    groups: dict[str, Counter] = {}
    for case, outcome, _ in results:
        groups.setdefault(case.group, Counter())[outcome] += 1
    total = sum(groups.values(), Counter())
    lines = ["| inputs | tried | " + " | ".join(OUTCOMES) + " |", "|---|" + "---|" * (len(OUTCOMES) + 1)]
    for name, counts in [*groups.items(), ("**all**", total)]:
        lines.append(f"| {name} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    return "\n".join(lines)


def failures(results: list[tuple[Case, str, str]]) -> str:
    bad = [(c, o, m) for c, o, m in results if o not in GOOD]
    return "\n".join(f"- {o}: {c.id} -> {m.splitlines()[0][:160] if m else ''}" for c, o, m in bad)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slow", action="store_true", help="also resume from damaged checkpoints and run the CLI")
    parser.add_argument("--slow-only", action="store_true", help="only the slow cases")
    parser.add_argument("--write", metavar="LABEL", help="write the table into benchmarks/RESULTS.md under LABEL")
    parser.add_argument("--list", action="store_true", help="print every case that did not end well")
    args = parser.parse_args()
    logging.getLogger("cliptune").propagate = False  # the probe records warnings; it does not print them
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = make_scratch(Path(tmp))
        cases = [] if args.slow_only else fast_cases()
        if args.slow or args.slow_only:
            make_slow_scratch(scratch)
            cases += slow_cases()
        results = run_all(cases, scratch)
    text = table(results)
    print(text)
    if args.list:
        print(failures(results))
    print(f"{len(results)} cases in {time.perf_counter() - started:.0f} s")
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _record import machine, write_section

        import cliptune

        command = "python benchmarks/probe.py" + (" --slow" if args.slow else "") + f" --write '{args.write}'"
        where = f"cliptune imported from `{Path(cliptune.__file__).parent}`"
        write_section(f"Probe: {args.write}", f"`{command}`, {where}, on {machine()}.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
