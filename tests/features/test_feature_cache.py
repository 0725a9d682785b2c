"""Locked towers run once per input: in memory within a run, and across runs through the on-disk store."""

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

import cliptune
from cliptune.config import TableSpec
from cliptune.data import read_caption_table
from cliptune.eval import Encoding, evaluate_retrieval
from cliptune.features.store import FeatureStore, tower_fingerprint
from cliptune.models import build_model
from cliptune.models.composed import ComposedClip
from tests.helpers import tiny_config


def composed_run(shapes: Path, bert_dir: Path, out: Path, **runtime) -> dict:
    model = {k: v for k, v in dataclasses.asdict(tiny_config(bert_dir)).items() if v is not None}
    return {
        "name": "run",
        "model": model,
        "data": {"train": {"path": str(shapes / "train.csv")}},
        "eval": {"retrieval": [{"name": "val", "path": str(shapes / "val.csv")}]},
        "finetune": {"lock_image": True, "lock_text": True},
        "train": {"epochs": 3, "batch_size": 16},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "runtime": {"output_dir": str(out), "progress": False, **runtime},
    }


@pytest.fixture
def trunk_calls(monkeypatch):
    """How many inputs went through each trunk."""
    calls = {"image": 0, "text": 0}
    for tower in calls:
        original = getattr(ComposedClip, f"{tower}_trunk")

        def counting(self, x, _original=original, _tower=tower):
            calls[_tower] += len(x)
            return _original(self, x)

        monkeypatch.setattr(ComposedClip, f"{tower}_trunk", counting)
    return calls


def test_each_input_goes_through_a_locked_tower_once_per_run(shapes, bert_dir, tmp_path, trunk_calls):
    out = cliptune.finetune(composed_run(shapes, bert_dir, tmp_path))
    train, val = (read_caption_table(TableSpec(path=str(shapes / f"{s}.csv"))) for s in ("train", "val"))
    assert trunk_calls["image"] == len(train.images) + len(val.images)
    assert trunk_calls["text"] == len(set(train.flat()[0]) | set(val.flat()[0]))
    assert out["final"]["val"]["mean_recall"] > out["baseline"]["val"]["mean_recall"]


def test_feature_store_is_reused_across_runs_and_gives_identical_results(shapes, bert_dir, tmp_path, trunk_calls):
    cache = str(tmp_path / "cache")
    first = cliptune.finetune(composed_run(shapes, bert_dir, tmp_path / "a", feature_cache=cache))
    calls_first = dict(trunk_calls)
    second = cliptune.finetune(composed_run(shapes, bert_dir, tmp_path / "b", feature_cache=cache))
    assert trunk_calls == calls_first, "the second run encoded through a locked tower again"
    assert first["final"] == second["final"]
    image = shapes / "images" / "val_00000.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # a rewritten file
    cliptune.finetune(composed_run(shapes, bert_dir, tmp_path / "c", feature_cache=cache))
    assert trunk_calls["image"] == calls_first["image"] + 1 and trunk_calls["text"] == calls_first["text"]


def test_cached_evaluation_equals_uncached(shapes, bert_dir):
    torch.manual_seed(0)
    model = build_model(tiny_config(bert_dir)).eval()
    table = read_caption_table(TableSpec(path=str(shapes / "val.csv")))
    plain = evaluate_retrieval(Encoding(model), table)
    cached = Encoding(model, cached=("image", "text"))
    assert evaluate_retrieval(cached, table) == pytest.approx(plain, abs=1e-9)
    assert evaluate_retrieval(cached, table) == pytest.approx(plain, abs=1e-9)  # second pass from the memo
    torch.testing.assert_close(cached.images(table.images), Encoding(model).images(table.images), atol=1e-6, rtol=0)


def test_fingerprint_changes_with_the_tower_weights(bert_dir, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_config(bert_dir))
    before = tower_fingerprint(model, "image"), tower_fingerprint(model, "text")
    with torch.no_grad():
        next(model.tower_modules("image")[0].parameters()).add_(1.0)
    assert tower_fingerprint(model, "image") != before[0] and tower_fingerprint(model, "text") == before[1]
    assert tower_fingerprint(model, "image", "bf16") != tower_fingerprint(model, "image")  # bf16 outputs differ
    store = FeatureStore(tmp_path)
    store.save("fp", {"t:a": torch.ones(3), "t:b": torch.zeros(3)})
    loaded = store.load("fp")
    assert list(loaded) == ["t:a", "t:b"] and torch.equal(loaded["t:a"], torch.ones(3))
    assert store.load("other") == {}


def test_index_reuses_a_runs_image_trunks(shapes, bert_dir, tmp_path, trunk_calls):
    """An index built with a run's feature cache only runs the head over stored images; results are unchanged."""
    cache = tmp_path / "cache"
    cliptune.finetune(composed_run(shapes, bert_dir, tmp_path / "runs", feature_cache=str(cache)))
    model = tmp_path / "runs" / "run"
    stored = trunk_calls["image"]
    (tmp_path / "new").mkdir()
    new = [
        shutil.copy(p, tmp_path / "new" / f"copy{i}.png") for i, p in enumerate(sorted(shapes.glob("images/*"))[:10])
    ]
    val = read_caption_table(TableSpec(path=str(shapes / "val.csv"))).images
    listing = tmp_path / "images.txt"  # the val images (in the store) and 10 new files, one of them twice
    listing.write_text("\n".join(map(str, [*val, *new, new[0]])) + "\n")
    trunk_calls["image"] = 0
    cached = cliptune.Index.build(model, listing, tmp_path / "cached", feature_cache=cache, batch_size=8)
    assert trunk_calls["image"] == 10, "stored images went through the trunk again"
    plain = cliptune.Index.build(model, listing, tmp_path / "plain", batch_size=8)
    assert cached.meta["path"] == plain.meta["path"] and cached.meta["width"] == plain.meta["width"]
    ids = range(len(plain))
    torch.testing.assert_close(
        torch.stack([torch.as_tensor(cached.embedding(i)) for i in ids]),
        torch.stack([torch.as_tensor(plain.embedding(i)) for i in ids]),
        atol=1e-6,
        rtol=0,
    )
    trunk_calls["image"] = 0  # the new images are in the store now
    cliptune.Index.build(model, listing, tmp_path / "again", feature_cache=cache)
    assert trunk_calls["image"] == 0 and stored > 0
