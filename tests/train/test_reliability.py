"""What killed, concurrent and starved runs leave behind: stale temporaries, the run lock, a full disk, resuming."""

import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cliptune
from cliptune.config import ConfigError, TableSpec, ZeroShotSpec
from cliptune.data import read_caption_table, read_classification
from cliptune.data.errors import DataError
from cliptune.models import ModelError
from cliptune.models.checkpoints import latest_checkpoint
from cliptune.train.logging import read_jsonl, truncate_after
from cliptune.utils.files import HOST, atomic_dir, atomic_write, is_within, remove_stale_temporaries, temporary_name
from cliptune.utils.lock import LOCK_FILE, FolderInUseError, FolderLock
from tests.helpers import run_config, write_yaml


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _cli(*args: str, limit: int | None = None) -> subprocess.CompletedProcess:
    def fsize_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run(
        [sys.executable, "-m", "cliptune.cli", *args],
        capture_output=True,
        text=True,
        preexec_fn=fsize_limit if limit else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# Temporaries of dead writers


def test_only_dead_writers_temporaries_are_removed(tmp_path):
    dead = _dead_pid()
    stale = [
        tmp_path / f".epoch_3.{dead}@{HOST}.tmp",  # a half-written checkpoint folder
        tmp_path / f".initial.safetensors.{dead}@{HOST}.tmp",
        tmp_path / "model" / f".model.safetensors.{dead}@{HOST}.tmp",
        tmp_path / f".epoch_2.tmp{dead}",  # named by an older release
    ]
    kept = [
        tmp_path / f".epoch_4.{os.getpid()}@{HOST}.tmp",  # a live writer's
        tmp_path / f".epoch_5.{dead}@another-host.tmp",  # a writer on another machine cannot be checked
        tmp_path / "epoch_1",
        tmp_path / "notes.tmp",
    ]
    for path in stale[:1] + kept[:2] + kept[2:3]:
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "state.pt").write_bytes(b"x" * 1000)
    for path in stale[1:] + kept[3:]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"y" * 10)
    removed, freed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale) and freed == 1030
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


def test_atomic_write_names_its_temporary_after_the_writer(tmp_path):
    target = tmp_path / "results.json"
    with atomic_write(target) as tmp:
        assert tmp == temporary_name(target) and tmp.name == f".results.json.{os.getpid()}@{HOST}.tmp"
        tmp.write_text("{}")
    assert target.read_text() == "{}" and not tmp.exists()


def test_each_checkpoint_write_removes_dead_writers_checkpoints(tmp_path):
    """atomic_dir, which writes every checkpoint folder, first clears its siblings left by dead writers."""
    folder, dead = tmp_path / "checkpoints", _dead_pid()
    (folder / f".epoch_2.{dead}@{HOST}.tmp").mkdir(parents=True)
    (folder / f".epoch_1.{dead}@{HOST}.old").mkdir()  # killed while replacing an older epoch_1
    live = folder / f".epoch_9.{os.getpid()}@{HOST}.tmp"  # this process's own write in progress: kept
    live.mkdir()
    with atomic_dir(folder / "epoch_2") as tmp:
        (tmp / "model.safetensors").write_bytes(b"w")
    assert sorted(p.name for p in folder.iterdir()) == sorted(["epoch_2", live.name])


def test_feature_store_shared_by_runs_drops_only_dead_writers_temporaries(tmp_path):
    from cliptune.features.store import FeatureStore

    dead, live = tmp_path / f".abc.safetensors.{_dead_pid()}@{HOST}.tmp", tmp_path / f".abc.keys.json.1@{HOST}.tmp"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")  # pid 1 (init) is always running
    FeatureStore(tmp_path).save("abc", {"t:a": torch.zeros(3)})
    assert not dead.exists() and live.exists() and (tmp_path / "abc.safetensors").is_file()


