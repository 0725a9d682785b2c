"""benchmarks/throughput.py: reading step times from both trainers' logs, the variants, and a tiny real run."""

import math
import re

import pytest

from tests.helpers import load_benchmark

bench = load_benchmark("throughput")


def openclip_line(done: int, total: int, batch: int, seconds: float, avg: float) -> str:
    """One log line as open_clip_train/train.py formats it (its f-string, copied)."""
    rate = batch / seconds
    return (
        f"2026-01-01,00:00:00 | INFO | Train Epoch: 0 [{done:>4}/{total} ({100.0 * done / total:.0f}%)] "
        f"Data (t): 0.004 Batch (t): {avg:.3f}, {rate:#g}/s, {rate:#g}/s/gpu LR: 0.000010 "
        "Logit Scale: 14.286 Contrastive_loss: 2.0794 (2.0794) Loss: 2.0794 (2.0794)"
    )


def test_openclip_step_seconds_reads_each_logged_step():
    batch, seconds = 8, [0.7, 0.0123456, 2.5, 31.25]
    lines = ["2026-01-01,00:00:00 | INFO | Start epoch 0", "  warmup: 10"]
    lines += [openclip_line(batch * (i + 1), batch * 4, batch, s, s) for i, s in enumerate(seconds)]
    lines.append("I1122 torch/_dynamo/utils.py:925] TorchDynamo compilation metrics:")
    got = bench.openclip_step_seconds("\n".join(lines), batch)
    # the rate has six significant digits: finer than Batch (t)'s three decimals (0.012 for the second step)
    assert got == pytest.approx(seconds, rel=1e-5)


def test_cliptune_step_seconds_inverts_the_running_rate():
    batch, seconds = 4, [3.0, 0.5, 0.25, 1.0]
    records, elapsed = [], 0.0
    for k, s in enumerate(seconds, start=1):
        elapsed += s
        records.append({"step": k, "samples_per_s": k * batch / elapsed})  # what train_epoch logs
    assert bench.cliptune_step_seconds(records, batch) == pytest.approx(seconds)


def test_timed_leaves_out_warmup():
    timing = bench.timed([10.0, 1.0, 1.0, 2.0], warmup=1, batch=8)
    assert timing.samples_per_s == pytest.approx(8 * 3 / 4.0)
    assert timing.seconds_per_step == pytest.approx(4.0 / 3)
    assert (timing.fastest, timing.slowest) == (1.0, 2.0)
    with pytest.raises(ValueError, match="none left after 2 warm-up"):
        bench.timed([1.0, 1.0], warmup=2, batch=8)


def test_variants_map_to_config_overrides():
    assert bench.variant_overrides("fp32") == ("fp32", ["runtime.precision=fp32"])
    precision, overrides = bench.variant_overrides("bf16+compile+channels_last")
    assert precision == "bf16"
    assert overrides == ["runtime.precision=bf16", "runtime.compile=true", "runtime.channels_last=true"]
    with pytest.raises(ValueError, match="must start with a precision"):
        bench.variant_overrides("compile")
    with pytest.raises(ValueError, match="unknown option"):
        bench.variant_overrides("bf16+turbo")
    assert bench.unsupported(["runtime.precision=bf16"]) is None
    assert "runtime.turbo" in bench.unsupported(["runtime.turbo=true"])


def test_openclip_command_matches_the_workload():
    command = bench.openclip_command("ViT-B-32", batch=16, samples=208, precision="bf16", workers=1, device="cpu")
    assert command[1:3] == ["-m", "open_clip_train.main"]
    flags = dict(zip(command[3::2], command[4::2]))
    assert flags["--model"] == "ViT-B-32"
    assert flags["--batch-size"] == "16"
    assert flags["--train-num-samples"] == "208"
    assert flags["--precision"] == "amp_bf16"
    assert flags["--log-every-n-steps"] == "1"
    assert "--pretrained" not in flags  # random init, as cliptune's model.pretrained null


def _cells(markdown: str, label: str) -> list[str]:
    row = next(line for line in markdown.splitlines() if line.startswith("|") and f"| {label} |" in line)
    return [c.strip() for c in row.strip("|").split("|")]


def _tiny_settings(**changes) -> bench.Settings:
    """Settings for a tiny CPU run of the cliptune-tiny-vit arch, one thread, with `changes` applied."""
    defaults = dict(
        archs=["cliptune-tiny-vit"],
        batch=4,
        steps=1,
        warmup=1,
        variants=[],
        memory_batches=[8],
        chunk=4,
        loader_batches=1,
        threads=1,
        workers=0,
        device="cpu",
        memory_arch="cliptune-tiny-vit",
        memory_precision="fp32",
    )
    return bench.Settings(**(defaults | changes))


@pytest.mark.slow
def test_tiny_train_run_of_both_sides(tmp_path):
    """open_clip's trainer and cliptune's worker really run, log every step, and land in the table."""
    settings = _tiny_settings(steps=2, variants=["fp32"])
    runs = bench.train_runs(settings, tmp_path)
    assert [(r.label, r.error) for r in runs] == [("open_clip_train", None), ("cliptune fp32", None)]
    assert all(r.timing.samples_per_s > 0 and r.peak_rss_mib > 100 for r in runs)
    markdown = bench.train_markdown(runs, settings, tmp_path)
    theirs, ours = _cells(markdown, "open_clip_train"), _cells(markdown, "cliptune fp32")
    assert theirs[-1] == "1.00x"
    ratio = float(ours[3]) / float(theirs[3])
    assert float(ours[-1].rstrip("x")) == pytest.approx(ratio, abs=0.02)  # shown values are rounded
    mean, fastest, slowest = (float(x) for x in re.match(r"([\d.]+) \(([\d.]+)-([\d.]+)\)", ours[4]).groups())
    assert math.isclose(float(ours[3]) * mean, settings.batch, rel_tol=0.02)  # samples/s x s/step
    assert fastest <= mean <= slowest
    assert "OMP_NUM_THREADS=1 python -m" not in markdown  # the tiny arch goes through the registering launcher
    assert re.search(r"OMP_NUM_THREADS=1 python benchmarks/throughput.py _cliptune_worker --table \$WORK/", markdown)


@pytest.mark.slow
def test_tiny_memory_rows(tmp_path):
    settings = _tiny_settings(archs=[])
    rows = bench.memory_rows(settings, tmp_path)
    assert [(r["batch"], r["chunk"]) for r in rows] == [(8, None), (8, 4)]
    assert all("error" not in r and r["peak_mib"] >= r["built_mib"] > 100 for r in rows)
    assert rows[0]["inputs_mib"] == pytest.approx(8 * 3 * 32 * 32 * 4 / 2**20)
    markdown = bench.memory_markdown(rows, settings)
    assert markdown.count("\n| 8 |") == 2


@pytest.mark.slow
def test_tiny_loader_rows(tmp_path):
    settings = _tiny_settings(memory_batches=[], loader_batches=2)
    rows = bench.loader_rows(settings, tmp_path)
    assert [(r["pipeline"], r["workers"]) for r in rows] == [
        (p, w) for w in (0, 1, 2) for p in ("cliptune", "open_clip")
    ]
    assert all(r["images_per_s"] > 0 for r in rows)
    trained = bench.Run("cliptune-tiny-vit", "cliptune fp32", "fp32", [], bench.Timing(2.0, 2.0, 2.0, 2.0))
    markdown = bench.loader_markdown(rows, [trained], settings)
    first = _cells(markdown, "cliptune TrainPairs (PNG decode, train transform, tokenize)")
    assert first[-1] == f"{rows[0]['images_per_s'] / 2.0:.0f}x"
