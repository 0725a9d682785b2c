"""Each training objective end to end: FSC-CLIP with token features, a negatives column, FT-CLIP and FLYP on a labelled
set, compositionality evaluation in a run, training from shards, and the config errors that guard them."""

import csv
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds

import cliptune
from cliptune.api import resolve_config
from cliptune.config import ConfigError, ZeroShotSpec
from cliptune.data import read_classification
from cliptune.data.synthetic import SHAPES
from cliptune.eval import Encoding, evaluate_zeroshot
from cliptune.models import build_model
from cliptune.models.classifier import ClassifierModel
from cliptune.train.logging import step_losses
from cliptune.train.setup import build_trainer
from tests.helpers import shape_labels, tiny_run

TEMPLATES = ["a photo of a {}.", "a {} shape."]


@pytest.fixture(scope="module")
def labelled(shapes) -> Path:
    """The shapes images as a `path<TAB>label` list, the label being the shape drawn."""
    return shape_labels(shapes, "labels.txt")


@pytest.fixture(scope="module")
def compositionality(shapes) -> Path:
    from cliptune.config import TableSpec
    from cliptune.data import read_caption_table
    from cliptune.data.negatives import NegativeGenerator
    from cliptune.eval.compositionality import build_compositionality_table

    table = read_caption_table(TableSpec(path=str(shapes / "val.csv")))
    return build_compositionality_table(
        table, shapes / "comp.jsonl", NegativeGenerator(tagger="rules"), count=2, seed=0
    )


@pytest.mark.slow
def test_fsc_clip_with_the_local_loss_trains_and_reports_compositionality(shapes, tmp_path, compositionality):
    cfg = tiny_run(
        shapes,
        tmp_path,
        "fsc",
        loss={"name": "fsc", "hard_negatives": 2, "tagger": "rules"},
        eval={"compositionality": [{"path": str(compositionality), "name": "comp"}]},
    )
    results = cliptune.finetune(cfg)
    assert 0 <= results["final"]["comp"]["accuracy"] <= 100
    losses = step_losses(tmp_path / "fsc")
    assert all(torch.isfinite(torch.tensor(losses)))
    # every term is logged apart, and the logged loss is their weighted sum (weights: loss.global_weight, local_weight)
    records = [r for r in map(json.loads, (tmp_path / "fsc" / "train.jsonl").read_text().splitlines()) if "loss" in r]
    for r in records:
        negclip = (r["loss/negclip/image_to_text"] + r["loss/negclip/text_to_image"]) / 2
        assert negclip == pytest.approx(r["loss/negclip"], rel=1e-6)
        total = negclip + 0.5 * r["loss/global_hn"] + 0.2 * r["loss/local_hn"]
        assert total == pytest.approx(r["loss"], rel=1e-5)
    trainer = build_trainer(resolve_config(cfg, name="fsc-check"))
    assert trainer.objective.needs_tokens and trainer.dataset.fields[-2:] == ("negatives", "negative_mask")


def test_negatives_column_of_the_table_is_used(shapes, tmp_path):
    rows = list(csv.DictReader((shapes / "train.csv").open()))
    table = tmp_path / "negs.jsonl"
    with table.open("w") as f:
        for i, row in enumerate(rows):
            caption = json.loads(row["caption"])[0]
            negs = [] if i % 3 == 0 else [f"not {caption}", "a purple hexagon"]
            image = str(shapes / row["image"])
            f.write(json.dumps({"image": image, "caption": caption, "neg": negs}) + "\n")
    cfg = tiny_run(
        shapes,
        tmp_path,
        "negs",
        data={"train": {"path": str(table), "negatives_key": "neg"}},
        loss={"name": "negclip", "hard_negatives": 3},
    )
    trainer = build_trainer(resolve_config(cfg))
    sample = trainer.dataset[1]
    assert sample[-1].tolist() == [True, True, False]  # two given, the third slot masked
    # identical captions share their rows' negatives; a caption that only ever came with an empty cell has none
    empty = [i for i in range(len(rows)) if not trainer.train_table.negatives[trainer.dataset.caption(i)]]
    assert empty and all(trainer.dataset[i][-1].tolist() == [False, False, False] for i in empty)
    expected = trainer.model.tokenize([f"not {trainer.dataset.caption(1)}", "a purple hexagon"])
    assert torch.equal(sample[-2][:2], expected)


def test_ft_clip_head_starts_at_zero_shot_and_is_scored_through_its_head(shapes, tmp_path, labelled):
    spec = {"path": str(labelled), "templates": TEMPLATES}
    cfg = tiny_run(
        shapes,
        tmp_path,
        "ft",
        data={"train": None, "labelled": spec},
        loss={"name": "ce"},
        eval={"zeroshot": [{**spec, "name": "shapes-cls"}], "wise_alphas": [0.0, 1.0]},
        train={"epochs": 2},
    )
    results = cliptune.finetune(cfg)
    torch.manual_seed(0)  # the run's seed: the same random initial model
    base = build_model(resolve_config(cfg).model)
    zero_shot = evaluate_zeroshot(Encoding(base), read_classification(ZeroShotSpec(**spec)), TEMPLATES)
    metrics = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["epoch"] == 0 and metrics[0]["acc1"] == pytest.approx(zero_shot["acc1"])
    assert results["wise"]["0.0"]["shapes-cls"]["acc1"] == pytest.approx(zero_shot["acc1"])
    model = cliptune.load(tmp_path / "ft").model
    assert isinstance(model, ClassifierModel) and model.class_names == sorted(set(SHAPES))