def test_is_within_resolves_dots_and_symlinks(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(outside)
    assert is_within(root / "a" / "x.png", [root])
    assert not is_within(root / ".." / "outside" / "x.png", [root])
    assert not is_within(root / "link" / "x.png", [root])
    assert is_within(root / "link" / "x.png", [root, outside])
    assert not is_within("/etc/passwd", [root])


# ---------------------------------------------------------------------------------------------------------------
# The run lock

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from cliptune.utils.lock import FolderLock
    lock = FolderLock(Path(sys.argv[1])).acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes stdin (or kills this process)
    lock.release()
    """
)


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_training_into_a_locked_run_folder_stops_at_once(shapes, tmp_path):
    config = write_yaml(run_config(shapes, tmp_path / "runs", epochs=1), tmp_path / "c.yaml")
    run_dir = tmp_path / "runs" / "run"
    holder = _holder(run_dir)
    try:
        with pytest.raises(FolderInUseError, match=rf"in use: process {holder.pid} on {HOST}"):
            FolderLock(run_dir).acquire()
        proc = _cli("train", str(config))
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE], "the refused run wrote into the folder"
    finally:
        holder.stdin.close()
        holder.wait()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{run_dir} is in use: process {holder.pid} on {HOST}" in proc.stderr
    with FolderLock(run_dir):  # released by its owner: free again, and the file goes with the owner
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (run_dir / LOCK_FILE).exists()


def test_lock_of_a_killed_process_is_taken_over_with_a_message(tmp_path, caplog):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="cliptune"), FolderLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of process {holder.pid} on {HOST}, which is gone" in caplog.text


@pytest.mark.slow
def test_two_trainings_started_together_one_is_refused(shapes, tmp_path):
    config = write_yaml(run_config(shapes, tmp_path / "runs", epochs=1, eval__retrieval=[]), tmp_path / "c.yaml")
    cmd = [sys.executable, "-m", "cliptune.cli", "train", str(config)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    refused = next(err for p, (_, err) in zip(procs, outs) if p.returncode == 2)
    winner = next(p for p in procs if p.returncode == 0)
    assert f"is in use: process {winner.pid} on {HOST}" in refused and "Traceback" not in refused
    # train.jsonl also holds epoch means and validation losses: the step records are those with a loss
    records = [r for r in read_jsonl(tmp_path / "runs" / "run" / "train.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == sorted({r["step"] for r in records}), "steps logged twice"


# ---------------------------------------------------------------------------------------------------------------
# Disk full (a file-size limit in a subprocess)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_full_disk_before_any_checkpoint_names_the_file_and_the_space(shapes, tmp_path):
    config = write_yaml(run_config(shapes, tmp_path / "runs", epochs=1), tmp_path / "c.yaml")
    proc = _cli("train", str(config), limit=2_000_000)
    run_dir = tmp_path / "runs" / "run"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert f"could not write {run_dir / 'initial.safetensors'} (over the file-size limit)" in message
    assert "it needs about 13.6 MB" in message and "files of at most 2.0 MB (`ulimit -f`)" in message
    assert "No checkpoint had been written yet" in message
    assert not [p for p in run_dir.rglob(".*") if p.name.endswith(".tmp")], "a temporary was left"


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(shapes, tmp_path):
    cfg = run_config(shapes, tmp_path / "runs", epochs=1, eval__retrieval=[])
    cliptune.finetune(cfg)
    config = write_yaml(cfg, tmp_path / "c.yaml")
    run_dir = tmp_path / "runs" / "run"
    first = run_dir / "checkpoints" / "epoch_1"
    before = _digest(first)
    shutil.rmtree(run_dir / "model")  # the second session ends by writing it again
    # 20 MB: the weights (13.6 MB) fit, the optimizer state beside them does not
    proc = _cli("train", str(config), "train.epochs=2", "--resume", limit=20_000_000)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    state = run_dir / "checkpoints" / "epoch_2" / "state.safetensors"
    assert f"could not write {state} (over the file-size limit): it needs about" in message
    assert f"The previous checkpoint, {first}, is intact" in message and "--resume" in message
    assert latest_checkpoint(run_dir / "checkpoints") == first and _digest(first) == before
    assert not [p for p in run_dir.rglob(".*") if p.name.endswith(".tmp")], "a temporary was left"
    assert not (run_dir / LOCK_FILE).exists()


def test_disk_full_error_is_an_oserror_with_a_plain_message(tmp_path):
    code = textwrap.dedent(
        f"""
        import resource
        from cliptune.utils.files import atomic_write, DiskFullError
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            with atomic_write({str(tmp_path / "big.bin")!r}, needed=5000) as tmp:
                tmp.write_bytes(b"x" * 5000)
        except DiskFullError as e:
            print(isinstance(e, OSError), e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.startswith(f"True could not write {tmp_path / 'big.bin'} (over the file-size limit): it needs about")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Resume integrity


def test_half_written_log_line_is_dropped_and_a_bad_one_named(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0, "step": 0}\n{"epoch": 1, "step": 6}\n{"epoch": 2, "st')
    with caplog.at_level(logging.WARNING, logger="cliptune"):
        truncate_after(path, 6)
    assert "line 3 is half-written" in caplog.text
    assert read_jsonl(path) == [{"epoch": 0, "step": 0}, {"epoch": 1, "step": 6}]
    path.write_text('{"epoch": 0}\nnot json\n{"epoch": 1}\n')
    with pytest.raises(ValueError, match=rf"{path}, line 2: not a JSON record"):
        read_jsonl(path)


def _stop_after(epochs: int):
    def callback(trainer):
        if trainer.state.epoch == epochs:
            raise KeyboardInterrupt

    return callback


@pytest.mark.slow
def test_resume_refuses_fewer_epochs_and_changed_data_and_repairs_the_log(shapes, tmp_path):
    table = tmp_path / "train.csv"
    shutil.copy(shapes / "train.csv", table)
    cfg = run_config(shapes, tmp_path / "runs", epochs=3)
    cfg["data"]["train"] = {"path": str(table), "images_root": str(shapes)}
    with pytest.raises(KeyboardInterrupt):
        cliptune.finetune(cfg, callbacks=(_stop_after(2),))
    run_dir = tmp_path / "runs" / "run"
    with pytest.raises(ConfigError, match=r"train.epochs is 1 but .*epoch_2 has already trained 2 epochs"):
        cliptune.finetune(cfg, resume=True, train={"epochs": 1})
    rows = table.read_text().splitlines()
    table.write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(ConfigError, match=r"training data changed .*96 images.* then, 95 images"):
        cliptune.finetune(cfg, resume=True)
    table.write_text("\n".join(rows) + "\n")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "step": 1')  # killed while logging an evaluation
    dead = _dead_pid()
    (run_dir / "checkpoints" / f".epoch_3.{dead}@{HOST}.tmp").mkdir()
    (run_dir / f".initial.safetensors.{dead}@{HOST}.tmp").write_bytes(b"x")
    out = cliptune.finetune(cfg, resume=True)
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]
    assert out["run"]["epochs"] == 3
    assert not [p for p in run_dir.rglob(".*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------------
# Messages that point the right way; unreadable and outside images in evaluation sets


def test_missing_model_folder_is_named_with_close_folders_and_models(shapes, tmp_path, monkeypatch):
    (tmp_path / "runs" / "try1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"runs/tyr1: no such folder.*Folders with close names: runs/try1$"):
        cliptune.load("runs/tyr1")
    with pytest.raises(ModelError, match=r"no such folder.*Model names close to 'cliptune-tiny-vt': cliptune-tiny-vit"):
        cliptune.load("./cliptune-tiny-vt")
    with pytest.raises(ModelError, match=r"not an OpenCLIP architecture.*Nor is it a folder here.*: runs$"):
        cliptune.load("rusn")
    cfg = run_config(shapes, tmp_path / "out", model__init="runs/try2")
    with pytest.raises(ModelError, match="runs/try2: no such folder"):
        cliptune.finetune(cfg)


def test_missing_evaluation_folder_is_not_called_a_table_format(tmp_path):
    (tmp_path / "classes").mkdir()
    with pytest.raises(DataError, match=r"clases: no such file or folder.*class.*close names: .*classes$"):
        cliptune.evaluate("cliptune-tiny-vit", tmp_path / "clases")


def _truncated_jpeg(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_jpeg_in_an_eval_set_is_skipped_and_counted(shapes, tmp_path, caplog):
    rows = (shapes / "val.csv").read_text().splitlines()
    bad = _truncated_jpeg(tmp_path / "cut.jpg")
    (tmp_path / "val.csv").write_text("\n".join([*rows[:9], f"{bad},a red square cut short"]) + "\n")
    spec = TableSpec(path=str(tmp_path / "val.csv"), images_root=str(shapes))
    with caplog.at_level(logging.WARNING, logger="cliptune"):
        table = read_caption_table(spec)
    assert table.skipped == [bad] and len(table.images) == 8
    assert f"skipped 1 of 9 images that are missing or unreadable: {bad}" in caplog.text
    metrics = cliptune.evaluate("cliptune-tiny-vit", spec)
    assert 0 <= metrics["mean_recall"] <= 100
    classes = tmp_path / "classes"
    for name in ("red", "blue"):
        (classes / name).mkdir(parents=True)
        for i in range(2):
            shutil.copy(shapes / "images" / f"val_0000{i}.png", classes / name / f"{i}.png")
    _truncated_jpeg(classes / "red" / "cut.jpg")
    labelled = read_classification(ZeroShotSpec(path=str(classes)))
    assert labelled.skipped == [classes / "red" / "cut.jpg"] and len(labelled) == 4


def test_image_paths_outside_images_root_are_read_and_counted_once(shapes, tmp_path, caplog):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "images").mkdir(parents=True)
    outside.mkdir()
    names = [f"val_0000{i}.png" for i in range(4)]
    for name in names:
        shutil.copy(shapes / "images" / name, outside / name)
    (root / "images" / "link.png").symlink_to(outside / names[2])
    shutil.copy(shapes / "images" / names[3], root / "images" / names[3])
    rows = [f"../outside/{names[0]},a", f"{outside / names[1]},b", "images/link.png,c", f"images/{names[3]},d"]
    (root / "t.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="cliptune"):
        table = read_caption_table(TableSpec(path=str(root / "t.csv")))
    assert len(table.images) == 4 and not table.skipped
    assert caplog.text.count("resolve outside") == 1
    assert f"3 of 4 image paths resolve outside {root}" in caplog.text
