"""Typed configuration of a whole run: dataclasses, YAML load/dump, dotted overrides and validation.

The dataclasses are the single source of truth: the loader checks every key and value against them before
any work starts, and the resolved config written into a run directory loads back unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import math
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A config key or value a user got wrong; the message names the key, the value and what is allowed."""


# The name of the validation set cut from the training table by data.validation_split.
VALIDATION_SPLIT = "validation"


def _choice(default: str, *choices: str, doc: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "doc": doc})


def _registered(default: str, registry: str, *extra: str, doc: str = "") -> Any:
    """A name looked up in a registry (`module:TABLE`), so the table is the one list of the allowed names and an
    extension that adds an entry is accepted here too; `extra` names (such as "none") are allowed besides."""
    return field(default=default, metadata={"registry": registry, "extra": extra, "doc": doc})


def choices_of(f: dataclasses.Field) -> tuple[str, ...]:
    """The allowed values of a config field: its fixed choices, or the names in its registry now."""
    if "registry" not in f.metadata:
        return tuple(f.metadata.get("choices", ()))
    module, _, table = f.metadata["registry"].partition(":")
    return (*f.metadata["extra"], *getattr(importlib.import_module(module), table))


def _doc(default: Any = dataclasses.MISSING, doc: str = "", **kw: Any) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"doc": doc}, **kw)
    return field(default=default, metadata={"doc": doc}, **kw)


@dataclass
class TowerConfig:
    """One pretrained unimodal tower of a composed dual encoder."""

    source: str = _doc(doc="image: timm, torchvision, hf, efficientnet-lite; text: hf, sentence-transformers")
    name: str = _doc(doc="model name in that library, a hub id, or a local folder")
    pretrained: bool = _doc(True, "load the tower's pretrained weights (false: random init)")
    weights: str | None = _doc(None, "local weights file or folder to load instead of the library's download")
    pooling: str = _choice("mean", "mean", "cls", doc="text towers: mean of token states or the first token")


@dataclass
class ModelConfig:
    preset: str | None = _doc(None, "a named whole model spec (see `cliptune models`); explicit keys override it")
    backend: str = _registered("openclip", "cliptune.models:BACKENDS", doc="which model family builds the model")
    arch: str = _doc("cliptune-tiny-vit", "openclip: architecture name; hf: hub id or local folder")
    pretrained: str | None = _doc(None, "openclip: pretrained tag or local checkpoint file; null: random init")
    image_tower: TowerConfig | None = _doc(None, "composed backend: the image tower")
    text_tower: TowerConfig | None = _doc(None, "composed backend: the text tower")
    head: str = _choice("linear", "linear", "mlp", doc="composed backend: projection head of each tower")
    embed_dim: int = _doc(256, "composed backend: shared embedding size")
    init_temperature: float = _doc(0.07, "composed backend: initial softmax temperature (logit_scale = log 1/T)")
    init: str | None = _doc(None, "start from a saved model or run directory instead of the pretrained weights")
    image_size: int | None = _doc(
        None,
        "image input size in pixels (e.g. 384 from a 224 checkpoint): position embeddings are interpolated as "
        "open_clip / timm / transformers do, the transforms follow and the saved model records it; null: the model's",
    )
    drop_path: float = _doc(
        0.0,
        "stochastic depth of the image tower's residual blocks, rising linearly to this rate at the last block; 0 "
        "also turns off what a tower's library builds in (efficientnet-lite's drop connect 0.2)",
    )

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"model.image_size: {self.image_size!r} must be a positive number of pixels, or null")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"model.drop_path: {self.drop_path!r} must be in [0, 1)")
        if self.backend == "composed" and (self.image_tower is None or self.text_tower is None):
            raise ConfigError("model: the composed backend needs both model.image_tower and model.text_tower")


@dataclass
class TableSpec:
    """An image-caption table (CSV, TSV or JSONL)."""

    path: str = _doc(doc="table file: .csv, .tsv, .jsonl, or COCO captions / Karpathy-split .json")
    name: str = _doc("", "name used in metrics and results (defaults to the file stem)")
    image_key: str = _doc("image", "column holding the image path")
    caption_key: str = _doc("caption", "column holding one caption or a list of captions")
    images_root: str | None = _doc(None, "folder image paths are relative to (default: the table's folder)")
    split: str | None = _doc(None, "Karpathy-split JSON (dataset_coco.json) only: e.g. train, val, test, train+restval")
    negatives_key: str | None = _doc(
        None, "training: column of hard-negative captions (a list, or `|`-separated) used instead of generated ones"
    )

    def __post_init__(self) -> None:
        _check_path(self.path)
        if not self.name:
            self.name = Path(self.path).stem
        if self.split and not self.path.endswith(".json"):
            raise ConfigError(f"{self.name}.split: {self.split!r} only applies to a Karpathy-split .json file")


