"""Training data as tar shards (webdataset): writing a caption table into shards, and streaming them back for training.

Format. Shard `shard-%06d.tar` holds, per image, `<key>.<ext>` (the image file's bytes as they are on disk, never
re-encoded) and `<key>.json` = {"captions": [...], "key": <table index>, optional "label", optional "negatives"}.
`manifest.json` beside the shards records the sample count of every shard, so a reader knows the epoch length, and
can plan equal step counts for every rank, without opening a shard.

Reading. `ShardStream` is an IterableDataset yielding what `TrainPairs` yields, (image tensor, 1-D token tensor), or
(image, tokens, label) with `with_labels=True` (the json's "label", for label-aware losses). Every random choice is a
pure function of (seed, epoch, ...), so a resumed run replays an epoch from its start:

* the shard order of an epoch is shuffled from (seed, epoch); position p goes to rank p mod world_size, and within
  the rank its shards are dealt to the DataLoader workers the same way (webdataset's `split_by_node` and
  `split_by_worker` rule: whole shards, never split);
* the shuffle buffer of each (rank, worker) is seeded from (seed, epoch, rank, worker);
* the caption of a sample is drawn from (seed, epoch, key) exactly as `TrainPairs` draws it from (seed, epoch, index):
  with the key being the table index, shards and `TrainPairs` pick the same captions.

Equal steps on every rank. Whole shards per rank means ranks see different sample counts when the shards do not divide
evenly (and the last shard is usually short); under DDP a rank that runs out first would leave the others waiting in
an all-reduce forever. Rather than cutting or repeating each rank's stream to a common length (webdataset's
`with_epoch`, which repeats the shards of a poorer rank), `steps_per_epoch(batch_size, world_size, num_workers,
epoch)` computes from the manifest the number of full batches the *poorest* rank gets in that epoch, exactly: the
trainer stops every rank at that step, and the rest of the richer ranks' data goes unused that epoch (a different part
each epoch, since the shard order changes). The count assumes `DataLoader(drop_last=True)`, whose workers each drop
their own last partial batch. Write many more shards than ranks x workers so that little is lost: a rank or worker
with no shard gets no data at all.

Resampling (`resample=True`) draws shards with replacement (webdataset's `ResampledShards`, seeded from
(seed, epoch, rank, worker)) and every rank yields exactly `samples_per_epoch // world_size` samples (the workers of a
rank share that quota), so all ranks take the same number of steps by construction.

A record whose image does not decode, or that has no captions (or unreadable json), is skipped: counted in `skipped`
and named in `failed` (in the process that read it), and yielded as a `Skip` in its place, which `collate_skip_none`
drops and lists on the batch, as with `TrainPairs`; so the trainer counts and names it, and every worker yields as
many items as the manifest says. Call `set_epoch` before each epoch's DataLoader
iterator is created, and do not use `persistent_workers=True`: workers copy the dataset when they start, so a
persistent worker would never see the new epoch.

Shards are opened with webdataset's `gopen`: local paths, `file://`, `http(s)://`, `gs://`, `hf://` and `pipe:` URLs
(`pipe:aws s3 cp s3://bucket/shard-000000.tar -` for S3).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset

from cliptune.data.datasets import Skip, Tokenize, Transform, caption_index, sample_seed, seeded_transform
from cliptune.data.errors import DataError
from cliptune.data.images import log_skipped, to_rgb
from cliptune.data.tables import CaptionTable

logger = logging.getLogger("cliptune.data")

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-%06d.tar"
# Fields of a sample that are not its image; anything else (jpg, png, webp, ...) is the image.
_NON_IMAGE_FIELDS = frozenset({"json", "txt", "cls"})


# ---------------------------------------------------------------------------------------------------------------
# Writing


def write_shards(
    table: CaptionTable,
    out: Path,
    max_count: int = 10_000,
    max_size: int = 1 << 30,
    labels: list[int] | None = None,
    negatives: list[list[str]] | None = None,
) -> list[Path]:
    """Write `table` as tar shards `out/shard-%06d.tar` plus `out/manifest.json`; return the shard paths.

    A shard is closed once it holds `max_count` samples or at least `max_size` bytes (so it may pass `max_size` by
    one sample). `labels` and `negatives` (one entry per image) are stored in each sample's json when given. Images
    that cannot be read or decoded are skipped, counted in the manifest and logged.
    """
    out = Path(out)
    _check_write_args(table, out, max_count, labels, negatives)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    skipped: list[Path] = []
    with wds.ShardWriter(str(out / SHARD_PATTERN), maxcount=max_count, maxsize=max_size, verbose=0) as sink:
        for index, (path, captions) in enumerate(zip(table.images, table.captions)):
            image = _read_image(path)
            if image is None:
                skipped.append(path)
                continue
            data, ext = image
            meta: dict[str, Any] = {"captions": captions, "key": index}
            if labels is not None:
                meta["label"] = labels[index]
            if negatives is not None:
                meta["negatives"] = negatives[index]
            # TarWriter's default encoder passes bytes through untouched and serialises the dict for `.json`.
            sink.write({"__key__": f"{index:09d}", ext: data, "json": meta})
            name = Path(sink.fname).name
            counts[name] = counts.get(name, 0) + 1
    log_skipped(out, skipped, len(table))
    if not counts:
        (out / (SHARD_PATTERN % 0)).unlink(missing_ok=True)  # ShardWriter opens its first shard before any write
        raise DataError(f"{out}: none of the {len(table)} images of {table.name or 'the table'} could be read")
    manifest = {
        "num_samples": sum(counts.values()),
        "num_shards": len(counts),
        "shards": [{"name": name, "samples": n} for name, n in counts.items()],
        "skipped": len(skipped),
        "table": table.name,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info("%s: wrote %d samples in %d shards", out, manifest["num_samples"], len(counts))
    return [out / name for name in counts]


def _check_write_args(
    table: CaptionTable,
    out: Path,
    max_count: int,
    labels: list[int] | None,
    negatives: list[list[str]] | None,
) -> None:
    if max_count < 1:
        raise ValueError(f"max_count must be at least 1, got {max_count}")
    for name, values in (("labels", labels), ("negatives", negatives)):
        if values is not None and len(values) != len(table):
            raise ValueError(f"{name}: {len(values)} entries for {len(table)} images; give one per image")
    old = sorted(out.glob("shard-*.tar")) if out.is_dir() else []
    if old:
        # Stale shards from an earlier, larger write would be read by a brace pattern or glob along with the new ones.
        raise DataError(f"{out} already holds shards ({old[0].name}, ...); write to an empty folder or delete them")


def _read_image(path: Path) -> tuple[bytes, str] | None:
    """(the file's bytes, the extension to store them under), or None if it cannot be read or does not decode."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            fmt = (image.format or "").lower()
    except Exception:
        return None
    ext = path.suffix.lower().lstrip(".")
    return data, ext if ext and ext not in _NON_IMAGE_FIELDS else fmt


# ---------------------------------------------------------------------------------------------------------------
# Reading


class ShardStream(IterableDataset):
    """(image tensor, 1-D token tensor) per sample of tar shards, or (image, tokens, label) with `with_labels`.

    `source` is a folder holding manifest.json, a brace pattern / URL (`shards/shard-{000000..000009}.tar`,
    `file:///data/shard-{000000..000009}.tar`), or a list of shard paths or URLs. The manifest is read from the
    folder, from `manifest` when given, or else from beside local shards when it is there; without one, only
    `resample=True` can be used for training (`num_samples` and `steps_per_epoch` need it).

    `rank` and `world_size` default to the torch.distributed process group (or torchrun's RANK / WORLD_SIZE), read
    when the stream is built: build it after the process group is initialised. See the module docstring for how an
    epoch is ordered and split.
    """

    def __init__(
        self,
        source: str | Path | Sequence[str | Path],
        transform: Transform,
        tokenize: Tokenize,
        seed: int,
        *,
        shuffle_buffer: int = 1000,
        resample: bool = False,
        samples_per_epoch: int | None = None,
        with_labels: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        manifest: str | Path | None = None,
        caption_key: str = "captions",
    ) -> None:
        super().__init__()
        self.caption_key = caption_key
        self.urls, self.counts = _resolve_source(source, manifest)
        self.transform = transform
        self.tokenize = tokenize
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.resample = resample
        self.samples_per_epoch = samples_per_epoch
        self.with_labels = with_labels
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.epoch = 0
        self.skipped = 0
        self.failed: set[str] = set()
        self._check_epoch_length()

    def _check_epoch_length(self) -> None:
        if self.resample and self.samples_per_epoch is None:
            raise ValueError("resample=True draws shards without end: set samples_per_epoch to fix an epoch's length")
        if not self.resample and self.samples_per_epoch is not None:
            raise ValueError(
                "samples_per_epoch applies only with resample=True; without it an epoch is every sample once"
            )
        if self.samples_per_epoch is not None and self.samples_per_epoch < self.world_size:
            raise ValueError(
                f"samples_per_epoch={self.samples_per_epoch} is fewer than one sample for each of "
                f"{self.world_size} ranks"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and captions are drawn; call before iterating (and before workers start)."""
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples in the listed shards, from the manifest."""
        return sum(self._counts().values())

    def _counts(self) -> dict[str, int]:
        if self.counts is None:
            raise DataError(
                f"no {MANIFEST} found for shards {self.urls[0]}, ...: pass `manifest=` (the file written with the "
                "shards by `cliptune shards`), or use resample=True with samples_per_epoch"
            )
        return self.counts

    def _shard_list(self, epoch: int) -> wds.SimpleShardList:
        return wds.SimpleShardList(self.urls, seed=f"{self.seed}:{epoch}")

    def shard_order(self, epoch: int | None = None) -> list[str]:
        """The shard URLs in the order `epoch` (default: the current one) reads them, before the split over ranks."""
        return [shard["url"] for shard in self._shard_list(self.epoch if epoch is None else epoch)]

    def steps_per_epoch(
        self, batch_size: int, world_size: int | None = None, num_workers: int = 0, epoch: int | None = None
    ) -> int:
        """Full batches of `batch_size` that every rank can take in `epoch` (default: the current one).

        The minimum over ranks, for a DataLoader with `num_workers` and `drop_last=True`: stop every rank after this
        many steps so that all take the same number. It changes with the epoch's shard order; a schedule needing one
        number for the whole run can take the minimum over the run's epochs (arithmetic on the manifest, no I/O).
        """
        world = self.world_size if world_size is None else world_size
        workers = max(num_workers, 1)
        if self.resample:
            assert self.samples_per_epoch is not None
            per_worker = [[_quota(self.samples_per_epoch // world, w, workers) for w in range(workers)]]
        else:
            counts, order = self._counts(), self.shard_order(epoch)
            per_worker = [
                [sum(counts[url] for url in _every(_every(order, r, world), w, workers)) for w in range(workers)]
                for r in range(world)
            ]
        # Each DataLoader worker batches its own samples and drops its own last partial batch.
        steps = min(sum(n // batch_size for n in rank) for rank in per_worker)
        if steps == 0:
            raise DataError(
                f"some rank gets no full batch of {batch_size} from {len(self.urls)} shards over {world} ranks x "
                f"{workers} workers; write smaller shards (`--max-count`), use fewer workers or a smaller batch, "
                "or resample=True"
            )
        return steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        _, _, worker, workers = wds.utils.pytorch_worker_info()
        slot = f"{self.seed}:{self.epoch}:{self.rank}:{worker}"
        if not self.resample:
            rank, world = self.rank, self.world_size
            # wds.split_by_node takes the rank only from torch.distributed / the environment, but the rank given
            # here (tests, custom process groups) must also seed the shuffle and plan steps_per_epoch: split by hand.
            stages = [self._shard_list(self.epoch), lambda src: _every(src, rank, world), wds.split_by_worker]
            return iter(wds.DataPipeline(*stages, *self._decoding(slot)))
        assert self.samples_per_epoch is not None
        quota = _quota(self.samples_per_epoch // self.world_size, worker, workers)
        if quota == 0:  # with_epoch(0) would mean "no limit"
            return iter(())
        # Each (rank, worker) draws its own shards; worker_seed is 0 because `slot` already names the worker.
        shards = wds.ResampledShards(
            self.urls, seed=random.Random(slot).getrandbits(62), worker_seed=lambda: 0, deterministic=True
        )
        return iter(wds.DataPipeline(shards, *self._decoding(slot)).with_epoch(quota))

    def _decoding(self, slot: str) -> list[Any]:
        """Pipeline stages from shard URLs to training samples, shuffled in a buffer seeded by `slot`."""
        stages: list[Any] = [wds.tarfile_to_samples()]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=slot))
        return [*stages, wds.map(self._sample)]

    def _sample(self, raw: dict[str, Any]) -> tuple[torch.Tensor, ...] | Skip:
        """The training sample of one tar record, or a `Skip` naming it (counted, warned once) when its json, image
        or captions cannot be read: the trainer counts and names it like a table's unreadable image."""
        where = f"{raw.get('__url__')}: {raw['__key__']}"
        try:
            meta = json.loads(raw["json"]) if "json" in raw else {}
            image = _decode(raw)
            captions = _captions(meta, raw, self.caption_key)
        except Exception as e:
            return self._skip(where, e)
        key = meta.get("key", raw["__key__"])
        tokens = self.tokenize([captions[caption_index(self.seed, self.epoch, key, len(captions))]])
        # augmentation seeded per (seed, epoch, sample), as TrainPairs does: the same whatever the ranks and workers
        pixels = seeded_transform(self.transform, image, sample_seed(self.seed, self.epoch, key))
        sample = (pixels, tokens[0] if tokens.dim() > 1 else tokens)
        if not self.with_labels:
            return sample
        if "label" not in meta:
            raise DataError(f"{where}: with_labels=True but the sample has no label; write the shards with labels=")
        return *sample, torch.tensor(meta["label"])

    def _skip(self, where: str, error: Exception) -> Skip:
        self.skipped += 1
        if where not in self.failed:
            self.failed.add(where)
            logger.warning("%s: %s; skipping it in training", where, error)
        return Skip(where, str(error))


def _decode(raw: dict[str, Any]) -> Image.Image:
    fields = sorted(k for k in raw if not k.startswith("__") and k not in _NON_IMAGE_FIELDS)
    if not fields:
        raise ValueError("the sample has no image file")
    try:
        with Image.open(io.BytesIO(raw[fields[0]])) as image:
            image.load()
            return to_rgb(image)
    except UnidentifiedImageError as e:  # its message names a BytesIO object's address, which helps nobody
        raise ValueError(f"its image {fields[0]!r} could not be decoded (not an image format PIL reads)") from e
    except Exception as e:
        raise ValueError(f"its image {fields[0]!r} could not be decoded ({e})") from e


def _captions(meta: dict[str, Any], raw: dict[str, Any], key: str = "captions") -> list[str]:
    """The json's caption list (or single caption) under `key`, else the `.txt` caption of shards written by other
    tools (img2dataset)."""
    value = meta.get(key)
    if isinstance(value, str) and value.strip():
        return [value]
    if isinstance(value, list) and value and all(isinstance(c, str) for c in value):
        return list(value)
    if value:
        raise DataError(f"json {key!r} is {type(value).__name__}; it must be a caption or a list of them")
    if "txt" in raw:
        return [raw["txt"].decode("utf-8")]
    found = ", ".join(repr(k) for k in meta) or "none"
    raise DataError(f"no captions (no json {key!r}, no .txt file; json keys: {found}); set data.shard_caption_key")


def _every(items: Any, start: int, step: int) -> Any:
    """Items start, start + step, ...: the split rule of wds.split_by_node / split_by_worker."""
    return islice(items, start, None, step)


def _quota(per_rank: int, worker: int, workers: int) -> int:
    """Worker `worker`'s share of its rank's `per_rank` samples; the shares sum to `per_rank`."""
    return per_rank // workers + (worker < per_rank % workers)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither (then torch.distributed's are used)")
    if rank is None or world_size is None:
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return rank, world_size


def _local(url: str) -> Path | None:
    """The local file a path or file:// URL names; None for remote URLs."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return Path(url) if parsed.scheme == "" else None


def _resolve_source(
    source: str | Path | Sequence[str | Path], manifest: str | Path | None
) -> tuple[list[str], dict[str, int] | None]:
    """(shard URLs, samples per shard URL from the manifest, or None without one)."""
    folder = _local(str(source)) if isinstance(source, (str, Path)) else None
    if folder is not None and folder.is_dir():
        manifest = manifest or folder / MANIFEST
        entries = _read_manifest(manifest)
        base = str(source).rstrip("/")
        urls = [f"{base}/{e['name']}" for e in entries]
    else:
        urls = wds.shardlists.expand_urls(str(source)) if isinstance(source, (str, Path)) else [str(s) for s in source]
        if not urls:
            raise DataError("no shards given: pass a folder with manifest.json, a brace pattern, or a list of shards")
        beside = _local(urls[0])
        if manifest is None and beside is not None and (beside.parent / MANIFEST).is_file():
            manifest = beside.parent / MANIFEST
        entries = _read_manifest(manifest) if manifest is not None else None
    _check_local_shards(urls)
    if entries is None:
        return urls, None
    by_name = {e["name"]: int(e["samples"]) for e in entries}
    missing = [u for u in urls if u.rsplit("/", 1)[-1] not in by_name]
    if missing:
        raise DataError(f"{missing[0]}: not listed in {manifest}; pass the manifest written with these shards")
    return urls, {u: by_name[u.rsplit("/", 1)[-1]] for u in urls}


def _read_manifest(manifest: str | Path) -> list[dict[str, Any]]:
    local = _local(str(manifest))
    if local is not None and not local.is_file():
        raise DataError(f"{local}: no shard manifest; write the shards with `cliptune shards`, or list them instead")
    with wds.gopen(str(manifest)) as f:
        return json.load(f)["shards"]


def _check_local_shards(urls: list[str]) -> None:
    for url in urls:
        local = _local(url)
        if local is not None and not local.is_file():
            raise DataError(f"{url}: shard file does not exist; check the shard path or brace pattern")


# ---------------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `cliptune shards` (and `python -m cliptune.data.shards`)."""
    parser.add_argument("--data", required=True, help="caption table: .csv, .tsv, .jsonl or COCO / Karpathy .json")
    parser.add_argument("--out", required=True, help="output folder for shard-%%06d.tar and manifest.json")
    parser.add_argument("--max-count", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--max-size", type=int, default=1 << 30, help="bytes per shard (closed after passing it)")
    parser.add_argument("--image-key", default="image", help="column holding the image path")
    parser.add_argument("--caption-key", default="caption", help="column holding the caption(s)")
    parser.add_argument("--images-root", default=None, help="folder image paths are relative to")
    parser.add_argument("--split", default=None, help="Karpathy-split .json only: train, val, test, ...")


def run(args: argparse.Namespace) -> int:
    """Write the shards that `args` (from `add_arguments`) describe."""
    from cliptune.config import TableSpec
    from cliptune.data.tables import read_caption_table

    spec = TableSpec(
        path=args.data,
        image_key=args.image_key,
        caption_key=args.caption_key,
        images_root=args.images_root,
        split=args.split,
    )
    # Images are checked while they are written (read once, verified from memory), not by a second pass here.
    table = read_caption_table(spec, check_images=False)
    shards = write_shards(table, Path(args.out), max_count=args.max_count, max_size=args.max_size)
    manifest = json.loads((Path(args.out) / MANIFEST).read_text())
    print(
        f"wrote {manifest['num_samples']} samples in {len(shards)} shards to {args.out} "
        f"({manifest['skipped']} unreadable images skipped)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cliptune.data.shards", description=write_shards.__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
