"""The search index: results equal a brute-force numpy search, a killed build continues, --add, model refusal."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cliptune.cli import main
from cliptune.config import ModelConfig
from cliptune.data import DataError
from cliptune.data.synthetic import make_shapes
from cliptune.index import Index, build
from cliptune.inference import Encoder
from cliptune.models import build_model, load_model
from cliptune.models.io import save_model


def _saved_model(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_model(build_model(ModelConfig(arch="cliptune-tiny-vit")), folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("index-models")
    return _saved_model(root / "a", 0), _saved_model(root / "b", 1)


@pytest.fixture
def images(tmp_path) -> Path:
    make_shapes(tmp_path / "shapes", n_train=150, n_val=0, image_size=32)
    return tmp_path / "shapes"


def _brute_force(model_dir: Path, paths: list[str], query: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    """Top k by a numpy dot product over embeddings computed here, one image at a time."""
    encoder = Encoder(load_model(model_dir))
    emb = np.concatenate([encoder.encode_images([p]) for p in paths])
    scores = emb @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [paths[i] for i in order], scores[order]


def test_search_equals_brute_force(models, images, tmp_path):
    idx = Index.build(models[0], images / "train.csv", tmp_path / "idx", batch_size=16)
    assert len(idx) == 150 and idx.info["ann"]["kind"] == "Flat"
    query = Encoder(load_model(models[0])).encode_texts(["a big red square"])[0]
    hits = idx.search(text="a big red square", k=10)
    want_paths, want_scores = _brute_force(models[0], idx.meta["path"], query, 10)
    assert [h.path for h in hits] == want_paths
    np.testing.assert_allclose([h.score for h in hits], want_scores, atol=1e-5)
    assert [h.rank for h in hits] == list(range(1, 11))
    first = hits[0]
    assert first.captions and first.width == first.height == 32
    # searching by an image file, and by that image's stored embedding, finds the image itself first
    by_image = idx.search(image=first.path, k=3)
    assert by_image[0].id == first.id and by_image[0].score == pytest.approx(1.0, abs=1e-5)
    assert idx.search(embedding=idx.embedding(first.id), k=1)[0].id == first.id
    with pytest.raises(DataError, match="does not exist"):
        idx.search(image=tmp_path / "nothing.png")
    with pytest.raises(ValueError, match="exactly one"):
        idx.search(text="a", embedding=idx.embedding(0))


def _run_build(model: Path, images: Path, out: Path, *, slow: bool) -> subprocess.Popen:
    """A build in its own process; `slow` sleeps per batch so that the test can kill it between chunks."""
    code = (
        "import sys, time, torch\n"
        "from cliptune.index import build\n"
        "from cliptune.models import load_model\n"
        f"model = load_model({str(model)!r})\n"
        f"if {slow}:\n"
        "    encode = model.encode_image\n"
        "    model.encode_image = lambda x: (time.sleep(0.4), encode(x))[1]\n"
        f"build.build_index(model, {str(model)!r}, {str(images)!r}, {str(out)!r}, batch_size=10, workers=0,"
        " chunk_size=20)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _encoded_count(monkeypatch) -> list[int]:
    counts: list[int] = []
    real = build.encode_chunks

    def counting(model, todo, *args, **kwargs):
        counts.append(len(todo))
        return real(model, todo, *args, **kwargs)

    monkeypatch.setattr(build, "encode_chunks", counting)
    return counts


@pytest.mark.slow
def test_killed_build_continues(models, images, tmp_path, monkeypatch):
    out = tmp_path / "idx"
    proc = _run_build(models[0], images / "train.csv", out, slow=True)
    deadline = time.monotonic() + 120
    while len(list((out / build.CHUNKS).glob("chunk-*.parquet"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / build.INFO).exists()
    with pytest.raises(DataError, match="interrupted"):
        Index.open(out)
    done = 20 * len(list((out / build.CHUNKS).glob("chunk-*.parquet")))
    counts = _encoded_count(monkeypatch)
    resumed = Index.build(models[0], images / "train.csv", out, batch_size=10, workers=0)
    assert counts == [150 - done] and done >= 40
    whole = Index.build(models[0], images / "train.csv", tmp_path / "whole", batch_size=10, workers=0)
    assert resumed.meta == whole.meta
    vectors = [np.stack([i.embedding(n) for n in range(len(i))]) for i in (resumed, whole)]
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    assert not (out / build.CHUNKS).exists() and not (out / build.BUILDING).exists()


def test_add_encodes_only_new_and_changed(models, images, tmp_path, monkeypatch):
    folder = images / "images"
    out = tmp_path / "idx"
    Index.build(models[0], folder, out, batch_size=16, workers=0)
    (folder / "train_00000.png").unlink()
    Image.new("RGB", (40, 24), (200, 10, 10)).save(folder / "train_00001.png")  # changed in place
    Image.new("RGB", (20, 20), (10, 10, 200)).save(folder / "sub" / "new.png") if (
        folder / "sub"
    ).mkdir() is None else 0
    counts = _encoded_count(monkeypatch)
    assert main(["index", "--model", str(models[0]), "--images", str(folder), "--out", str(out), "--add"]) == 0
    assert counts == [2]
    updated = Index.open(out)
    fresh = Index.build(models[0], folder, tmp_path / "fresh", batch_size=16, workers=0)
    assert len(updated) == 150 and updated.meta == fresh.meta
    assert str(folder / "train_00000.png") not in updated.meta["path"]
    row = updated.id_of(str(folder / "train_00001.png"))
    assert (updated.meta["width"][row], updated.meta["height"][row]) == (40, 24)
    query = fresh.embedding(row)
    assert [h.id for h in updated.search(embedding=query)] == [h.id for h in fresh.search(embedding=query)]


def test_other_model_refused(models, images, tmp_path, capsys):
    out = tmp_path / "idx"
    Index.build(models[0], images / "train.csv", out, batch_size=32, workers=0)
    with pytest.raises(DataError, match="cannot be compared"):
        Index.open(out, model=models[1])
    args = ["index", "--model", str(models[1]), "--images", str(images / "train.csv"), "--out", str(out), "--add"]
    assert main(args) == 2
    assert "cannot be compared" in capsys.readouterr().err
    assert main(args[:-1]) == 2  # without --add: an index is already there
    assert "--add" in capsys.readouterr().err
    # the model recorded in the index changed after the build: a text query says so instead of mixing models
    shutil.copytree(models[1], models[0].parent / "moved", dirs_exist_ok=True)
    info = json.loads((out / build.INFO).read_text())
    info["model"]["name"] = str(models[0].parent / "moved")
    (out / build.INFO).write_text(json.dumps(info))
    with pytest.raises(DataError, match="cannot be compared"):
        Index.open(out).search(text="a red square")


def test_approximate_index_recall(models, images, tmp_path):
    idx = Index.build(models[0], images / "images", tmp_path / "idx", batch_size=32, workers=0, exact_max=50)
    ann = idx.info["ann"]
    assert ann["kind"].startswith("IVF") and ann["queries"] == 15 and ann["nprobe"] >= 1
    vectors = np.stack([idx.embedding(i) for i in range(len(idx))])
    rng = np.random.default_rng(1)
    found = total = 0
    for q in rng.choice(len(idx), 30, replace=False):  # recall@10 measured here by numpy against the exact order
        truth = set(np.argsort(-(vectors @ vectors[q]), kind="stable")[:10].tolist())
        found += len(truth & {h.id for h in idx.search(embedding=vectors[q], k=10)})
        total += 10
    assert found / total >= 0.9 and ann["recall_at_10"] >= 0.9


def test_sources_list_file_and_shards(models, images, tmp_path, capsys):
    paths = sorted((images / "images").glob("*.png"))[:12]
    listing = tmp_path / "list.txt"
    listing.write_text("# images\n" + "\n".join(str(p) for p in paths) + "\nmissing.png\n")
    listed = Index.build(models[0], listing, tmp_path / "from-list", workers=0)
    assert listed.meta["path"] == [str(p) for p in paths] and listed.info["skipped"] == 1
    shard = tmp_path / "shards" / "shard-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for i, p in enumerate(paths):
            tar.add(p, arcname=f"{i:04d}.png")
            meta = tmp_path / "meta.json"
            meta.write_text(json.dumps({"captions": [f"caption {i}"]}))
            tar.add(meta, arcname=f"{i:04d}.json")
    sharded = Index.build(models[0], shard, tmp_path / "from-shards", workers=0)
    assert sharded.meta["captions"][3] == ["caption 3"] and sharded.meta["path"][3] == f"{shard}#0003"
    vectors = [np.stack([i.embedding(n) for n in range(12)]) for i in (listed, sharded)]
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    with sharded.open_image(3) as image:
        assert image.size == Image.open(paths[3]).size
    assert (
        main(["search", "--index", str(tmp_path / "from-shards"), "--image", str(paths[5]), "-k", "2", "--json"]) == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["path"] == f"{shard}#0005" and len(hits) == 2


def test_images_outside_roots_are_not_read(models, images, tmp_path):
    idx = Index.build(models[0], images / "images", tmp_path / "idx", workers=0)
    info = json.loads((tmp_path / "idx" / build.INFO).read_text())
    info["roots"] = [str(tmp_path / "elsewhere")]
    (tmp_path / "idx" / build.INFO).write_text(json.dumps(info))
    with pytest.raises(DataError, match="outside"):
        Index.open(tmp_path / "idx").open_image(0)
    assert len(idx) == 150


def test_bad_sources_are_named(models, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for source, says in (("empty", "no image files"), ("nothing.csv", "does not exist"), ("notes.md", "unsupported")):
        (tmp_path / "notes.md").write_text("x")
        args = ["index", "--model", str(models[0]), "--images", str(tmp_path / source), "--out", str(tmp_path / "i")]
        assert main(args) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "i").exists()  # nothing written before the source was read
    assert main(["search", "--index", str(tmp_path / "i"), "--text", "a"]) == 2
    assert "not a finished index" in capsys.readouterr().err
    (tmp_path / "i").mkdir()
    (tmp_path / "i" / build.INFO).write_text('{"format": 1, "count": 3}')
    assert main(["search", "--index", str(tmp_path / "i"), "--text", "a"]) == 2
    assert "missing model, dim, roots, ann" in capsys.readouterr().err
