"""benchmarks/search.py at a tiny scale: the build and faiss sections run and report what they measured."""

import pytest

from cliptune.data.synthetic import make_shapes
from cliptune.models import build_model, save_model
from tests.helpers import load_benchmark, save_tiny_bert, tiny_config


@pytest.mark.slow
def test_search_benchmark_runs_small(tmp_path, capsys):
    bench = load_benchmark("search")
    make_shapes(tmp_path, n_train=8, n_val=8, image_size=32)
    args = ["--data", str(tmp_path), "--model", "cliptune-tiny-vit", "--images", "8", "--sizes", "3000"]
    assert bench.main([*args, "--queries", "20", "--sections", "build", "ann", "--no-write"]) == 0
    out = capsys.readouterr().out
    assert "## search-build" in out and "## search-ann" in out
    assert "| 3,000 | exact (Flat) |" in out and "| 3,000 | IVF" in out
    recall = float(out.split("| 3,000 | IVF")[1].split("|")[4])
    assert recall >= 0.9  # measured against the exact scan on fresh queries


@pytest.mark.slow
def test_search_benchmark_encoding_section_runs_on_a_composed_model(tmp_path, capsys):
    """The encoding section drives the encoder's internals (the text batches it sorts by length): it must keep up."""
    bench = load_benchmark("search")
    make_shapes(tmp_path, n_train=8, n_val=8, image_size=32)
    model = save_model(build_model(tiny_config(save_tiny_bert(tmp_path / "bert"))), tmp_path / "model")
    args = ["--data", str(tmp_path), "--model", str(model), "--images", "8", "--captions", "16"]
    assert bench.main([*args, "--sections", "encoding", "--no-write"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| captions")]
    assert len(rows) == 3
    assert all(float(row.split("|")[-2]) < 1e-4 for row in rows[1:])  # trimmed and sorted equal the padded run
