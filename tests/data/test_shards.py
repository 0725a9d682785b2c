"""Tests of cliptune.data.shards: writing tar shards from a caption table and streaming them back for training."""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import ToTensor

from cliptune.data import CaptionTable, DataError, Skip, TrainPairs, collate_skip_none, load_rgb
from cliptune.data.shards import ShardStream, main, write_shards

N_GOOD = 23
BAD_INDEX, MISSING_INDEX, JPEG_INDEX = 5, 12, 7
MAX_COUNT = 4
SHARD_SIZES = [4, 4, 4, 4, 4, 3]
TOKENS = 40


def tokenize(captions: list[str]) -> torch.Tensor:
    """Bytes of each caption, zero-padded: a tokenizer that `untokenize` inverts exactly."""
    out = torch.zeros(len(captions), TOKENS, dtype=torch.long)
    for row, caption in enumerate(captions):
        data = caption.encode()
        out[row, : len(data)] = torch.tensor(list(data))
    return out


def untokenize(tokens: torch.Tensor) -> str:
    return bytes(tokens[tokens > 0].tolist()).decode()


def colour_key(image: torch.Tensor) -> tuple[int, ...]:
    return tuple((image[:, 0, 0] * 255).round().int().tolist())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A table of 25 images (23 readable 16x16 ones, one corrupt, one missing), written as 6 shards of <= 4."""
    root = tmp_path_factory.mktemp("shards")
    images, captions = [], []
    for i in range(N_GOOD + 2):
        path = root / "images" / (f"{i:02d}.jpg" if i == JPEG_INDEX else f"{i:02d}.png")
        path.parent.mkdir(exist_ok=True)
        if i == BAD_INDEX:
            path.write_bytes(b"not an image at all")
        elif i != MISSING_INDEX:
            Image.new("RGB", (16, 16), (10 * i, 250 - 10 * i, (37 * i) % 256)).save(path)
        images.append(path)
        captions.append([f"image {i} caption {j}" for j in range(i % 3 + 1)])
    table = CaptionTable(images=images, captions=captions, name="tiny")
    good = [i for i in range(len(images)) if i not in (BAD_INDEX, MISSING_INDEX)]
    expected = {i: ToTensor()(load_rgb(images[i])) for i in good}
    by_colour = {colour_key(image): i for i, image in expected.items()}
    assert len(by_colour) == len(good)  # every image tells which index it is
    out = root / "out"
    shards = write_shards(table, out, max_count=MAX_COUNT)
    return {"table": table, "good": good, "expected": expected, "by_colour": by_colour, "out": out, "shards": shards}


def stream(data: dict, source: object = None, **kw: object) -> ShardStream:
    kw.setdefault("shuffle_buffer", 8)
    return ShardStream(source or data["out"], ToTensor(), tokenize, seed=3, **kw)


def identify(data: dict, sample: tuple[torch.Tensor, ...]) -> tuple[int, str]:
    """(table index, caption) of a sample, checking its pixels against the original file's."""
    image, tokens = sample[0], sample[1]
    index = data["by_colour"][colour_key(image)]
    assert torch.equal(image, data["expected"][index])
    return index, untokenize(tokens)


