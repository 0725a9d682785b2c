"""Compositionality evaluation: accuracy against a sample-by-sample computation, ties, table files and the builder."""

import csv
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from cliptune.config import CompositionalitySpec, ModelConfig, TableSpec
from cliptune.data import CaptionTable, DataError, read_caption_table
from cliptune.data.negatives import NegativeGenerator
from cliptune.eval.compositionality import (
    CompositionalityTable,
    build_compositionality_table,
    evaluate_compositionality,
    main,
    ranked_first,
    read_compositionality_table,
)
from cliptune.features.encoding import Encoding
from cliptune.models import build_model

GENERATOR = NegativeGenerator(tagger="rules", lexicon="builtin")  # fast, and the same on every machine


@pytest.fixture(scope="module")
def encoding() -> Encoding:
    torch.manual_seed(0)
    return Encoding(build_model(ModelConfig(arch="cliptune-tiny-vit")).eval(), batch_size=8)


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    """tmp_path/images/{0,1,2}.png: three small images of different colours."""
    (tmp_path / "images").mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (16, 16), colour).save(tmp_path / "images" / f"{i}.png")
    return tmp_path


def brute_force_accuracy(encoding: Encoding, table: CompositionalityTable) -> float:
    """One sample at a time: the true caption strictly above every false one."""
    hits = 0
    for image, positive, negatives in zip(table.images, table.positives, table.negatives):
        scores = (encoding.texts([positive, *negatives]) @ encoding.images([image]).T).flatten()
        hits += bool(scores[0] > scores[1:].max())
    return 100.0 * hits / len(table)


def test_accuracy_matches_a_sample_by_sample_computation(shapes, encoding, tmp_path):
    data = read_caption_table(TableSpec(path=str(shapes / "val.csv")))
    table = read_compositionality_table(build_compositionality_table(data, tmp_path / "c.jsonl", GENERATOR, count=3))
    assert len(table) == len(data)  # every shapes caption ("a small red circle") has a negative
    result = evaluate_compositionality(encoding, table)
    assert result["samples"] == len(table)
    assert result["accuracy"] == pytest.approx(brute_force_accuracy(encoding, table), abs=1e-9)
    assert 0 < result["accuracy"] < 100  # a random model: neither all right nor all wrong on 32 samples


def test_a_tie_counts_as_a_failure(pictures, encoding):
    image = pictures / "images" / "0.png"
    caption = "a red square"
    table = CompositionalityTable(
        name="ties",
        images=[image, image],
        positives=[caption, caption],
        negatives=[[caption], ["a blue square", caption]],  # identical captions score identically
    )
    assert evaluate_compositionality(encoding, table) == {"accuracy": 0.0, "samples": 2}
    positive = torch.tensor([1.0, 1.0, 0.5])
    negative = torch.tensor([0.9, 1.0, 0.4, 0.2, 0.6])
    owner = torch.tensor([0, 1, 2, 2, 2])
    assert ranked_first(positive, negative, owner).tolist() == [True, False, False]


def write_rows(path: Path, rows: list[dict], negatives_as: str = "json") -> Path:
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == ".json":
        path.write_text(json.dumps({str(i): row for i, row in enumerate(rows)}))
    else:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            for row in rows:
                cell = json.dumps(row["negatives"]) if negatives_as == "json" else "|".join(row["negatives"])
                writer.writerow({**row, "negatives": cell})
    return path


ROWS = [
    {"image": "images/0.png", "caption": "a red square", "negatives": ["a square red", "a green square"]},
    {"image": "images/1.png", "caption": "a green square", "negatives": ["a blue square"]},
    {"image": "images/0.png", "caption": "red square", "negatives": ["square red", "a, b"]},
]


@pytest.mark.parametrize(
    "name, negatives_as", [("t.csv", "json"), ("t.csv", "bars"), ("t.tsv", "bars"), ("t.jsonl", "json"), ("t.json", "")]
)
def test_every_table_format_reads_the_same(pictures, name, negatives_as):
    table = read_compositionality_table(write_rows(pictures / name, ROWS, negatives_as))
    assert table.name == "t" and table.skipped == 0
    assert table.images == [pictures / r["image"] for r in ROWS]
    assert table.positives == [r["caption"] for r in ROWS]
    assert table.negatives == [r["negatives"] for r in ROWS]


def test_jsonl_negatives_may_be_a_bar_separated_string_and_paths_may_use_a_root(pictures, tmp_path):
    rows = [{"file": "0.png", "true": "a red square", "false": "a green square | a square red"}]
    path = write_rows(tmp_path / "sugar.jsonl", rows)
    table = read_compositionality_table(
        path, image_column="file", caption_column="true", negatives_column="false", root=pictures / "images"
    )
    assert table.images == [pictures / "images" / "0.png"]
    assert table.negatives == [["a green square", "a square red"]]


def test_config_names_sugarcrepe_columns(pictures, tmp_path):
    """eval.compositionality's image_key / caption_key / negatives_key read SugarCrepe's own column names."""
    from cliptune import config
    from cliptune.eval import compositionality_table

    rows = [{"filename": "0.png", "caption": "a red square", "negative_caption": "a green square"}]
    path = write_rows(tmp_path / "swap_att.jsonl", rows)
    keys = {"image_key": "filename", "negatives_key": "negative_caption", "images_root": str(pictures / "images")}
    cfg = config.build({"eval": {"compositionality": [{"path": str(path), **keys}]}})
    table = compositionality_table(cfg.eval.compositionality[0])
    assert table.images == [pictures / "images" / "0.png"] and table.negatives == [["a green square"]]