@dataclass
class ZeroShotSpec:
    """A labelled image set for zero-shot classification: a folder per class, or a `path label` list file."""

    path: str = _doc(doc="folder with one sub-folder per class, or a list file of `path label` lines")
    name: str = _doc("", "name used in metrics and results (defaults to the folder or file stem)")
    images_root: str | None = _doc(None, "folder that list-file paths are relative to (default: the file's folder)")
    classnames: list[str] | None = _doc(None, "class names in label order (default: folder names / labels)")
    templates: list[str] = _doc(
        doc="prompt templates with one `{}` for the class name", default_factory=lambda: ["a photo of a {}."]
    )

    def __post_init__(self) -> None:
        _check_path(self.path)
        if not self.name:
            self.name = Path(self.path).stem
        if not self.templates:
            raise ConfigError(
                f"eval.zeroshot[{self.name}].templates: empty; give at least one, e.g. 'a photo of a {{}}.'"
            )
        for t in self.templates:
            _check_template(t, f"eval.zeroshot[{self.name}].templates")


def _check_path(path: str) -> None:
    """A data set's `path` must name something: an empty one would read the current folder."""
    if not path.strip():
        raise ConfigError("path: empty; give the file or folder of this data set")


def _check_template(template: str, key: str) -> None:
    """Exactly one empty `{}` slot: the class name goes there (`str.format` would fail or drop it otherwise)."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ConfigError(f"{key}: {template!r} is not a template ({e}); write literal braces as {{{{ }}}}") from None
    if not fields:
        raise ConfigError(f"{key}: {template!r} has no '{{}}' for the class name")
    if fields != [""]:
        raise ConfigError(
            f"{key}: {template!r} has {len(fields)} slot(s) {fields}; it needs exactly one '{{}}' for the class name"
        )


@dataclass
class CompositionalitySpec:
    """Images with a true caption and false ones (SugarCrepe / ARO form); build one with `cliptune compositionality`."""

    path: str = _doc(doc="CSV, TSV or JSONL with columns image, caption, negatives")
    name: str = _doc("", "name used in metrics and results (defaults to the file stem)")
    images_root: str | None = _doc(None, "folder image paths are relative to (default: the table's folder)")
    image_key: str = _doc("image", "column holding the image path")
    caption_key: str = _doc("caption", "column holding the true caption")
    negatives_key: str = _doc("negatives", "column holding the false captions (a list, or `|`-separated text)")

    def __post_init__(self) -> None:
        _check_path(self.path)
        if not self.name:
            self.name = Path(self.path).stem


def _unit_interval(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}: {value!r} is a probability; it must be in [0, 1]")


def _at_least(key: str, value: float, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(f"{key}: {value!r} must be >= {minimum}")


def _at_most(key: str, value: float, maximum: int, why: str) -> None:
    if value > maximum:
        raise ConfigError(f"{key}: {value!r} must be <= {maximum}: {why}")


def _range_pair(key: str, value: list[float] | None, upper: float | None = None) -> None:
    if value is None:
        return
    if len(value) != 2 or not 0.0 < value[0] <= value[1] or (upper is not None and value[1] > upper):
        limit = f", at most {upper}" if upper is not None else ""
        raise ConfigError(f"{key}: {value!r} must be [low, high] with 0 < low <= high{limit}")


# Prefixes of the policy strings timm's transform factory reads, plus torchvision's TrivialAugment (timm has none).
AUTO_AUGMENT_PREFIXES = ("rand", "augmix", "original", "v0", "3a", "trivialaugment")


# timm's RandomErasing draws 1..re_count boxes that share the erased area (2% to 1/3 of the image): at 16 the smallest
# is about 8 x 8 pixels of a 224-pixel image, past that boxes shrink towards single pixels, and the time grows with
# the count (a loop per box in every training image).
MAX_ERASE_BOXES = 16
_TOO_MANY_BOXES = (
    "the boxes share the erased area, so more would be only a few pixels each, and each costs time on every "
    "training image (timm's default is 1)"
)


@dataclass
class AugmentConfig:
    """Training-image augmentation by timm's transform factory (`timm.data.create_transform`); evaluation untouched.

    Key names are `create_transform`'s. Each sample is augmented from a seed of (runtime.seed, epoch, index).
    """

    scale: list[float] = _doc(doc="random-resized-crop area range, as fractions", default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = _doc(doc="random-resized-crop aspect-ratio range", default_factory=lambda: [0.75, 4 / 3])
    hflip: float | None = _doc(
        None, "horizontal-flip probability; null: 0.5 for data.labelled, 0 for captions (where left/right matter)"
    )
    auto_augment: str | None = _doc(
        None,
        "policy: a timm string (rand-m9-mstd0.5-inc1 RandAugment, augmix-m5-w4-d2, original AutoAugment) or "
        "trivialaugment (torchvision's TrivialAugmentWide); null: none",
    )
    color_jitter: float | None = _doc(
        0.4, "colour-jitter strength (brightness, contrast, saturation); timm skips it under auto_augment; null: off"
    )
    interpolation: str | None = _doc(None, "crop resize: bicubic, bilinear, random; null: the model's own")
    re_prob: float = _doc(0.0, "random-erasing probability (after normalisation)")
    re_mode: str = _choice(
        "pixel",
        "pixel",
        "rand",
        "const",
        doc="random erasing fills with per-pixel noise, one noise colour per box, or zeros",
    )
    re_count: int = _doc(1, f"random erasing: at most this many boxes per image (1 to {MAX_ERASE_BOXES})")

    def __post_init__(self) -> None:
        _range_pair("data.augment.scale", self.scale, upper=1.0)
        _range_pair("data.augment.ratio", self.ratio)
        for key in ("hflip", "re_prob"):
            if getattr(self, key) is not None:
                _unit_interval(f"data.augment.{key}", getattr(self, key))
        if self.color_jitter is not None and self.color_jitter < 0:
            raise ConfigError(f"data.augment.color_jitter: {self.color_jitter!r} must be >= 0, or null for none")
        policy = self.auto_augment
        if policy is not None and not policy.startswith(AUTO_AUGMENT_PREFIXES):
            raise ConfigError(
                f"data.augment.auto_augment: {policy!r} is not a policy; start it with one of "
                f"{', '.join(AUTO_AUGMENT_PREFIXES)} (e.g. rand-m9-mstd0.5-inc1)"
            )
        # timm's parser skips a section without a number silently (`rand-m9-n` is `rand-m9`): refuse it here.
        loose = [part for part in (policy or "").split("-")[1:] if not re.fullmatch(r"[a-z]+\d.*", part)]
        if loose:
            raise ConfigError(
                f"data.augment.auto_augment: {policy!r}: section {loose[0]!r} is not a key followed by a number "
                "(e.g. m9, n2, mstd0.5); timm would ignore it"
            )
        if self.interpolation not in (None, "bicubic", "bilinear", "random", "nearest"):
            raise ConfigError(f"data.augment.interpolation: {self.interpolation!r}; use bicubic, bilinear or random")
        _at_least("data.augment.re_count", self.re_count, 1)
        _at_most("data.augment.re_count", self.re_count, MAX_ERASE_BOXES, _TOO_MANY_BOXES)


@dataclass
class MixupConfig:
    """Mixup / CutMix of training images and their labels by timm's `Mixup` (loss.name ce); key names are its."""

    mixup_alpha: float = _doc(0.0, "mixup Beta(alpha, alpha); 0: off")
    cutmix_alpha: float = _doc(0.0, "cutmix Beta(alpha, alpha); 0: off")
    cutmix_minmax: list[float] | None = _doc(None, "cutmix box size range as fractions of the image (turns cutmix on)")
    prob: float = _doc(1.0, "probability that a pair of samples is mixed at all")
    switch_prob: float = _doc(0.5, "with both on: probability of cutmix instead of mixup")

    def __post_init__(self) -> None:
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.mixup.{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        _range_pair("data.mixup.cutmix_minmax", self.cutmix_minmax, upper=1.0)
        _unit_interval("data.mixup.prob", self.prob)
        _unit_interval("data.mixup.switch_prob", self.switch_prob)

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None


@dataclass
class DataConfig:
    train: TableSpec | None = _doc(None, "training image-caption table")
    labelled: ZeroShotSpec | None = _doc(
        None,
        "training on labelled images: loss.name ce (FT-CLIP head), or a contrastive loss on class prompts (FLYP)",
    )
    shards: str | None = _doc(
        None, "training from webdataset shards (folder written by `cliptune shards`, brace pattern or URL)"
    )
    shard_resample: bool = _doc(False, "shards: draw shards with replacement (needs data.samples_per_epoch)")
    samples_per_epoch: int | None = _doc(None, "shards: samples per epoch (default: all samples of the manifest)")
    shuffle_buffer: int = _doc(1000, "shards: samples in the shuffle buffer")
    shard_caption_key: str = _doc("captions", "shards: key of each sample's json holding its caption(s)")
    augment: AugmentConfig | None = _doc(
        None, "training-image augmentation by timm's pipeline (a mapping, even {}); null: the model's own train crop"
    )
    mixup: MixupConfig = field(default_factory=MixupConfig)
    validation_split: float = _doc(
        0.0,
        "fraction of the training table held back as the validation set `validation` (images sharing a caption "
        "stay together, so its captions never occur in training); 0: none",
    )

    def __post_init__(self) -> None:
        given = [k for k in ("train", "labelled", "shards") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ConfigError(f"data: set only one of data.train, data.labelled, data.shards (got {', '.join(given)})")
        if self.shard_resample and self.samples_per_epoch is None:
            raise ConfigError("data.shard_resample: resampled shards need data.samples_per_epoch")
        if not 0.0 <= self.validation_split < 1.0:
            raise ConfigError(f"data.validation_split: {self.validation_split!r} must be in [0, 1)")
        if self.validation_split and self.train is None:
            raise ConfigError("data.validation_split: only a caption table (data.train) can be split")


@dataclass
class EvalConfig:
    retrieval: list[TableSpec] = _doc(doc="retrieval sets", default_factory=list)
    zeroshot: list[ZeroShotSpec] = _doc(doc="zero-shot classification sets", default_factory=list)
    compositionality: list[CompositionalitySpec] = _doc(
        doc="true-vs-false caption sets: accuracy of ranking the true caption first", default_factory=list
    )
    batch_size: int = _doc(64, "images or captions per forward pass at evaluation")
    wise_alphas: list[float] = _doc(
        doc="WiSE-FT: after training, evaluate (1-a)*initial + a*fine-tuned weights for each a",
        default_factory=list,
    )
    validation: list[TableSpec | ZeroShotSpec] = _doc(
        doc="validation sets (caption tables or labelled images, read like `cliptune eval --data`): used for "
        "train.select, early stopping and eval.wise_select, reported apart from the held-out sets above",
        default_factory=list,
    )
    every_epochs: int | None = _doc(None, "evaluate every N epochs (null: every epoch, unless eval.every_steps is set)")
    every_steps: int | None = _doc(None, "evaluate every N optimizer steps (null: at epoch ends only)")
    wise_select: bool = _doc(
        False, "WiSE-FT: model/ is the eval.wise_alphas interpolation that is best on the selection metric"
    )


@dataclass
class LoraConfig:
    """Low-rank adapters on the attention and MLP projections of both towers."""

    rank: int = _doc(0, "adapter rank; 0 turns LoRA off")
    alpha: float = _doc(16.0, "scale of the adapter update is alpha / rank")
    dropout: float = _doc(0.0, "dropout on the adapter input")
    targets: list[str] = _doc(
        doc="module-name patterns (whole dotted components) that get adapters; empty: the backend's own "
        "attention and MLP blocks",
        default_factory=list,
    )
    towers: list[str] = _doc(doc="towers that get adapters (image, text)", default_factory=lambda: ["image", "text"])

    def __post_init__(self) -> None:
        unknown = sorted(set(self.towers) - {"image", "text"})
        if unknown:
            raise ConfigError(f"finetune.lora.towers: {unknown} unknown; choose among image, text")


@dataclass
class FinetuneConfig:
    lock_image: bool = _doc(False, "freeze the whole image tower")
    lock_text: bool = _doc(False, "freeze the whole text tower")
    lock_image_patterns: str = _doc(
        "",
        "partial locking, comma-separated: `name` locks, `!name` unlocks (whole dotted components), after lock_image",
    )
    lock_text_patterns: str = _doc("", "the same for the text tower, after lock_text")
    heads: str = _registered(
        "none", "cliptune.models.heads:HEADS", "none", doc="new projection heads on top of the model's embeddings"
    )
    lora: LoraConfig = field(default_factory=LoraConfig)
    prompt_tokens: int = _doc(0, "learnable context vectors after the text start token; 0 turns prompt tuning off")
    ema_decay: float | None = _doc(None, "EMA of the trainable weights, e.g. 0.999; evaluation uses the EMA weights")

    def __post_init__(self) -> None:
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"finetune.ema_decay: {self.ema_decay!r} must be between 0 and 1 (exclusive), or null")


@dataclass
class LossConfig:
    name: str = _registered(
        "clip",
        "cliptune.losses:OBJECTIVES",
        doc="training objective: CLIP InfoNCE, SigLIP sigmoid, NegCLIP / FSC-CLIP hard negatives, UniCL label-aware "
        "targets, ce = cross-entropy through a zero-shot-initialised class head (FT-CLIP, data.labelled)",
    )
    local_loss: bool = _doc(True, "multi-process: each rank computes its rows against the gathered batch only")
    hard_negatives: int = _doc(1, "negclip / fsc: hard-negative captions per caption")
    negative_kinds: list[str] = _doc(
        doc="generated negatives: swap (same-kind spans), replace (antonyms, co-hyponyms, prepositions), shuffle",
        default_factory=lambda: ["swap", "replace", "shuffle"],
    )
    tagger: str = _choice("auto", "auto", "spacy", "rules", doc="part-of-speech tagger for generated negatives")
    global_weight: float = _doc(0.5, "fsc: weight of the global hard-negative loss")
    local_weight: float = _doc(0.2, "fsc: weight of the local (token-level) hard-negative loss; 0 turns it off")
    focal_gamma: float = _doc(2.0, "fsc: focal-loss gamma of the hard-negative losses")
    negative_smoothing: float = _doc(0.02, "fsc: label smoothing of the hard-negative losses")
    label_smoothing: float = _doc(0.1, "ce: label smoothing of the classification loss")
    siglip_bias_init: float = _doc(-10.0, "siglip: initial logit bias when the model has none")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.negative_kinds) - {"swap", "replace", "shuffle"})
        if unknown:
            raise ConfigError(f"loss.negative_kinds: {unknown} unknown; choose among swap, replace, shuffle")
        _at_least("loss.hard_negatives", self.hard_negatives, 1)


