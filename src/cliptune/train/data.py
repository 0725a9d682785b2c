"""Training data of a run: the table (or labelled set, or shards), its dataset with the objective's extra fields,
the hard-negative source, and the per-epoch loader."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from cliptune.config import VALIDATION_SPLIT, ConfigError, RunConfig
from cliptune.data import CaptionTable, TrainPairs, collate_skip_none, read_caption_table
from cliptune.data.datasets import NegativeSource, Transform
from cliptune.data.errors import DataError
from cliptune.data.shards import ShardStream
from cliptune.features.encoding import Encoding
from cliptune.losses import OBJECTIVES
from cliptune.losses.objective import Objective
from cliptune.models import ClipModel
from cliptune.train.distributed import SINGLE, GlobalBatchSampler, World
from cliptune.train.logging import log


def training_table(cfg: RunConfig) -> tuple[CaptionTable | None, list[int] | None]:
    """The caption table to train on; for a labelled set (FLYP, FT-CLIP) its class prompts and the labels."""
    if cfg.data.shards is not None:
        return None, None
    if cfg.data.train is not None:
        return read_caption_table(cfg.data.train), None
    from cliptune.data import read_classification

    spec = cfg.data.labelled
    assert spec is not None
    labelled = read_classification(spec)
    # FLYP: every template filled with the image's class name is one of its captions; an epoch draws one of them.
    prompts = [[t.format(name) for t in spec.templates] for name in labelled.classnames]
    table = CaptionTable(
        list(labelled.paths), [prompts[label] for label in labelled.labels], list(labelled.skipped), spec.name
    )
    return table, list(labelled.labels)


def check_enough_images(cfg: RunConfig, table: CaptionTable | None) -> None:
    """Refuse a training set that skipped rows left with fewer images than one batch, or a contrastive run on 1 image.

    A set that is simply small trains with one batch of all of it (a warning, `steps_per_epoch`); one that skips made
    small most likely has wrong paths or broken files, which a smaller batch would only hide.
    """
    if table is None or len(table) >= cfg.train.batch_size:
        return
    skipped = _skip_reasons(table)
    if skipped:
        raise DataError(
            f"training set {table.name!r}: {len(table)} usable images, fewer than one batch (train.batch_size "
            f"{cfg.train.batch_size}), after skipping {skipped}. Fix those rows (or `images_root`), or lower "
            f"train.batch_size to at most {len(table)}"
        )
    if len(table) < 2 and OBJECTIVES[cfg.loss.name].uses_text:
        raise DataError(
            f"training set {table.name!r}: 1 usable image; loss.name {cfg.loss.name} contrasts each image with the "
            "others of its batch, so it needs at least 2: add images"
        )


def _skip_reasons(table: CaptionTable) -> str:
    """'3 missing images (first: a.png), 1 unreadable image, ...' for what reading `table` skipped; '' if nothing."""
    missing = [p for p in table.skipped if not p.exists()]
    unreadable = [p for p in table.skipped if p.exists()]
    parts = [
        f"{len(paths)} {what} image{'s' * (len(paths) != 1)} (first: {paths[0]})"
        for what, paths in (("missing", missing), ("unreadable", unreadable))
        if paths
    ]
    if table.empty_captions:
        parts.append(f"{table.empty_captions} image{'s' * (table.empty_captions != 1)} with only empty captions")
    return ", ".join(parts)


def split_validation(table: CaptionTable, fraction: float, seed: int) -> tuple[CaptionTable, CaptionTable]:
    """(training part, validation part) of `table`: about `fraction` of its images, whole caption groups at a time.

    Images that share a caption form one group (connected through any shared caption), and a group goes wholly to one
    side, so no validation caption occurs in training, as on a held-out set. Groups are ordered by a seeded hash of
    their first caption, a choice independent of the table's row order.
    """
    groups = _caption_groups(table)

    def rank(members: list[int]) -> str:
        return hashlib.sha256(f"{seed}:{table.captions[members[0]][0]}".encode()).hexdigest()

    wanted, held = max(1, round(fraction * len(table))), set()
    for members in sorted(groups, key=rank):
        if len(held) >= wanted:
            break
        held.update(members)
    if len(held) >= len(table):
        raise ConfigError(f"data.validation_split: {fraction} leaves no training images in {table.name!r}")

    def part(keep: list[int], name: str) -> CaptionTable:
        negatives = table.negatives
        return CaptionTable([table.images[i] for i in keep], [table.captions[i] for i in keep], [], name, 0, negatives)

    train_idx = [i for i in range(len(table)) if i not in held]
    train = part(train_idx, table.name)
    train.skipped, train.empty_captions = table.skipped, table.empty_captions
    return train, part(sorted(held), VALIDATION_SPLIT)


def _caption_groups(table: CaptionTable) -> list[list[int]]:
    """Images connected through shared captions (union-find by hand: a dozen lines, no graph library needed)."""
    parent = list(range(len(table)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, captions in enumerate(table.captions):
        for caption in captions:
            parent[root(i)] = root(first.setdefault(caption, i))
    groups: dict[int, list[int]] = {}
    for i in range(len(table)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def train_dataset(
    cfg: RunConfig,
    table: CaptionTable,
    model: ClipModel,
    encoding: Encoding,
    labels: list[int] | None,
    objective: Objective,
) -> TrainPairs:
    """Training pairs; a cached locked tower contributes its precomputed outputs instead of raw inputs. Captions cut
    short by the text context are counted in `encoding.overflow`, beside the eval sets', for the run's report."""
    encoding.report_overflow(table.flat()[0], f"training set {table.name!r}")
    trunks = encoding.trunks
    started = time.perf_counter()
    image_features = trunks.trunk_features("image", table.images) if "image" in trunks.cached else None
    text_features = trunks.trunk_features("text", table.flat()[0]) if "text" in trunks.cached else None
    if trunks.cached:
        log.info(
            "cached locked %s tower output(s) for training in %.1fs",
            " and ".join(trunks.cached),
            time.perf_counter() - started,
        )
    return TrainPairs(
        table,
        image_transform(cfg, model),
        model.tokenize,
        cfg.runtime.seed,
        image_features,
        text_features,
        labels=labels if objective.needs_groups else None,
        groups=objective.needs_groups,
        negatives=negative_source(cfg, table) if objective.needs_negatives else None,
        hard_negatives=cfg.loss.hard_negatives,
    )


def image_transform(cfg: RunConfig, model: ClipModel) -> Transform:
    """The training images' transform: timm's augmentation pipeline with `data.augment`, else the model's own."""
    if cfg.data.augment is None:
        return model.train_transform
    from cliptune.data.augment import train_transform

    transform = train_transform(cfg.data.augment, model.image_preprocessing(), cfg.data.labelled is not None)
    log.info("training images: %s", transform)
    return transform