def test_rows_with_unreadable_images_are_skipped_and_counted(pictures, caplog):
    (pictures / "images" / "broken.png").write_text("not an image")
    rows = [*ROWS, {**ROWS[1], "image": "images/missing.png"}, {**ROWS[1], "image": "images/broken.png"}]
    with caplog.at_level(logging.WARNING, logger="cliptune.data"):
        table = read_compositionality_table(write_rows(pictures / "t.jsonl", rows))
    assert len(table) == 3 and table.skipped == 2
    assert set(table.unreadable) == {pictures / "images" / "missing.png", pictures / "images" / "broken.png"}
    assert "skipped 2 of 4 images" in caplog.text
    only_bad = write_rows(pictures / "bad.jsonl", rows[3:])
    with pytest.raises(DataError, match=r"0 of 2 images could be read.*missing\.png"):
        read_compositionality_table(only_bad)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("t.csv", "image,caption\nimages/0.png,a dog\n", r"t.csv: no column 'negatives'.*`negatives_key`"),
        ("t.csv", 'image,caption,negatives\nimages/0.png,a dog,"[""a cat"",]"\n', r"line 2, column 'negatives'.*JSON"),
        ("t.csv", "image,caption,negatives\nimages/0.png,a dog, | \n", r"line 2, column 'negatives': no false caption"),
        ("t.csv", "image,caption,negatives\n,a dog,a cat\n", r"line 2, column 'image': the image path is missing"),
        ("t.tsv", "image\tcaption\tnegatives\nimages/0.png\t\ta cat\n", r"line 2, column 'caption'.*empty"),
        ("t.jsonl", '{"image": "images/0.png", "caption": "a dog"\n', r"t.jsonl, line 1: not valid JSON"),
        ("t.jsonl", '{"image": "images/0.png", "text": "a dog", "negatives": []}\n', r"line 1: no column 'caption'"),
        ("t.jsonl", '{"image": "images/0.png", "caption": "a dog", "negatives": [1]}\n', r"list of false captions"),
        ("t.json", '{"a": {"image": "images/0.png", "caption": "a dog"}}', r"record 'a': no column 'negatives'"),
        ("t.json", '"just text"', r"expected a JSON list of records"),
        ("t.txt", "", r"unsupported table format '.txt'"),
        ("t.csv", "image,caption,negatives\n", r"no rows"),
    ],
)
def test_table_errors_name_the_file_row_and_column(pictures, name, content, message):
    (pictures / name).write_text(content)
    with pytest.raises(DataError, match=message):
        read_compositionality_table(pictures / name)


def test_builder_writes_a_table_that_reads_back(pictures, caplog):
    images = [pictures / "images" / f"{i}.png" for i in range(3)]
    captions = [["a red dog on a blue car", "another caption"], ["hello"], ["two cats sitting on a bench"]]
    data = CaptionTable(images=images, captions=captions, name="mini")
    out = pictures / "mini_negatives.jsonl"
    with caplog.at_level(logging.INFO, logger="cliptune.data"):
        assert build_compositionality_table(data, out, GENERATOR, count=2, seed=3) == out
    assert "1 of 3 captions admit no hard negative" in caplog.text  # "hello"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == ["images/0.png", "images/2.png"]  # relative to the table, portable
    table = read_compositionality_table(out)
    assert table.images == [images[0], images[2]]
    assert table.positives == ["a red dog on a blue car", "two cats sitting on a bench"]
    assert table.negatives == [GENERATOR.negatives(c, 2, seed=3) for c in table.positives]
    swaps = read_compositionality_table(build_compositionality_table(data, out, GENERATOR, kinds=["swap"]))
    swapper = NegativeGenerator(kinds=("swap",), tagger="rules", lexicon="builtin")
    assert swaps.negatives == [swapper.negatives(c, 3, seed=0) for c in swaps.positives]
    with pytest.raises(DataError, match="none of its 1 captions admits a hard negative"):
        build_compositionality_table(CaptionTable(images[:1], [["hello"]], name="hi"), out, GENERATOR)


def test_build_command(shapes, tmp_path, capsys):
    out = tmp_path / "neg.jsonl"
    argv = ["build", "--data", str(shapes / "val.csv"), "--out", str(out), "--tagger", "rules", "--lexicon", "builtin"]
    assert main([*argv, "--count", "2", "--kinds", "swap", "replace"]) == 0
    table = read_compositionality_table(out)
    assert len(table) == 32 and all(1 <= len(n) <= 2 for n in table.negatives)
    assert main(["build", "--data", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2
    assert "nope.csv" in capsys.readouterr().err


def test_cliptune_eval_scores_a_compositionality_table(pictures, tmp_path):
    """`cliptune.evaluate` with `negatives_key` (the CLI's --negatives-key) gives the eval suite's own accuracy."""
    import cliptune
    from cliptune.eval import Encoding, compositionality_table
    from cliptune.eval.compositionality import evaluate_compositionality

    path = write_rows(tmp_path / "t.jsonl", [{**r, "image": str(pictures / r["image"])} for r in ROWS])
    model = cliptune.load("cliptune-tiny-vit").model
    table = compositionality_table(CompositionalitySpec(str(path)))
    direct = evaluate_compositionality(Encoding(model, "fp32", 8), table)
    assert cliptune.evaluate(model, {"path": str(path), "negatives_key": "negatives"}) == direct