def test_shards_hold_original_bytes_captions_and_a_manifest(data: dict) -> None:
    table, out = data["table"], data["out"]
    assert [p.name for p in data["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(SHARD_SIZES))]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == N_GOOD and manifest["num_shards"] == len(SHARD_SIZES)
    assert [s["samples"] for s in manifest["shards"]] == SHARD_SIZES
    assert manifest["skipped"] == 2
    seen = []
    for shard, size in zip(data["shards"], SHARD_SIZES):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        assert len(files) == 2 * size
        for name, content in files.items():
            key, ext = name.split(".")
            index = int(key)
            if ext == "json":
                assert json.loads(content) == {"captions": table.captions[index], "key": index}
                seen.append(index)
            else:
                assert ext == table.images[index].suffix[1:]  # jpg stays jpg, png png
                assert content == table.images[index].read_bytes()  # not re-encoded
    assert seen == data["good"]


def test_every_sample_once_per_epoch_with_trainpairs_captions(data: dict) -> None:
    ds = stream(data)
    assert ds.num_samples == N_GOOD
    pairs = TrainPairs(data["table"], ToTensor(), tokenize, seed=3)
    orders = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        samples = [identify(data, s) for s in ds]
        assert sorted(i for i, _ in samples) == data["good"]
        assert all(caption == pairs.caption(i, epoch) for i, caption in samples)
        orders.append([i for i, _ in samples])
    assert orders[0] != orders[1] and orders[0] == orders[2]
    assert ds.skipped == 0


def test_without_shuffle_buffer_shards_are_read_whole_in_the_epoch_order(data: dict) -> None:
    ds = stream(data, shuffle_buffer=0)
    shard_of = {str(path): data["good"][i * MAX_COUNT : (i + 1) * MAX_COUNT] for i, path in enumerate(data["shards"])}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        order = ds.shard_order()
        assert sorted(order) == sorted(shard_of)
        assert [identify(data, s)[0] for s in ds] == [i for url in order for i in shard_of[url]]
    assert ds.shard_order(0) != ds.shard_order(1)


def _rank_epoch(data: dict, rank: int, epoch: int) -> tuple[list[int], int]:
    """Indices rank `rank` of 2 reads in `epoch` through a 2-worker DataLoader, and its number of full batches of 3."""
    ds = stream(data, rank=rank, world_size=2)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_skip_none)
    indices, full = [], 0
    for images, tokens in loader:
        indices += [identify(data, (im, tok))[0] for im, tok in zip(images, tokens)]
        full += len(images) == 3
    return indices, full


def test_two_ranks_two_workers_split_the_set_and_plan_equal_steps(data: dict) -> None:
    orders = {}
    for epoch in (0, 1):
        per_rank = [_rank_epoch(data, rank, epoch) for rank in (0, 1)]
        everything = per_rank[0][0] + per_rank[1][0]
        assert sorted(everything) == data["good"]  # the union is the set, nothing twice
        orders[epoch] = per_rank[0][0]
        planned = stream(data, rank=0, world_size=2).steps_per_epoch(3, num_workers=2, epoch=epoch)
        assert planned == min(full for _, full in per_rank)
    assert orders[0] != orders[1]
    assert _rank_epoch(data, 0, 1)[0] == orders[1]  # the same (seed, epoch, rank) replays the same order


def test_resampling_yields_exactly_samples_per_epoch(data: dict) -> None:
    ds = stream(data, resample=True, samples_per_epoch=10)
    first = [identify(data, s)[0] for s in ds]
    assert len(first) == 10 and set(first) <= set(data["good"])
    assert [identify(data, s)[0] for s in ds] == first
    ds.set_epoch(1)
    assert [identify(data, s)[0] for s in ds] != first
    loader = DataLoader(stream(data, resample=True, samples_per_epoch=11), batch_size=None, num_workers=2)
    assert len(list(loader)) == 11  # the two workers share the quota, 6 + 5
    for rank in (0, 1):
        assert len(list(stream(data, resample=True, samples_per_epoch=11, rank=rank, world_size=2))) == 5
    assert ds.steps_per_epoch(3, num_workers=2) == 5 // 3 + 5 // 3
    with pytest.raises(ValueError, match="samples_per_epoch"):
        stream(data, resample=True)


def test_corrupt_image_in_a_shard_is_skipped_and_counted(data: dict, tmp_path: Path) -> None:
    shard = tmp_path / "mixed.tar"
    with wds.TarWriter(str(shard)) as sink:
        for index in data["good"][:3]:
            image = data["table"].images[index]
            sink.write({"__key__": f"{index:09d}", "png": image.read_bytes(), "json": {"captions": ["x"], "key": 0}})
        sink.write({"__key__": "broken", "png": b"\x89PNG garbage", "json": {"captions": ["y"], "key": 1}})
    ds = stream(data, [shard])
    items = list(ds)
    skips = [s for s in items if isinstance(s, Skip)]
    assert sorted(identify(data, s)[0] for s in items if s not in skips) == data["good"][:3]
    assert ds.skipped == 1 and len(skips) == 1 and skips[0].name == f"{shard}: broken"
    assert "could not be decoded" in skips[0].reason
    batch = collate_skip_none(items)  # the stand-in keeps the stream's length, and the batch names it
    assert len(batch[0]) == 3 and batch.skipped == tuple(skips)
    # read in a worker process, the skip still reaches the main process with its batch
    loader = DataLoader(stream(data, [shard]), batch_size=4, num_workers=2, collate_fn=collate_skip_none)
    assert [(len(b[0]), b.skipped) for b in loader] == [(3, tuple(skips))]
    with pytest.raises(DataError, match="manifest"):
        ds.num_samples  # noqa: B018  (no manifest beside this shard)


def test_file_url_and_brace_patterns(data: dict) -> None:
    out = data["out"]
    everything = stream(data, f"file://{out}/shard-{{000000..000005}}.tar")
    assert everything.num_samples == N_GOOD
    assert sorted(identify(data, s)[0] for s in everything) == data["good"]
    first_two = stream(data, f"{out}/shard-{{000000..000001}}.tar")
    assert first_two.num_samples == 8
    assert sorted(identify(data, s)[0] for s in first_two) == data["good"][:8]
    with pytest.raises(DataError, match="does not exist"):
        stream(data, f"{out}/shard-{{000000..000009}}.tar")


def test_labels_are_stored_and_yielded_on_request(data: dict, tmp_path: Path) -> None:
    table = data["table"]
    labels = [i % 4 for i in range(len(table))]
    write_shards(table, tmp_path, max_count=10, labels=labels, negatives=[[f"not {i}"] for i in range(len(table))])
    samples = list(stream(data, tmp_path, with_labels=True))
    assert len(samples) == N_GOOD
    for sample in samples:
        assert int(sample[2]) == labels[identify(data, sample)[0]]
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert meta["label"] == 0 and meta["negatives"] == ["not 0"]
    with pytest.raises(DataError, match="no label"):
        next(iter(stream(data, with_labels=True)))


def test_errors_name_the_problem(data: dict, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(data["table"], data["out"])
    with pytest.raises(ValueError, match="one per image"):
        write_shards(data["table"], tmp_path / "x", labels=[0])
    with pytest.raises(DataError, match="no full batch"):
        stream(data, rank=0, world_size=2).steps_per_epoch(64)


def test_command_line_writes_shards(data: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table_file = tmp_path / "table.csv"
    with table_file.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i in (0, 1, BAD_INDEX, 2):
            writer.writerow([str(data["table"].images[i]), f"caption {i}"])
    assert main(["--data", str(table_file), "--out", str(tmp_path / "out"), "--max-count", "2"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["num_samples"], manifest["num_shards"], manifest["skipped"]) == (3, 2, 1)
    assert "wrote 3 samples in 2 shards" in capsys.readouterr().out
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert Image.open(io.BytesIO(tar.extractfile("000000000.png").read())).size == (16, 16)


def test_captions_under_another_json_key(data: dict, tmp_path: Path) -> None:
    """data.shard_caption_key: shards from other tools keep captions under their own key (README bug, issue 11.7)."""
    shard = tmp_path / "other.tar"
    with wds.TarWriter(str(shard)) as sink:
        for index in data["good"][:3]:
            image = data["table"].images[index]
            sink.write({"__key__": f"{index:09d}", "png": image.read_bytes(), "json": {"text": f"shape {index}"}})
    got = sorted(identify(data, s) for s in stream(data, [shard], caption_key="text"))
    assert got == [(i, f"shape {i}") for i in sorted(data["good"][:3])]
    skips = list(stream(data, [shard]))
    assert len(skips) == 3 and all(isinstance(s, Skip) for s in skips)
    assert re.search(r"no json 'captions'.*json keys: 'text'.*data.shard_caption_key", skips[0].reason)
