"""Config: typed loading, dotted overrides, rejection messages, round trip, and every shipped config validates."""

from pathlib import Path

import pytest

from cliptune import config
from cliptune.config import ConfigError
from tests.helpers import ROOT


def test_defaults_and_sections():
    cfg = config.build({})
    assert cfg.name == "run" and cfg.model.arch == "cliptune-tiny-vit" and cfg.runtime.precision == "fp32"
    assert cfg.run_dir == Path("runs/run")


def test_overrides_are_typed_by_the_dataclass():
    cfg = config.build(
        {},
        [
            "optim.lr=1e-4",
            "train.epochs=3",
            "name=try2",
            "optim.grad_clip=null",
            "runtime.progress=false",
            "model.pretrained=openai",
        ],
    )
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3 and cfg.name == "try2" and cfg.optim.grad_clip is None
    assert cfg.runtime.progress is False and cfg.model.pretrained == "openai"


def test_yaml_1_1_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 1e-4}\n")
    assert config.load(path).optim.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("data", "overrides", "expected"),
    [
        ({"optim": {"lrr": 1}}, [], r"unknown config key 'optim.lrr'; did you mean lr\?"),
        ({"trian": {}}, [], r"unknown config key 'trian'; did you mean train\?"),
        ({}, ["train.epochs=abc"], r"train.epochs: expected an integer, got 'abc'"),
        ({}, ["train.epochs=0"], r"train.epochs: 0 is not allowed; it must be > 0"),
        ({}, ["optim.lr=-1"], r"optim.lr: -1.0 is not allowed; it must be >= 0"),
        ({}, ["runtime.precision=fp16"], r"runtime.precision: 'fp16' is not allowed; choose one of fp32, bf16"),
        ({}, ["runtime.device=tpu"], r"runtime.device: 'tpu' is not allowed"),
        ({}, ["optim.grad_clip=0"], r"optim.grad_clip: 0.0 must be > 0, or null"),
        ({}, ["model.preset=lite0-minlm"], r"model.preset: 'lite0-minlm' is not a preset; did you mean lite0-minilm"),
        ({"data": {"train": {"image_key": "x"}}}, [], r"data.train: missing required key\(s\) path"),
        ({"eval": {"retrieval": "x.csv"}}, [], r"eval.retrieval: expected a list"),
        ({"eval": {"zeroshot": [{"path": "d", "templates": ["no slot"]}]}}, [], r"has no '\{\}'"),
        ({"runtime": {"progress": "yes"}}, [], r"runtime.progress: expected true or false, got 'yes'"),
        ({}, ["train.epochs"], r"must look like key=value"),
        ({}, ["name=a/b"], r"name: 'a/b' must be a non-empty folder name"),
    ],
)
def test_bad_input_is_rejected_with_the_key_and_the_fix(data, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        config.build(data, overrides)


def test_duplicate_eval_names_are_rejected():
    sets = [{"path": "a/val.csv"}, {"path": "b/val.csv"}]
    with pytest.raises(ConfigError, match="set name\\(s\\) val used twice"):
        config.build({"eval": {"retrieval": sets}})


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: -2}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.epochs"):
        config.load(bad)


def test_round_trip_through_yaml(tmp_path):
    cfg = config.build(
        {
            "name": "x",
            "data": {"train": {"path": "t.csv", "caption_key": "text"}},
            "eval": {
                "retrieval": [{"path": "v.csv", "name": "val"}],
                "zeroshot": [{"path": "cls", "templates": ["a {}"], "classnames": ["a", "b"]}],
            },
            "model": {"preset": "lite0-minilm"},
        },
        ["optim.lr=3e-4"],
    )
    config.dump(cfg, tmp_path / "config.yaml")
    again = config.load(tmp_path / "config.yaml")
    assert again == cfg
    config.dump(again, tmp_path / "config2.yaml")
    assert (tmp_path / "config.yaml").read_text() == (tmp_path / "config2.yaml").read_text()


def test_preset_keys_given_by_the_user_win():
    cfg = config.build({"model": {"preset": "lite0-minilm", "head": "mlp", "text_tower": {"pooling": "cls"}}})
    assert cfg.model.backend == "composed" and cfg.model.head == "mlp"
    assert cfg.model.text_tower.pooling == "cls" and cfg.model.text_tower.name == "all-MiniLM-L6-v2"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = config.load(path)
    assert cfg.name


# The FT-CLIP seed's scripts (seed 002): arch, input size, global batch, lr, warm-up and total epochs, layer decay.
FTCLIP_SCRIPTS = {
    "ftclip_vitb16_in1k.yaml": ("ViT-B-16", None, 2048, 6e-4, 10, 50, 0.6),
    "ftclip_vitb16_in1k_384.yaml": ("ViT-B-16", 384, 2048, 7e-4, 10, 50, 0.6),
    "ftclip_vitl14_in1k.yaml": ("ViT-L-14", None, 2048, 4e-4, 5, 30, 0.65),
}


@pytest.mark.parametrize("name", list(FTCLIP_SCRIPTS))
def test_ftclip_recipes_carry_the_seeds_hyper_parameters(name):
    cfg = config.load(ROOT / "configs" / name)
    arch, size, batch, lr, warmup, epochs, decay = FTCLIP_SCRIPTS[name]
    assert (cfg.model.arch, cfg.model.pretrained, cfg.model.image_size, cfg.model.drop_path) == (
        arch,
        "openai",
        size,
        0,
    )
    assert (cfg.train.batch_size, cfg.optim.lr, cfg.optim.warmup_epochs, cfg.train.epochs) == (
        batch,
        lr,
        warmup,
        epochs,
    )
    assert (cfg.optim.layer_decay_image, cfg.optim.weight_decay, cfg.finetune.ema_decay) == (decay, 0.05, 0.9998)
    assert (cfg.loss.name, cfg.loss.label_smoothing, cfg.optim.grad_clip, cfg.optim.eps) == ("ce", 0.1, None, 1e-8)
    augment = cfg.data.augment
    assert (augment.auto_augment, augment.re_prob, augment.re_mode, augment.scale) == (
        "rand-m9-mstd0.5-inc1",
        0.25,
        "pixel",
        [0.08, 1.0],
    )
    assert not cfg.data.mixup.active and cfg.data.labelled.path == "data/imagenet/train"
    text = (ROOT / "configs" / name).read_text()
    assert "Published top-1" in text and "differs from the seed" in text