@dataclass
class SelectConfig:
    """Which evaluation picks the weights that become the run's model/ (best checkpoint)."""

    metric: str | None = _doc(
        None,
        "SET/METRIC, e.g. validation/mean_recall (null: the first validation set, else the first retrieval set's "
        "mean_recall or the first zero-shot set's acc1)",
    )
    mode: str = _choice("max", "max", "min", doc="whether larger or smaller values of the metric are better")

    def __post_init__(self) -> None:
        if self.metric is not None and (self.metric.count("/") != 1 or not all(self.metric.split("/"))):
            raise ConfigError(f"train.select.metric: {self.metric!r} must look like SET/METRIC, e.g. val/mean_recall")


@dataclass
class EarlyStoppingConfig:
    """Stop when the selection metric has not improved for `patience` evaluations in a row."""

    patience: int = _doc(3, "evaluations without improvement before training stops")
    min_delta: float = _doc(0.0, "smallest change of the selection metric that counts as an improvement")

    def __post_init__(self) -> None:
        _at_least("train.early_stopping.patience", self.patience, 1)
        _at_least("train.early_stopping.min_delta", self.min_delta, 0)


@dataclass
class TrainConfig:
    epochs: int = _doc(3, "passes over the training table")
    batch_size: int = _doc(32, "contrastive batch size (images per step)")
    chunk_size: int | None = _doc(
        None, "largest piece of the batch that goes through the towers at once (GradCache); null: the whole batch"
    )
    keep_checkpoints: int = _doc(
        2, "how many resume checkpoints to keep (the newest); 0: none, so the run cannot be resumed"
    )
    checkpoint_every_steps: int | None = _doc(
        None, "also write a resume checkpoint every N optimizer steps, mid-epoch included (null: at epoch ends only)"
    )
    select: SelectConfig = field(default_factory=SelectConfig)
    early_stopping: EarlyStoppingConfig | None = _doc(
        None, "stop on the selection metric (train.select); null: train every epoch"
    )
    cache_locked: bool = _doc(
        True, "run each input through a locked tower once and reuse its output (that tower sees no augmentation)"
    )
    grad_checkpointing: bool = _doc(False, "recompute tower activations in the backward pass (less memory, slower)")


