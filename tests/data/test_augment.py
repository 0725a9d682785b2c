"""Training augmentation (`data.augment`) and Mixup / CutMix (`data.mixup`): applied in training only, the same for
the same (seed, epoch, sample) whatever ran before, and mixed targets that are proper distributions."""

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.mixup import mixup_target

import cliptune
from cliptune.api import resolve_config
from cliptune.config import AugmentConfig, ConfigError, MixupConfig
from cliptune.data.augment import PairMixup, hflip_probability, train_transform
from cliptune.data.datasets import sample_seed, seeded_transform
from cliptune.data.synthetic import SHAPES
from cliptune.models.base import ImagePreprocessing
from cliptune.train.setup import build_trainer

TEMPLATES = ["a photo of a {}."]

PRE = ImagePreprocessing(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic")
# One setting per transform the section offers, each strong enough that two seeds must differ.
EACH_TRANSFORM = {
    "crop": {"scale": [0.2, 0.5]},
    "flip": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.5, "color_jitter": None},
    "randaugment": {"scale": [1.0, 1.0], "auto_augment": "rand-m9-mstd0.5-inc1"},
    "autoaugment": {"scale": [1.0, 1.0], "auto_augment": "original"},
    "trivialaugment": {"scale": [1.0, 1.0], "auto_augment": "trivialaugment"},
    "colour jitter": {"scale": [1.0, 1.0], "hflip": 0.0, "color_jitter": 0.4},
    "random erasing": {"scale": [1.0, 1.0], "hflip": 0.0, "color_jitter": None, "re_prob": 1.0},
}


@pytest.fixture(scope="module")
def labelled(shapes, tmp_path_factory) -> Path:
    """The shapes images as a `path<TAB>label` list, the label being the shape drawn."""
    lines = []
    for row in csv.DictReader((shapes / "train.csv").open()):
        caption = json.loads(row["caption"])[0]
        lines.append(f"{shapes / row['image']}\t{next(s for s in SHAPES if s in caption)}")
    path = tmp_path_factory.mktemp("labelled") / "labels.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _image(seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _disturb() -> None:
    """Draw from every global generator, as other code in the process would between two samples."""
    random.random()
    np.random.rand()
    torch.rand(1)


@pytest.mark.parametrize("name", list(EACH_TRANSFORM))
def test_each_transform_is_a_pure_function_of_the_sample_seed(name):
    transform = train_transform(AugmentConfig(**EACH_TRANSFORM[name]), PRE, labelled=True)
    image = _image()
    seeds = [sample_seed(0, epoch, index) for epoch in (0, 1, 3) for index in (0, 1, 7)]
    first = [seeded_transform(transform, image, s) for s in seeds]
    _disturb()
    again = [seeded_transform(transform, image, s) for s in reversed(seeds)][::-1]
    for a, b in zip(first, again):
        assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert any(not torch.equal(first[0], other) for other in first[1:]), "the seed changes nothing"
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    seeded_transform(transform, image, seeds[0])
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), state[2])


def test_flip_is_off_by_default_for_captions_and_follows_the_model_input():
    assert hflip_probability(AugmentConfig(), labelled=True) == 0.5
    assert hflip_probability(AugmentConfig(), labelled=False) == 0.0
    flip = AugmentConfig(scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=1.0, color_jitter=None)
    image = _image().resize((32, 32))
    out = train_transform(flip, PRE, labelled=False)(image)
    expected = torch.tensor(np.asarray(image.transpose(Image.FLIP_LEFT_RIGHT)), dtype=torch.float32) / 255
    expected = (expected.permute(2, 0, 1) - torch.tensor(PRE.mean)[:, None, None]) / torch.tensor(PRE.std)[
        :, None, None
    ]
    torch.testing.assert_close(out, expected)


def test_high_magnitude_posterize_works_on_this_pillow():
    # rand-...-inc1 at magnitude 10 keeps 0 bits, which Pillow >= 12 refuses; it must give a black image instead.
    transform = train_transform(AugmentConfig(scale=[1.0, 1.0], auto_augment="rand-m10-n8-mstd0-inc1"), PRE, True)
    for seed in range(20):
        assert torch.isfinite(seeded_transform(transform, _image(seed), seed)).all()


def test_bad_policy_is_a_config_error():
    with pytest.raises(ConfigError, match=r"auto_augment: 'rnd-m9'"):
        AugmentConfig(auto_augment="rnd-m9")
    with pytest.raises(ConfigError, match=r"data.augment"):
        train_transform(AugmentConfig(auto_augment="rand-x9"), PRE, True)
    with pytest.raises(ConfigError, match=r"data.augment.scale"):
        cliptune.config.build({"data": {"augment": {"scale": [0.5, 1.5]}}})


