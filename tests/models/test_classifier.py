"""The classification head (cliptune.models.classifier): zero-shot initialisation that reproduces zero-shot
evaluation exactly, gradients, towers and layer decay, and an offline save/load round trip."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cliptune import metrics
from cliptune.config import FinetuneConfig, ModelConfig, OptimConfig
from cliptune.data import LabelledImages, load_rgb
from cliptune.eval.zeroshot import evaluate_zeroshot
from cliptune.features.encoding import Encoding
from cliptune.features.prompts import zeroshot_classifier, zeroshot_head
from cliptune.models import ClipModel, ModelError, build_model, load_model, save_model
from cliptune.models.base import Tower
from cliptune.models.classifier import ClassifierModel
from cliptune.models.io import SPEC_FILE
from cliptune.tuning.locking import apply_locking
from cliptune.tuning.param_groups import param_groups

CLASSES = ["T-shirt/top", "Ankle boot", "red square", "dog"]  # a slash and spaces, as in real class names
TEMPLATES = ["a photo of a {}.", "a drawing of a {}", "{}"]
LABELS = [0, 1, 2, 3, 1, 2]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0), (128, 128, 0)]


@pytest.fixture(scope="module")
def base() -> ClipModel:
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="cliptune-tiny-vit")).eval()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    files = []
    for i, colour in enumerate(COLOURS):  # the random tiny model tells some of these apart, noise it does not
        files.append(folder / f"{i}.png")
        Image.new("RGB", (40, 40), colour).save(files[-1])
    return files


def pixels(model: ClipModel, files: list[Path]) -> torch.Tensor:
    return torch.stack([model.eval_transform(load_rgb(f)) for f in files])


def logits_of(model: ClassifierModel, files: list[Path]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.classify(pixels(model, files))


def test_class_weights_are_the_normalised_mean_of_template_embeddings(base) -> None:
    model = zeroshot_head(base, CLASSES, TEMPLATES)
    with torch.no_grad():  # direct computation, one class at a time
        want = []
        for name in CLASSES:
            emb = base.encode_text(base.tokenize([t.format(name) for t in TEMPLATES]), normalize=False)
            want.append(F.normalize(F.normalize(emb, dim=-1).mean(dim=0), dim=0))
    assert model.class_weights.shape == (len(CLASSES), 64)
    assert torch.allclose(model.class_weights, torch.stack(want), atol=1e-6)
    assert model.class_names == CLASSES and model.tower_of("class_weights") == "image"


def test_the_initial_head_gives_exactly_the_zero_shot_logits_and_metrics(base, image_files) -> None:
    model = zeroshot_head(base, CLASSES, TEMPLATES)
    encoding = Encoding(base)
    zeroshot = 100.0 * encoding.images(image_files) @ zeroshot_classifier(encoding, CLASSES, TEMPLATES)
    logits = logits_of(model, image_files)
    assert torch.equal(logits, zeroshot)
    assert torch.equal(logits.argmax(dim=1), zeroshot.argmax(dim=1))
    assert len(set(logits.argmax(dim=1).tolist())) > 1  # the random model does not predict one class for everything
    data = LabelledImages(paths=image_files, labels=LABELS, classnames=CLASSES)
    assert metrics.classification(logits, torch.tensor(LABELS)) == evaluate_zeroshot(encoding, data, TEMPLATES)


def test_embeddings_tokens_and_temperature_are_the_bases(base, image_files) -> None:
    model = zeroshot_head(base, CLASSES, TEMPLATES)
    images, tokens = pixels(base, image_files), base.tokenize(CLASSES)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), base.encode_image(images))
        assert torch.equal(model.encode_text(tokens), base.encode_text(tokens))
    assert torch.equal(model.tokenize(CLASSES), tokens)
    assert model.logit_scale is base.logit_scale
    assert model.eval_transform is base.eval_transform and model.train_transform is base.train_transform


def test_towers_follow_the_base(base) -> None:
    model = zeroshot_head(base, CLASSES, TEMPLATES)
    for name, _ in model.named_parameters():
        want = "image" if name == "class_weights" else base.tower_of(name.removeprefix("base."))
        assert model.tower_of(name) == want, name
    towers: tuple[Tower, ...] = ("image", "text", "shared")
    assert all(model.tower_modules(t) == base.tower_modules(t) for t in towers)
    assert {model.tower_of(n) for n, _ in model.named_parameters()} == {"image", "text", "shared"}


def test_gradient_reaches_the_head_and_the_image_tower_only(base, image_files) -> None:
    torch.manual_seed(0)
    model = zeroshot_head(build_model(ModelConfig(arch="cliptune-tiny-vit")), CLASSES, TEMPLATES)
    model.train()
    loss = F.cross_entropy(model.classify(pixels(model, image_files)), torch.tensor(LABELS), label_smoothing=0.1)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["class_weights"].abs().sum() > 0
    assert sum(g.abs().sum() for n, g in grads.items() if g is not None and model.tower_of(n) == "image") > 0
    assert all(grads[n] is None for n in grads if model.tower_of(n) != "image")  # text tower and temperature
    image = [n for n in grads if model.tower_of(n) == "image"]
    assert all(grads[n] is not None for n in image), [n for n in image if grads[n] is None]


def test_layer_decay_puts_the_head_after_the_last_block(base) -> None:
    model = zeroshot_head(base, CLASSES, TEMPLATES)
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, layer_decay_image=0.5)
    groups = {n: g for g in param_groups(model, cfg) for n in g["names"]}
    head = groups["class_weights"]
    assert head["tower"] == "image" and head["lr_scale"] == 1.0 and head["lr"] == 1e-3
    assert head["layer_id"] == head["num_ids"] - 1 == 3  # 2 blocks: stem 0, blocks 1-2, top 3
    assert head["weight_decay"] == 0.1  # a (C, D) weight matrix, decayed like the other linear weights
    assert groups["base.model.visual.conv1.weight"]["lr_scale"] == 0.5**3  # the decay does reach this tower
    assert groups["base.model.visual.proj"]["layer_id"] == head["layer_id"]


def test_a_locked_image_tower_can_keep_its_head_trainable(base) -> None:
    torch.manual_seed(0)
    model = zeroshot_head(build_model(ModelConfig(arch="cliptune-tiny-vit")), CLASSES, TEMPLATES)
    cfg = FinetuneConfig(lock_image=True, lock_text=True, lock_image_patterns="!class_weights")
    assert apply_locking(model, cfg) == ["text"]
    assert {n for n, p in model.named_parameters() if p.requires_grad and model.tower_of(n) != "shared"} == {
        "class_weights"
    }


def test_save_load_round_trip_offline(base, image_files, tmp_path: Path) -> None:
    model = zeroshot_head(base, CLASSES, TEMPLATES)
    with torch.no_grad():  # away from the zero-shot init, so a loaded head cannot pass by being re-initialised
        model.class_weights.add_(0.1 * torch.randn_like(model.class_weights))
    folder = save_model(model, tmp_path / "saved")
    assert '"T-shirt/top"' in (folder / SPEC_FILE).read_text()
    loaded = load_model(folder)
    assert isinstance(loaded, ClassifierModel) and loaded.spec() == model.spec()
    assert loaded.class_names == CLASSES
    assert torch.equal(logits_of(loaded, image_files), logits_of(model, image_files))
    tokens = base.tokenize(CLASSES)
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))


def test_wrong_heads_are_clear_errors(base) -> None:
    with pytest.raises(ModelError, match=r"shape \(classes, embedding size\) = \(2, D\), got \(3, 64\)"):
        ClassifierModel(base, ["a", "b"], torch.zeros(3, 64))
    with pytest.raises(ModelError, match="repeated: 'a'"):
        ClassifierModel(base, ["a", "b", "a"], torch.zeros(3, 64))
    with pytest.raises(ModelError, match=re.escape("'{}'")):
        zeroshot_head(base, ["a"], ["a photo"])
    model = ClassifierModel(base, ["a", "b"], torch.zeros(2, 32))
    with pytest.raises(ModelError, match="size 64 but the class weights 32"):
        model.classify(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ModelError, match="not a model family"):
        build_model(ModelConfig(backend="classifier"))


def test_dense_token_features_are_the_bases(base, image_files) -> None:
    if "encode_image_tokens" not in type(base).__dict__:
        pytest.skip("this base model gives no dense token features")
    model = zeroshot_head(base, CLASSES, TEMPLATES)
    images, tokens = pixels(base, image_files), base.tokenize(CLASSES)
    with torch.no_grad():
        for got, want in zip(model.encode_image_tokens(images), base.encode_image_tokens(images)):
            assert torch.equal(got, want)
        for got, want in zip(model.encode_text_tokens(tokens), base.encode_text_tokens(tokens)):
            assert torch.equal(got, want)