@dataclass
class OptimConfig:
    lr: float = _doc(1.0e-4, "peak learning rate")
    weight_decay: float = _doc(0.2, "weight decay (never on biases, norms, 1-D params, logit_scale)")
    optimizer: str = _registered(
        "adamw",
        "cliptune.train.optim:OPTIMIZERS",
        doc="torch AdamW, SGD with momentum (linear probes), or timm's LAMB / Lion",
    )
    momentum: float = _doc(0.9, "sgd: momentum")
    warmup_steps: int = _doc(10, "linear warm-up steps before the cosine decay")
    warmup_epochs: float | None = _doc(None, "warm-up in epochs (may be fractional); when set it replaces warmup_steps")
    grad_clip: float | None = _doc(5.0, "max global gradient norm; null disables clipping")
    beta1: float = _doc(0.9, "AdamW / LAMB / Lion beta1")
    beta2: float = _doc(0.98, "AdamW / LAMB / Lion beta2 (Lion's authors use 0.99)")
    eps: float = _doc(1.0e-6, "AdamW / LAMB epsilon")
    schedule: str = _choice("cosine", "cosine", "constant", doc="lr after warm-up")
    layer_decay_image: float = _doc(1.0, "layer-wise lr decay of the image tower (1.0: none)")
    layer_decay_text: float = _doc(1.0, "layer-wise lr decay of the text tower (1.0: none)")
    lr_image: float | None = _doc(None, "peak lr of the image tower (null: optim.lr)")
    lr_text: float | None = _doc(None, "peak lr of the text tower (null: optim.lr)")
    weight_decay_image: float | None = _doc(None, "weight decay of the image tower (null: optim.weight_decay)")
    weight_decay_text: float | None = _doc(None, "weight decay of the text tower (null: optim.weight_decay)")