def _run_config(shapes, tmp_path, labelled_path, **sections) -> dict:
    spec = {"path": str(labelled_path), "templates": TEMPLATES}
    cfg = {
        "name": "aug",
        "model": {"arch": "cliptune-tiny-vit"},
        "data": {"labelled": spec},
        "loss": {"name": "ce"},
        "train": {"epochs": 1, "batch_size": 16},
        "runtime": {"output_dir": str(tmp_path), "progress": False, "seed": 0},
    }
    return cliptune.config.merge(cfg, sections)


def test_augmentation_reaches_training_images_only(shapes, tmp_path, labelled):
    plain = build_trainer(resolve_config(_run_config(shapes, tmp_path / "a", labelled)))
    augment = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}
    cfg = _run_config(shapes, tmp_path / "b", labelled, data={"augment": augment})
    trainer = build_trainer(resolve_config(cfg))
    assert trainer.dataset.transform is not trainer.model.train_transform
    assert repr(trainer.model.eval_transform) == repr(plain.model.eval_transform)  # evaluation: the model's own
    assert trainer.encoding.model is trainer.model  # evaluation encodes through model.eval_transform
    image = Image.open(trainer.train_table.images[3]).convert("RGB")
    assert not torch.equal(trainer.dataset[3][0], plain.model.eval_transform(image))
    first = trainer.dataset[3][0]
    _disturb()
    assert torch.equal(trainer.dataset[3][0], first)
    trainer.dataset.set_epoch(1)
    assert not torch.equal(trainer.dataset[3][0], first)


def test_augmenting_a_cached_locked_image_tower_is_refused(shapes, tmp_path):
    cfg = {
        "model": {"arch": "cliptune-tiny-vit"},
        "data": {"train": {"path": str(shapes / "train.csv")}, "augment": {}},
        "finetune": {"lock_image": True},
        "runtime": {"output_dir": str(tmp_path), "progress": False},
    }
    with pytest.raises(ConfigError, match=r"data.augment: the image tower is locked"):
        build_trainer(resolve_config(cfg))


# ---------------------------------------------------------------------------------------------------------------
# Mixup / CutMix


def _batch(n: int = 8, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=generator), torch.randint(0, classes, (n,), generator=generator)


@pytest.mark.parametrize(
    "cfg", [{"mixup_alpha": 0.8}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}]
)
def test_mixed_targets_are_distributions_and_mix_what_the_images_mix(cfg):
    images, labels = _batch()
    mixed, targets = PairMixup(MixupConfig(**cfg), 5, 0.1, seed=0)(images, labels, step=3, first=0)
    assert targets.shape == (8, 5) and mixed.shape == images.shape
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert not torch.equal(mixed, images)
    for j in range(0, 8, 2):
        a, b = images[j], images[j + 1]
        from_a, from_b = (mixed[j] == a).all(0), (mixed[j] == b).all(0)
        # cutmix: each pixel from one image, lambda the share kept from the first; mixup: lam * a + (1 - lam) * b
        cutmix = bool((from_a | from_b).all())
        lam = float(from_a.float().mean()) if cutmix else float(((mixed[j] - b) / (a - b)).median())
        own = mixup_target(labels[j : j + 2], 5, 1.0, 0.1)
        expected = lam * own[0] + (1 - lam) * own[1]
        torch.testing.assert_close(targets[j], expected, atol=2e-3, rtol=0)


def test_mixing_a_split_batch_equals_mixing_it_whole():
    images, labels = _batch(8)
    mix = PairMixup(MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0), 5, 0.1, seed=7)
    whole = mix(images, labels, step=11, first=0)
    halves = [mix(images[:4], labels[:4], step=11, first=0), mix(images[4:], labels[4:], step=11, first=4)]
    assert torch.equal(whole[0], torch.cat([h[0] for h in halves]))
    assert torch.equal(whole[1], torch.cat([h[1] for h in halves]))
    other_step = mix(images, labels, step=12, first=0)
    assert not torch.equal(whole[0], other_step[0])
    with pytest.raises(ValueError, match=r"odd index"):
        mix(images[:2], labels[:2], step=0, first=1)


def test_an_odd_sample_keeps_its_own_smoothed_label():
    images, labels = _batch(5)
    mixed, targets = PairMixup(MixupConfig(mixup_alpha=1.0), 5, 0.1, seed=0)(images, labels, step=0, first=0)
    assert torch.equal(mixed[4], images[4])
    torch.testing.assert_close(targets[4], mixup_target(labels[4:], 5, 1.0, 0.1)[0])


@pytest.mark.parametrize("loss", ["clip", "siglip", "unicl", "negclip", "fsc"])
def test_mixup_is_refused_for_objectives_without_class_labels(loss):
    mixup = {"mixup": {"cutmix_alpha": 1.0}}
    with pytest.raises(ConfigError, match=rf"data.mixup: .*loss.name '{loss}'"):
        cliptune.config.check_training(
            cliptune.config.build({"loss": {"name": loss}, "data": {"train": "t.csv", **mixup}})
        )
    cliptune.config.check_training(
        cliptune.config.build({"loss": {"name": "ce"}, "data": {"labelled": {"path": "d"}, **mixup}})
    )
