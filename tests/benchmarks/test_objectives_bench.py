"""benchmarks/objectives.py: its result tables, table sampling, the count of trained parameters, and its configs."""

import csv
from pathlib import Path

import pytest
import torch

from cliptune.api import resolve_config
from tests.helpers import load_benchmark

bench = load_benchmark("objectives")


def table_rows(markdown: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for every body row of a markdown table."""
    rows = {}
    for line in markdown.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def retrieval(mean: float, i2t: float, t2i: float) -> dict[str, float]:
    return {"mean_recall": mean, "i2t_R@1": i2t, "t2i_R@1": t2i, "t2i_R@5": 99.0}


def test_objectives_table_gives_each_score_and_its_change_from_zero_shot():
    zero = {
        bench.RETRIEVAL: retrieval(20.0, 10.0, 12.5),
        bench.CATEGORIES: {"acc1": 30.0, "acc5": 70.0},
        bench.COMPOSITION: {"accuracy": 55.0, "samples": 100},
    }
    clip = {
        bench.RETRIEVAL: retrieval(23.456, 9.0, 13.0),
        bench.CATEGORIES: {"acc1": 31.0, "acc5": 71.0},
        bench.COMPOSITION: {"accuracy": 54.5, "samples": 100},
    }
    rows = {"CLIP": {"final": clip, "trained": 1234567, "seconds": 90.0}}
    got = table_rows(bench.objectives_table(zero, rows))
    assert got["zero-shot (source model)"] == ["0", "20.00", "10.00", "12.50", "55.00", "30.00", ""]
    # 23.456 - 20 = 3.456; 54.5 - 55 = -0.5; 90 s = 1.5 min
    assert got["CLIP"] == [
        "1,234,567",
        "23.46 (+3.46)",
        "9.00 (-1.00)",
        "13.00 (+0.50)",
        "54.50 (-0.50)",
        "31.00 (+1.00)",
        "1.5",
    ]


def test_classification_table_counts_what_was_forgotten_on_clip_art():
    zero = {bench.FASHION: {"acc1": 40.0}, bench.CATEGORIES: {"acc1": 30.0}}
    probe = {
        "final": {bench.FASHION: {"acc1": 70.0}, bench.CATEGORIES: {"acc1": 30.0}},
        "wise": {bench.FASHION: {"acc1": 60.0}, bench.CATEGORIES: {"acc1": 30.0}},
        "trained": 2560,
        "seconds": 30.0,
    }
    ft = {
        "final": {bench.FASHION: {"acc1": 85.25}, bench.CATEGORIES: {"acc1": 21.5}},
        "trained": 10,
        "seconds": 300.0,
    }
    got = table_rows(bench.classification_table(zero, {"probe": probe, "FT": ft}, alpha=0.5))
    assert list(got) == ["zero-shot (source model)", "probe", "probe + WiSE-FT (alpha 0.5)", "FT"]
    assert got["zero-shot (source model)"] == ["0", "40.00", "30.00", "0.00", ""]
    assert got["probe"] == ["2,560", "70.00", "30.00", "0.00", "0.5"]
    assert got["probe + WiSE-FT (alpha 0.5)"] == ["", "60.00", "30.00", "0.00", ""]
    assert got["FT"] == ["10", "85.25", "21.50", "8.50", "5.0"]  # 30 - 21.5 lost


def write_table(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["image", "caption"], *rows])


def read_table(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_sample_rows_draws_a_seeded_subset_in_table_order(tmp_path):
    # cells with commas, quotes and a line break must come back whole
    rows = [[f"images/{i}.png", f'["title {i}", "clip art of a, b", "two\nlines \\"q\\""]'] for i in range(8)]
    source = tmp_path / "table.csv"
    write_table(source, rows)
    first = bench.sample_rows(source, 3, tmp_path / "a.csv", seed=1)
    again = bench.sample_rows(source, 3, tmp_path / "b.csv", seed=1)
    got = read_table(first)
    assert got[0] == ["image", "caption"]
    body = got[1:]
    assert len(body) == 3 and body == read_table(again)[1:]
    indices = [rows.index(r) for r in body]  # every sampled row is a source row, unchanged
    assert indices == sorted(indices)
    assert bench.sample_rows(source, None, tmp_path / "c.csv") == source
    with pytest.raises(ValueError, match="9 rows asked for but it has 8"):
        bench.sample_rows(source, 9, tmp_path / "d.csv")


def test_restrict_list_keeps_the_images_of_the_table(tmp_path):
    folder = tmp_path / "clipart"
    folder.mkdir()
    listing = folder / "val_classes.txt"
    listing.write_text("images/a.png\tanimals\nimages/b.png\tpeople\n\nimages/c.png\tanimals\n")
    table = tmp_path / "val.csv"
    write_table(table, [["images/c.png", "C"], ["images/a.png", "A"]])
    out = bench.restrict_list(listing, table, tmp_path / "new" / "cats.txt")  # its folder is made
    assert out.read_text().splitlines() == [f"{folder}/images/a.png\tanimals", f"{folder}/images/c.png\tanimals"]


def test_changed_parameters_counts_parameter_tensors_that_moved():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    assert bench.changed_parameters(model, initial) == 0
    model(torch.randn(5, 3))  # train mode: moves the BatchNorm running statistics, which are buffers
    with torch.no_grad():
        model[0].weight[1, 2] += 1e-3  # one element is enough to count its tensor
        model[2].bias.mul_(2.0)
        model[2].weight.mul_(1.0 + 3e-7)  # a rounding-sized change, as an EMA leaves on a parameter without gradient
    assert not torch.equal(model[1].running_mean, initial["1.running_mean"])
    assert not torch.equal(model[2].weight, initial["2.weight"])
    assert bench.changed_parameters(model, initial) == 3 * 4 + 2


def test_every_row_config_is_valid_and_says_what_the_tables_claim(tmp_path):
    s = bench.Settings(tmp_path)
    names = ("train.csv", "val.csv", "cats.txt", "negatives.jsonl", "forget.txt")
    data = bench.ClipArt(*(tmp_path / n for n in names))
    objectives = {
        label: resolve_config(bench.objective_config(label, loss, "runs/source", s, data))
        for label, loss in bench.OBJECTIVES.items()
    }
    assert [c.loss.name for c in objectives.values()] == ["clip", "negclip", "fsc", "siglip"]
    assert objectives["FSC-CLIP (global HN + focal/smoothing; no local term)"].loss.local_weight == 0.0
    for cfg in objectives.values():
        assert (cfg.finetune.lock_image, cfg.finetune.lock_text) == (True, True)
        assert cfg.finetune.lock_text_patterns == "!encoder.layer.5"
        assert cfg.optim.lr == s.lr and cfg.train.epochs == s.epochs and cfg.model.init == "runs/source"
    classifiers = {
        label: resolve_config(bench.classifier_config(label, recipe, "runs/source", s, tmp_path / "train.txt"))
        for label, recipe in bench.classifiers(s.class_lr).items()
    }
    probe, ft, flyp = classifiers.values()
    assert (probe.loss.name, probe.optim.lr, probe.optim.lr_image) == ("ce", 0.0, s.class_lr)
    assert ft.optim.lr == flyp.optim.lr == s.class_lr
    assert probe.finetune.lock_image_patterns == "!class_weights"
    assert (ft.loss.name, ft.optim.layer_decay_image, ft.finetune.ema_decay) == ("ce", 0.65, bench.EMA_DECAY)
    assert (flyp.loss.name, flyp.finetune.lock_image, flyp.finetune.lock_text) == ("unicl", False, False)
    for cfg in classifiers.values():
        assert cfg.data.labelled.templates == bench.FASHION_TEMPLATES and cfg.data.train is None
    names = [c.name for c in (*objectives.values(), *classifiers.values())]
    assert len(set(names)) == len(names)  # one run directory per row
    part_a = resolve_config({"eval": bench.eval_sets(data)}).eval
    assert [(r.name, Path(r.path)) for r in part_a.retrieval] == [(bench.RETRIEVAL, data.val)]
    assert [(c.name, Path(c.path)) for c in part_a.compositionality] == [(bench.COMPOSITION, data.negatives)]
    assert [(z.name, Path(z.path)) for z in part_a.zeroshot] == [(bench.CATEGORIES, data.categories)]
    part_b = resolve_config({"eval": bench.eval_sets(data, tmp_path / "test.txt")}).eval
    assert not part_b.retrieval and not part_b.compositionality
    assert [(z.name, Path(z.path)) for z in part_b.zeroshot] == [
        (bench.FASHION, tmp_path / "test.txt"),
        (bench.CATEGORIES, data.forgetting),
    ]
    assert part_b.zeroshot[0].templates == bench.FASHION_TEMPLATES
    assert part_b.zeroshot[1].templates == part_a.zeroshot[0].templates == bench.CLIPART_TEMPLATES