@dataclass
class RuntimeConfig:
    output_dir: str = _doc("runs", "parent folder of run directories")
    device: str = _doc("auto", "auto, cpu, cuda or cuda:N")
    precision: str = _choice("fp32", "fp32", "bf16", doc="bf16 runs the forward pass under autocast")
    seed: int = _doc(0, "seed for weights, data order, captions drawn and augmentation")
    workers: int = _doc(0, "data-loader worker processes")
    log_every: int = _doc(10, "steps between log lines in metrics and TensorBoard")
    progress: bool = _doc(True, "show a progress bar")
    feature_cache: str | None = _doc(
        None, "folder that keeps locked-tower outputs across runs (null: keep them for this run only)"
    )
    compile: bool = _doc(False, "torch.compile the training forward pass")
    channels_last: bool = _doc(False, "channels-last memory format for images and the image tower (pays for convnets)")

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.device):
            raise ConfigError(f"runtime.device: {self.device!r} is not allowed; use auto, cpu, cuda or cuda:N")


@dataclass
class RunConfig:
    name: str = _doc("run", "run directory name under runtime.output_dir")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runtime.output_dir) / self.name


_POSITIVE = {
    ("train", "epochs"),
    ("train", "batch_size"),
    ("eval", "batch_size"),
    ("runtime", "log_every"),
}
_NON_NEGATIVE = {
    ("optim", "lr"),
    ("optim", "weight_decay"),
    ("optim", "warmup_steps"),
    ("runtime", "workers"),
    ("train", "keep_checkpoints"),
}
# null or >= 1
_EVERY = {("eval", "every_epochs"), ("eval", "every_steps"), ("train", "checkpoint_every_steps")}


# ---------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with a type check at every key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if set(args) == {TableSpec, ZeroShotSpec}:
            return _coerce(value, _eval_set_kind(value), key)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and tp in (TableSpec, ZeroShotSpec):
            value = {"path": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2**63:  # torch and numpy hold 64-bit integers
                raise ConfigError(f"{key}: {value} is too large")
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp} at {key}")