def negative_source(cfg: RunConfig, table: CaptionTable) -> NegativeSource:
    """The user's negatives column if the table has one, else the generator (its tagger named in the log)."""
    if table.negatives is not None:
        log.info("hard negatives: from column %r of the training table", cfg.data.train.negatives_key)
        return TableNegatives(table.negatives)
    from cliptune.data.negatives import NegativeGenerator

    generator = NegativeGenerator(kinds=tuple(cfg.loss.negative_kinds), tagger=cfg.loss.tagger)
    log.info("hard negatives: generated (%s, kinds %s)", generator.describe(), ", ".join(cfg.loss.negative_kinds))
    return GeneratedNegatives(generator, cfg.loss.hard_negatives)


@dataclass
class GeneratedNegatives:
    """(caption, seed) -> up to `count` generated hard negatives; a class so DataLoader workers can pickle it."""

    generator: Any
    count: int

    def __call__(self, caption: str, seed: str) -> list[str]:
        return self.generator.negatives(caption, self.count, seed)


@dataclass
class TableNegatives:
    """(caption, seed) -> the negatives the user's table gives for that caption (the seed is not needed)."""

    negatives: dict[str, list[str]]

    def __call__(self, caption: str, seed: str) -> list[str]:
        return list(self.negatives.get(caption, []))


def shard_stream(cfg: RunConfig, model: ClipModel, objective: Objective, where: World) -> ShardStream:
    """Training samples streamed from webdataset shards, split over ranks and workers."""
    assert not (objective.needs_negatives or objective.needs_groups)  # `config.check_training` refuses those
    assert cfg.data.shards is not None
    return ShardStream(
        cfg.data.shards,
        image_transform(cfg, model),
        model.tokenize,
        cfg.runtime.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        resample=cfg.data.shard_resample,
        samples_per_epoch=cfg.data.samples_per_epoch,
        caption_key=cfg.data.shard_caption_key,
        rank=where.rank,
        world_size=where.size,
    )


def steps_per_epoch(cfg: RunConfig, dataset: TrainPairs | ShardStream, where: World) -> int:
    if isinstance(dataset, TrainPairs):
        if len(dataset) < cfg.train.batch_size:
            log.warning(
                "train.batch_size %d is larger than the %d usable training images: every step is one batch of all "
                "of them (%d negatives per image); lower train.batch_size or add data",
                cfg.train.batch_size,
                len(dataset),
                len(dataset) - 1,
            )
        return len(make_loader(cfg, dataset, epoch=0, where=where))
    # Shards are whole files per rank, so ranks may hold different numbers of samples: every rank stops at the
    # poorest rank's count, the same in every epoch so the schedule's length is known up front.
    local = cfg.train.batch_size // where.size
    workers = cfg.runtime.workers
    return min(dataset.steps_per_epoch(local, where.size, workers, epoch) for epoch in range(cfg.train.epochs))


def make_loader(
    cfg: RunConfig, dataset: TrainPairs | ShardStream, epoch: int, where: World = SINGLE, start: int = 0
) -> DataLoader:
    """The epoch's loader; a table's loader from batch `start` on (a mid-epoch resume) without reading the skipped
    batches. A stream cannot seek: its caller skips `start` batches by reading them."""
    dataset.set_epoch(epoch)
    if isinstance(dataset, ShardStream):
        return DataLoader(
            dataset,
            batch_size=cfg.train.batch_size // where.size,
            num_workers=cfg.runtime.workers,
            drop_last=True,
            collate_fn=collate_skip_none,
        )
    # The data order is a pure function of (seed, epoch), so a resumed run replays it without saved sampler state.
    generator = torch.Generator().manual_seed(cfg.runtime.seed * 100_003 + epoch)
    batch = cfg.train.batch_size
    # a ragged last batch is a different (easier) contrastive task: dropped
    sampler = GlobalBatchSampler(
        len(dataset), batch, generator, drop_last=len(dataset) > batch, where=where, start=start
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.runtime.workers,
        collate_fn=collate_skip_none,
    )