def test_flyp_trains_contrastively_on_class_prompts_with_label_aware_targets(shapes, tmp_path, labelled):
    spec = {"path": str(labelled), "templates": TEMPLATES}
    cfg = tiny_run(shapes, tmp_path, "flyp", data={"train": None, "labelled": spec}, loss={"name": "unicl"})
    trainer = build_trainer(resolve_config(cfg))
    classes = read_classification(ZeroShotSpec(**spec))
    assert trainer.dataset.fields == ("image", "tokens", "group")
    for index in range(5):
        assert trainer.dataset.caption(index) in [
            t.format(classes.classnames[classes.labels[index]]) for t in TEMPLATES
        ]
        assert trainer.dataset[index][2].item() == classes.labels[index]


@pytest.mark.slow
def test_training_from_shards(shapes, tmp_path):
    from cliptune.config import TableSpec
    from cliptune.data import read_caption_table
    from cliptune.data.shards import write_shards

    write_shards(read_caption_table(TableSpec(path=str(shapes / "train.csv"))), tmp_path / "shards", max_count=20)
    cfg = tiny_run(shapes, tmp_path, "stream", data={"train": None, "shards": str(tmp_path / "shards")})
    results = cliptune.finetune(cfg)
    assert results["run"]["steps"] == 96 // 16  # one process, no workers: one stream of all 96 samples


def test_samples_skipped_while_streaming_are_counted_and_named_like_a_tables(shapes, tmp_path):
    """A shard holding a corrupt image and a sample without captions: both skipped, counted in results.json and
    named there and in summary.md, where a table's skipped images are."""
    from cliptune.config import TableSpec
    from cliptune.data import CaptionTable, read_caption_table
    from cliptune.data.shards import MANIFEST, write_shards

    table = read_caption_table(TableSpec(path=str(shapes / "train.csv")))
    table = CaptionTable(images=table.images[:94], captions=table.captions[:94], name="train")
    out = tmp_path / "shards"
    write_shards(table, out, max_count=20)
    bad = out / "shard-000099.tar"  # 94 + 2 samples: six full batches of 16 read every record
    with wds.TarWriter(str(bad)) as sink:
        sink.write({"__key__": "broken", "png": b"\x89PNG garbage", "json": {"captions": ["a broken image"]}})
        sink.write({"__key__": "uncaptioned", "png": table.images[0].read_bytes(), "json": {"key": 7}})
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["shards"].append({"name": bad.name, "samples": 2})
    (out / MANIFEST).write_text(json.dumps(manifest))
    cfg = tiny_run(shapes, tmp_path, "stream", data={"train": None, "shards": str(out)})
    run = cliptune.finetune(cfg)["run"]
    assert (run["steps"], run["skipped_samples"], run["skipped_images"]) == (6, 2, None)
    names = sorted(run["skipped_first"])
    assert names[0].startswith(f"{bad}: broken (its image 'png' could not be decoded")
    assert names[1].startswith(f"{bad}: uncaptioned (no captions (no json 'captions'")
    summary = (tmp_path / "stream" / "summary.md").read_text()
    assert "Training data: 2 samples skipped while training" in summary and all(n in summary for n in names)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"loss": {"name": "fsc", "tagger": "rules"}, "train": {"chunk_size": 4}}, "train.chunk_size"),
        ({"loss": {"name": "fsc", "tagger": "rules"}, "model": {"arch": "cliptune-tiny-rn"}}, "loss.local_weight"),
        ({"loss": {"name": "ce"}}, "data.labelled"),
        ({"loss": {"name": "negclip"}, "data": {"train": None, "shards": "x"}}, "data.shards"),
    ],
)
def test_objective_config_errors_name_the_key(shapes, tmp_path, sections, message):
    with pytest.raises(ConfigError, match=message):
        build_trainer(resolve_config(tiny_run(shapes, tmp_path, "bad", **sections)))


@pytest.mark.slow
@pytest.mark.parametrize("loss", [{"name": "siglip"}, {"name": "negclip", "tagger": "rules", "hard_negatives": 2}])
def test_chunked_batches_train_like_whole_batches_for_other_objectives(shapes, tmp_path, loss):
    """GradCache with the objective's extra inputs (SigLIP's bias, hard negatives chunked with the captions)."""

    def losses(name: str, **train) -> list[float]:
        cfg = tiny_run(shapes, tmp_path, name, loss=loss, train=train, runtime={"log_every": 1})
        cliptune.finetune(cfg)
        return step_losses(tmp_path / name)

    whole, chunked = losses("whole"), losses("chunked", chunk_size=5)
    if loss["name"] == "siglip":  # the bias the objective owns is logged beside the loss, from its initial -10
        records = map(json.loads, (tmp_path / "whole" / "train.jsonl").read_text().splitlines())
        biases = [r["logit_bias"] for r in records if "loss" in r]
        assert biases[0] == pytest.approx(-10.0, abs=0.01) and len(set(biases)) > 1
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(whole), rtol=1e-4, atol=1e-5)