def _eval_set_kind(value: Any) -> type:
    """A caption table or a labelled image set, decided as `cliptune eval --data` decides: a class folder, a `.txt`
    list, or an entry with templates / classnames is labelled images; anything else is a caption table."""
    if isinstance(value, (TableSpec, ZeroShotSpec)):
        return type(value)
    spec = {"path": value} if isinstance(value, str) else value
    if not isinstance(spec, dict):
        return TableSpec  # the table coercion names the problem
    path = str(spec.get("path", ""))
    labelled = "templates" in spec or "classnames" in spec or path.endswith(".txt") or Path(path).is_dir()
    return ZeroShotSpec if labelled else TableSpec


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(str(key), names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    where = f"{prefix}.{key}" if prefix else key
    return ConfigError(f"unknown config key {where!r}{hint} (allowed: {', '.join(names)})")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and ill-typed values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(cls, key, prefix)
        full = f"{prefix}.{key}" if prefix else key
        coerced = _coerce(value, hints[key], full)
        choices = choices_of(fields[key])
        if choices and coerced not in choices:
            raise ConfigError(f"{full}: {coerced!r} is not allowed; choose one of {', '.join(choices)}")
        kwargs[key] = coerced
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix or 'config'}: missing required key(s) {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}: {e}" if prefix and not str(e).startswith(prefix) else str(e)) from None


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Overrides, validation, load and dump


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply `a.b.c=value` to nested plain data; the value is read as the type of the field it sets.

    A string field takes the text as written (`finetune.lock_image_patterns=!attnpool,!layer4` needs no quotes);
    numbers and booleans are read as YAML scalars; a list takes `[a, b]` or `a,b`; a section takes `{k: v}`.
    """
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value, e.g. optim.lr=1e-4")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    try:
        tp = _field_type(parts)
        value = _parse_override(raw, tp, ".".join(parts))
    except ConfigError as e:
        raise ConfigError(f"override {override!r}: {e}") from None
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass a field holds (directly or as `X | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
    return inner[0] if inner and typing.get_origin(tp) is not list else None


def _field_type(parts: list[str]) -> Any:
    cls: type | None = RunConfig
    tp: Any = RunConfig
    for i, part in enumerate(parts):
        if cls is None:
            raise ConfigError(f"{'.'.join(parts[:i])} is a value, not a section")
        if part not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown_key(cls, part, ".".join(parts[:i]))
        tp = typing.get_type_hints(cls)[part]
        cls = _dataclass_in(tp)
    return tp


def _parse_override(raw: str, tp: Any, key: str) -> Any:
    text = raw.strip()
    if text.startswith("!!"):
        raise ConfigError(f"{key}: {raw!r} is a YAML tag; overrides take plain values")
    args = typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)
    inner = [a for a in args if a is not type(None)]
    if type(None) in args and text in ("", "null", "~"):
        return None
    target = inner[0] if len(inner) == 1 else None
    if target is str:
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        return _yaml_value(text, key, tp) if quoted else raw
    if typing.get_origin(target) is list:
        if text.startswith(("[", "{")):
            return _yaml_value(text, key, tp)
        return [item.strip() for item in text.split(",")] if text else []
    if target is not None and dataclasses.is_dataclass(target):
        return _yaml_value(text, key, tp) if text.startswith("{") else raw
    value = _yaml_value(text, key, tp)
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{key}: expected a single {_type_name(tp)}, got {raw!r}")
    return value


def _yaml_value(text: str, key: str, tp: Any) -> Any:
    from cliptune.utils.safe_yaml import YamlError, loads

    try:
        return loads(text, key)
    except YamlError as e:
        raise ConfigError(f"{e}; expected a {_type_name(tp)}") from None


def _check_ranges(cfg: RunConfig) -> None:
    for section, key in _POSITIVE | _NON_NEGATIVE:
        value = getattr(getattr(cfg, section), key)
        limit_ok = value > 0 if (section, key) in _POSITIVE else value >= 0
        if not limit_ok:
            bound = "> 0" if (section, key) in _POSITIVE else ">= 0"
            raise ConfigError(f"{section}.{key}: {value!r} is not allowed; it must be {bound}")
    for section, key in _EVERY:
        value = getattr(getattr(cfg, section), key)
        if value is not None and value < 1:
            raise ConfigError(f"{section}.{key}: {value!r} must be >= 1, or null")
    if cfg.train.chunk_size is not None and cfg.train.chunk_size < 1:
        raise ConfigError(f"train.chunk_size: {cfg.train.chunk_size!r} must be >= 1, or null for the whole batch")
    if cfg.optim.grad_clip is not None and cfg.optim.grad_clip <= 0:
        raise ConfigError(f"optim.grad_clip: {cfg.optim.grad_clip!r} must be > 0, or null to disable clipping")
    sets = (*cfg.eval.validation, *cfg.eval.retrieval, *cfg.eval.zeroshot, *cfg.eval.compositionality)
    names = [s.name for s in sets]
    names += [VALIDATION_SPLIT] if cfg.data.validation_split else []
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"eval: set name(s) {', '.join(dupes)} used twice; give each set a distinct `name`")
    metric = cfg.train.select.metric
    if metric is not None and metric.split("/")[0] not in names:
        raise ConfigError(
            f"train.select.metric: {metric!r} names no eval set; the sets are {', '.join(names) or '(none)'}"
        )
    if cfg.eval.wise_select and not cfg.eval.wise_alphas:
        raise ConfigError("eval.wise_select: list the alphas to choose from in eval.wise_alphas, e.g. [0.5, 0.8, 1.0]")
    if any(not 0.0 <= a <= 1.0 for a in cfg.eval.wise_alphas):
        raise ConfigError(f"eval.wise_alphas: {cfg.eval.wise_alphas!r}: every alpha must be in [0, 1]")
    for key in ("layer_decay_image", "layer_decay_text"):
        if not 0.0 < getattr(cfg.optim, key) <= 1.0:
            raise ConfigError(f"optim.{key}: {getattr(cfg.optim, key)!r} must be in (0, 1]")
    if cfg.optim.warmup_epochs is not None and cfg.optim.warmup_epochs < 0:
        raise ConfigError(f"optim.warmup_epochs: {cfg.optim.warmup_epochs!r} must be >= 0, or null")
    if "/" in cfg.name or not cfg.name.strip():
        raise ConfigError(f"name: {cfg.name!r} must be a non-empty folder name without '/'")
    _check_limits(cfg)
    _check_applicability(cfg)


# (section path, key) -> (lowest, highest, whether the bounds themselves are allowed); None values are not checked.
_LIMITS: dict[tuple[str, str], tuple[float, float, bool, bool]] = {
    ("optim", "lr_image"): (0, math.inf, True, False),
    ("optim", "lr_text"): (0, math.inf, True, False),
    ("optim", "weight_decay_image"): (0, math.inf, True, False),
    ("optim", "weight_decay_text"): (0, math.inf, True, False),
    ("optim", "eps"): (0, math.inf, False, False),
    ("optim", "beta1"): (0, 1, True, False),
    ("optim", "beta2"): (0, 1, True, False),
    ("finetune.lora", "rank"): (0, math.inf, True, False),
    ("finetune.lora", "alpha"): (0, math.inf, False, False),
    ("finetune.lora", "dropout"): (0, 1, True, False),
    ("finetune", "prompt_tokens"): (0, math.inf, True, False),
    ("data", "samples_per_epoch"): (0, math.inf, False, False),
    ("data", "shuffle_buffer"): (0, math.inf, False, False),
    ("loss", "label_smoothing"): (0, 1, True, False),
    ("loss", "negative_smoothing"): (0, 1, True, False),
    ("loss", "focal_gamma"): (0, math.inf, True, False),
    ("loss", "global_weight"): (0, math.inf, True, False),
    ("loss", "local_weight"): (0, math.inf, True, False),
    ("model", "embed_dim"): (0, math.inf, False, False),
    ("model", "init_temperature"): (0, math.inf, False, False),
    ("runtime", "seed"): (0, 2**32 - 1, True, True),  # numpy seeds are 32-bit
}


def _check_limits(cfg: RunConfig) -> None:
    for (section, key), (low, high, low_ok, high_ok) in _LIMITS.items():
        node: Any = cfg
        for part in section.split("."):
            node = getattr(node, part)
        value = getattr(node, key)
        if value is None:
            continue
        if not ((value > low or (low_ok and value == low)) and (value < high or (high_ok and value == high))):
            lower, upper = "[" if low_ok else "(", "]" if high_ok else ")"
            raise ConfigError(f"{section}.{key}: {value!r} is out of range; it must be in {lower}{low}, {high}{upper}")
    _check_name(cfg.name)
    if cfg.data.samples_per_epoch is not None and cfg.data.shards is None:
        raise ConfigError(
            "data.samples_per_epoch: applies to data.shards only (a table's epoch is one pass over it); remove it, "
            "or change train.epochs"
        )


def _check_name(name: str) -> None:
    if name != name.strip() or name in (".", "..") or any(c in name for c in "/\\\0") or Path(name).is_absolute():
        raise ConfigError(f"name: {name!r} must be a plain folder name (no '/', '\\', '..' or surrounding spaces)")


# key -> (the setting that decides whether it is used, the values where it is); a changed key that is not used warns.
# (Which `loss.*` keys an objective reads is its own entry's `settings`, checked in `check_training`.)
_APPLIES: dict[str, tuple[str, tuple[Any, ...]]] = {
    "model.pretrained": ("model.backend", ("openclip",)),
    "model.image_tower": ("model.backend", ("composed",)),
    "model.text_tower": ("model.backend", ("composed",)),
    "model.head": ("model.backend", ("composed",)),
    "model.embed_dim": ("model.backend", ("composed",)),
    "model.init_temperature": ("model.backend", ("composed",)),
    "finetune.lora.alpha": ("finetune.lora.rank", ()),
    "finetune.lora.dropout": ("finetune.lora.rank", ()),
    "finetune.lora.targets": ("finetune.lora.rank", ()),
    "finetune.lora.towers": ("finetune.lora.rank", ()),
    "data.shard_resample": ("data.shards", ()),
    "data.shuffle_buffer": ("data.shards", ()),
    "data.shard_caption_key": ("data.shards", ()),
    "optim.momentum": ("optim.optimizer", ("sgd",)),
    "optim.beta1": ("optim.optimizer", ("adamw", "lamb", "lion")),
    "optim.beta2": ("optim.optimizer", ("adamw", "lamb", "lion")),
    "optim.eps": ("optim.optimizer", ("adamw", "lamb")),
}


def _check_applicability(cfg: RunConfig) -> None:
    """Warn, naming the key, about a changed setting that the chosen backend, loss or data source does not use."""
    import logging

    defaults = RunConfig()
    for key, (decider, values) in _APPLIES.items():
        setting = _dotted(cfg, decider)
        used = bool(setting) if not values else setting in values
        if not used and _dotted(cfg, key) != _dotted(defaults, key):
            when = f"{decider} is {' or '.join(map(str, values))}" if values else f"{decider} is set (non-zero)"
            logging.getLogger("cliptune").warning("%s: has no effect unless %s (it is %r)", key, when, setting)


def _warn_unused(section: Any, used: tuple[str, ...], prefix: str, why: str) -> None:
    """Warn about each key of `section` changed from its default that nothing reads (`used` and the always-read)."""
    import logging

    always = {"name", "local_loss"}
    for f in dataclasses.fields(section):
        if f.name in always or f.name in used:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if getattr(section, f.name) != default:
            logging.getLogger("cliptune").warning("%s.%s: has no effect when %s", prefix, f.name, why)


def _dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_training(cfg: RunConfig) -> None:
    """The checks across sections that a training run needs, so every config error comes before any model is built:
    some training data, and what the objective (`cliptune.losses.OBJECTIVES[loss.name]`) asks of data and batches."""
    if cfg.data.train is None and cfg.data.labelled is None and cfg.data.shards is None:
        raise ConfigError(
            "data: no training data configured; set data.train.path (or data.labelled.path, or data.shards)"
        )
    from cliptune.losses import OBJECTIVES  # the objective table needs torch: loaded only when a run is checked

    name, spec = cfg.loss.name, OBJECTIVES[cfg.loss.name]
    if spec.uses_text and cfg.train.batch_size < 2:
        raise ConfigError(
            f"train.batch_size: 1 with loss.name {name}: a contrastive loss needs at least 2 images per step (the "
            "other images are each one's negatives); use 2 or more"
        )
    _warn_unused(cfg.loss, spec.settings, "loss", f"loss.name is {name}")
    if spec.labelled and cfg.data.labelled is None:
        raise ConfigError(f"loss.name {name}: classification fine-tuning needs data.labelled (a labelled image set)")
    if spec.tokens(cfg.loss) and cfg.train.chunk_size:
        raise ConfigError(
            f"loss.name {name} with its token-level loss (loss.local_weight > 0) works on whole batches: set "
            "train.chunk_size null, or loss.local_weight 0"
        )
    if cfg.data.mixup.active and not spec.mixes:
        raise ConfigError(
            f"data.mixup: mixing images and their labels needs class labels and a classification loss; "
            f"loss.name {name!r} has neither. Use loss.name ce with data.labelled, or set "
            "data.mixup.mixup_alpha and cutmix_alpha to 0"
        )
    if (spec.negatives or spec.groups) and cfg.data.shards is not None:
        raise ConfigError(
            f"loss.name {name}: hard negatives and label-aware targets read a caption table; with "
            "data.shards use loss.name clip or siglip, or train from data.train"
        )


def _expand_preset(data: dict[str, Any]) -> None:
    """Fill the model section from its preset; keys the user wrote win over the preset's."""
    model = data.get("model")
    if not isinstance(model, dict) or not model.get("preset"):
        return
    from cliptune.models.presets import PRESETS  # plain data, no torch

    name = model["preset"]
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name), list(PRESETS), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"model.preset: {name!r} is not a preset{hint} (presets: {', '.join(PRESETS)})")
    data["model"] = merge(PRESETS[name], model)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A copy of nested `base` with `extra` written over it, section by section; neither input is changed."""
    out = _deepcopy(base)
    for key, value in extra.items():
        both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both_dicts else _deepcopy(value)
    return out


def build(data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Typed, validated RunConfig from plain data plus dotted overrides."""
    data = _deepcopy(data or {})
    for override in overrides or []:
        apply_override(data, override)
    _expand_preset(data)
    cfg = from_dict(RunConfig, data)
    _check_ranges(cfg)
    return cfg


def load(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    from cliptune.utils.safe_yaml import YamlError
    from cliptune.utils.safe_yaml import load as load_yaml

    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {str(path)!r} {what}")
    try:
        data = load_yaml(path)
    except YamlError as e:
        raise ConfigError(str(e)) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return build(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    """finetune(..., optim={"lr": 1e-4}, name="x") or finetune(..., **{"optim.lr": 1e-4}) as nested data."""
    nested: dict[str, Any] = {}
    for key, value in kwargs.items():
        parts = key.replace("__", ".").split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def resolve_config(
    source: str | Path | dict[str, Any] | RunConfig, overrides: list[str] | None = None, **kwargs: Any
) -> RunConfig:
    """A config file, plain data or RunConfig, with keyword sections (`finetune()`'s) and CLI-style overrides."""
    if isinstance(source, RunConfig):
        data = to_dict(source)
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        base = load(path)  # validates the file on its own, so errors name it
        data = to_dict(base)
    return build(merge(data, _overrides(kwargs)), overrides)


def dump(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every config key: the source of `cliptune config` and README's table."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or (inner and typing.get_origin(tp) is not list):
            rows += describe(tp if dataclasses.is_dataclass(tp) else inner[0], f"{key}.")
            continue
        if typing.get_origin(tp) is list and inner:
            rows += describe(inner[0], f"{key}[].")
            continue
        doc = f.metadata.get("doc", "")
        if choices_of(f):
            doc += f" ({', '.join(choices_of(f))})"
        rows.append((key, _type_name(tp).replace(" | None", " or null"), _default_text(f), doc))
    return rows


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def markdown_table() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | `{d}` | {doc} |" for k, t, d, doc in describe()]
    return "\n".join(lines)
