"""Measure search: index build speed against the bare tower, encoding speed-ups, faiss latency/recall, the page.

    python benchmarks/search.py                  # needs data/openclipart (make data/openclipart/manifest.json)
    python benchmarks/search.py --quick          # small sizes and a tiny model: checks the script runs

Sections written to benchmarks/RESULTS.md:
  search-build     `cliptune index` images/s vs the image tower's bare forward on the same decoded batches;
  search-encoding  caption and image encoding before/after the speed-ups (padding trimmed to the batch's longest
                   caption, captions sorted by length, channels-last, bf16 for reference), with the largest
                   difference in the embeddings;
  search-ann       query latency p50/p99 at 10k, 100k and 1M vectors, exact (Flat) vs approximate (IVF as
                   `cliptune index` builds it above 100k), recall@10 of the approximate index against exact on
                   fresh queries, bytes per vector. Synthetic clustered unit vectors (real embeddings cluster);
  search-page      the page's time to first results in headless Chromium: load, type, see k thumbnails.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _record import machine, write_section

from cliptune.data import ImageFiles
from cliptune.features.encoding import Encoding
from cliptune.index import Index, ann
from cliptune.inference import load_any
from cliptune.models.towers import POOLING
from cliptune.utils.memory import keep_freed_memory

DATA = Path(__file__).resolve().parents[1] / "data" / "openclipart"


# ---------------------------------------------------------------------------------------------------------------
# Building an index vs the bare tower


def clipart(table: Path, count: int) -> tuple[list[Path], list[str]]:
    """The first `count` images of a caption table and all captions of the table, shuffled reproducibly."""
    rows = list(csv.DictReader(table.open()))
    captions = [c for r in rows for c in json.loads(r["caption"])]
    np.random.default_rng(0).shuffle(captions)
    return [table.parent / r["image"] for r in rows[:count]], captions


def bare_forward(model: torch.nn.Module, pixels: torch.Tensor, batch: int, layout: torch.memory_format) -> float:
    """Images/s of encode_image alone over already decoded batches: the most an index build can reach."""
    rates = []
    with torch.no_grad():
        for _ in range(2):  # the better of two passes: the first also pays one-off allocations
            started = time.perf_counter()
            for i in range(0, len(pixels), batch):
                model.encode_image(pixels[i : i + batch].contiguous(memory_format=layout))
            rates.append(len(pixels) / (time.perf_counter() - started))
    return max(rates)


def build_section(model_spec: str, images: list[Path], work: Path, batch: int) -> tuple[str, Index]:
    model = load_any(model_spec).eval()
    listing = work / "images.txt"
    listing.write_text("\n".join(str(p) for p in images) + "\n")
    started = time.perf_counter()
    index = Index.build(model, listing, work / "index", batch_size=batch)
    build_rate = len(images) / (time.perf_counter() - started)
    pixels = torch.stack([ImageFiles(images, model.eval_transform)[i] for i in range(len(images))])
    plain = bare_forward(model, pixels, batch, torch.contiguous_format)
    model.to(memory_format=torch.channels_last)
    fast = bare_forward(model, pixels, batch, torch.channels_last)
    model.to(memory_format=torch.contiguous_format)
    lines = [
        f"{len(images)} images of data/openclipart/val.csv, model {model_spec}, batch {batch}:",
        "",
        "| what | images/s |",
        "|---|---:|",
        f"| `Index.build` end to end (decode in workers, channels-last, write Parquet + faiss) | {build_rate:.1f} |",
        f"| bare `encode_image` on decoded batches, fp32 | {plain:.1f} |",
        f"| bare `encode_image` on decoded batches, fp32 channels-last | {fast:.1f} |",
    ]
    return "\n".join(lines), index


# ---------------------------------------------------------------------------------------------------------------
# Encoding speed-ups


def _rate(fn, count: int) -> tuple[torch.Tensor, float]:
    with torch.no_grad():
        started = time.perf_counter()
        out = fn()
    return out, count / (time.perf_counter() - started)


def text_rows(model: torch.nn.Module, captions: list[str], batch: int) -> list[str]:
    tower = model.text_tower

    def fixed_length(tokens: torch.Tensor) -> torch.Tensor:  # the tower as it ran before: all 64 positions
        mask = tokens != tower.pad_id
        hidden = tower.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        return POOLING[tower.pooling](hidden, mask)

    chunks = [model.tokenize(captions[i : i + batch]) for i in range(0, len(captions), batch)]
    before, r0 = _rate(lambda: torch.cat([fixed_length(t) for t in chunks]), len(captions))
    trimmed, r1 = _rate(lambda: torch.cat([tower(t) for t in chunks]), len(captions))
    encoding = Encoding(model, batch_size=batch // 4)  # its caption batches are 4x its batch size
    ordered, r2 = _rate(lambda: encoding.runner.run_texts(tower, captions, None), len(captions))
    used = (chunks[0] != tower.pad_id).sum(1).float()
    return [
        f"| captions, text trunk: fixed {chunks[0].shape[1]} tokens (before) | {r0:.1f} | - |",
        f"| captions: batch's longest caption (mean {used.mean():.1f}, max {used.max():.0f} tokens in batch 1) "
        f"| {r1:.1f} | {(trimmed - before).abs().max():.1e} |",
        f"| captions: longest caption + batches sorted by length (after) | {r2:.1f} | "
        f"{(ordered - before).abs().max():.1e} |",
    ]


def image_rows(model: torch.nn.Module, images: list[Path], batch: int) -> list[str]:
    pixels = torch.stack([ImageFiles(images, model.eval_transform)[i] for i in range(len(images))])

    def run(layout: torch.memory_format) -> torch.Tensor:
        batches = [pixels[i : i + batch].contiguous(memory_format=layout) for i in range(0, len(pixels), batch)]
        return torch.cat([model.encode_image(b).float() for b in batches])

    before, r0 = _rate(lambda: run(torch.contiguous_format), len(images))
    model.to(memory_format=torch.channels_last)
    after, r1 = _rate(lambda: run(torch.channels_last), len(images))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, r2 = _rate(lambda: run(torch.channels_last), len(images))
    model.to(memory_format=torch.contiguous_format)
    low = torch.nn.functional.normalize(low, dim=-1)
    rates = {}
    for workers in (0, 2):  # 2: what Encoding picks here for sets over 4 batches (`features.batches.default_workers`)
        encoding = Encoding(model, batch_size=batch, workers=workers)
        started = time.perf_counter()
        if workers == 0:  # below 4 batches Encoding decodes in the main process anyway; force it for any size
            encoding.runner.image_batches = lambda items: torch.utils.data.DataLoader(
                ImageFiles(list(items), model.eval_transform), batch_size=batch
            )
        encoding.images(images)
        rates[workers] = len(images) / (time.perf_counter() - started)
    return [
        f"| images, fp32 (before) | {r0:.1f} | - |",
        f"| images, fp32 channels-last (after) | {r1:.1f} | {(after - before).abs().max():.1e} |",
        f"| images, bf16 channels-last (not the default: see below) | {r2:.1f} | {(low - before).abs().max():.1e} |",
        f"| `Encoding.images` from files, decoding in the main process (before) | {rates[0]:.1f} | - |",
        f"| `Encoding.images` from files, 2 decoding workers (after; default over 4 batches) | {rates[2]:.1f} | - |",
    ]


def encoding_section(model_spec: str, images: list[Path], captions: list[str], batch: int) -> str:
    model = load_any(model_spec).eval()
    lines = [
        f"Model {model_spec}; {len(captions)} captions of data/openclipart/train.csv (shuffled), "
        f"{len(images)} images of val.csv; max |difference| of the L2-normalised outputs against before:",
        "",
        "| what | items/s | max abs diff |",
        "|---|---:|---:|",
        *text_rows(model, captions, batch * 4),
        *image_rows(model, images, batch),
        "",
        "Trimming, sorting and channels-last are on by default (differences at float rounding). bf16 stays opt-in "
        "(`runtime.precision: bf16`): its embeddings differ by the amount above, which is not float rounding. "
        "The two decoding rows compare forced settings on the same few batches: where the forward already uses "
        "every core, decoding workers only add their start-up, which is why `Encoding` starts them only for sets "
        "over 4 batches (`features.batches.default_workers`).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# faiss: latency, recall, memory


def synthetic(n: int, dim: int, seed: int, clusters: int = 1000, spread: float = 0.05) -> np.ndarray:
    """Unit vectors around `clusters` random centres, generated in chunks so 1M x 256 needs only its own 1 GB."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        chunk = centres[rng.integers(0, clusters, stop - start)]
        chunk += spread * rng.standard_normal(chunk.shape).astype(np.float32)
        out[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def latency_ms(index: faiss.Index, queries: np.ndarray, k: int = 10) -> tuple[float, float]:
    """p50 and p99 of one-query searches, as the server runs them."""
    index.search(queries[:5], k)
    times = []
    for q in queries:
        started = time.perf_counter()
        index.search(q[None, :], k)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def index_bytes(index: faiss.Index, work: Path) -> int:
    path = work / "probe.faiss"
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    path.unlink()
    return size


def ann_rows(n: int, dim: int, queries: int, work: Path) -> list[str]:
    both = synthetic(n + queries, dim, seed=0)  # the last `queries` rows: fresh queries from the same clusters
    vectors, fresh = both[:n], np.ascontiguousarray(both[n:])
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    truth = flat.search(fresh, 10)[1]
    rows = []
    p50, p99 = latency_ms(flat, fresh)
    rows.append(f"| {n:,} | exact (Flat) | - | {p50:.2f} | {p99:.2f} | 1.000 | {index_bytes(flat, work) / n:.0f} |")
    del flat
    started = time.perf_counter()
    approx, info = ann.build(vectors, exact_max=0)
    built = time.perf_counter() - started
    p50, p99 = latency_ms(approx, fresh)
    recall = ann.recall_at(approx.search(fresh, 10)[1], truth)
    rows.append(
        f"| {n:,} | {info.kind}, nprobe {info.nprobe} (stored recall {info.recall_at_10:.3f}) | {built:.1f} | "
        f"{p50:.2f} | {p99:.2f} | {recall:.3f} | {index_bytes(approx, work) / n:.0f} |"
    )
    return rows


def ann_section(sizes: list[int], dim: int, queries: int, work: Path) -> str:
    lines = [
        f"{dim}-d synthetic unit vectors in 1,000 clusters; {queries} fresh queries from the same clusters, one at a "
        f"time, k=10; faiss {faiss.__version__} with its default threads. `cliptune index` picks Flat up to "
        f"{ann.EXACT_MAX:,} images and IVF above; both are measured at every size here. These clusters are well "
        "separated, so IVF reaches its recall at a small nprobe; on real embeddings `cliptune index` measures recall "
        "on held-out vectors and raises nprobe until it reaches 0.95.",
        "",
        "| vectors | index | build s | p50 ms | p99 ms | recall@10 vs exact | bytes/vector |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n in sizes:
        lines += ann_rows(n, dim, queries, work)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The page


def page_section(index: Index, query: str, k: int) -> str:
    """Open the page in headless Chromium, search, wait for k loaded thumbnails; the time from navigation."""
    import threading

    import uvicorn
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from cliptune.serve.app import Served, create_app

    server = uvicorn.Server(uvicorn.Config(create_app([Served(index, "bench")]), port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)
    try:
        started = time.perf_counter()
        driver.get(f"http://127.0.0.1:{port}/")
        Select(driver.find_element(By.ID, "k")).select_by_visible_text(str(k))
        driver.find_element(By.ID, "q").send_keys(query)
        typed = time.perf_counter()
        driver.find_element(By.ID, "q").submit()
        loaded = "return [...document.querySelectorAll('.hit img')].filter(i => i.complete && i.naturalWidth).length"
        WebDriverWait(driver, 60, poll_frequency=0.01).until(lambda d: d.execute_script(loaded) == k)
        done = time.perf_counter()
        status = driver.find_element(By.ID, "status").text
    finally:
        driver.quit()
        server.should_exit = True
    return "\n".join(
        [
            f"`cliptune serve` over the search-build index ({len(index)} images), headless Chromium on the same "
            f"machine, query {query!r}, k={k}:",
            "",
            "| what | ms |",
            "|---|---:|",
            f"| page load (navigation until the query is typed) | {(typed - started) * 1000:.0f} |",
            f"| submit until all {k} thumbnails are shown | {(done - typed) * 1000:.0f} |",
            f'| the page\'s own count for the search request ("{status}") | - |',
        ]
    )


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lite0-minilm")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with val.csv and train.csv")
    parser.add_argument("--images", type=int, default=192, help="val images for the build and encoding sections")
    parser.add_argument("--captions", type=int, default=1024)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256, help="embedding size of the synthetic vectors")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--sections", nargs="+", default=["build", "encoding", "ann", "page"])
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--note", default="", help="conditions to record (e.g. other jobs sharing the CPU)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as cliptune's commands do (benchmarks/heap.py)
    logging.disable(logging.INFO)
    images = clipart(args.data / "val.csv", args.images)[0]
    captions = clipart(args.data / "train.csv", 0)[1][: args.captions]
    command = shlex.join(["python", "benchmarks/search.py", *(argv if argv is not None else sys.argv[1:])])
    note = f"`{command}` on {machine()}{'; ' + args.note if args.note else ''}."
    work = Path(tempfile.mkdtemp(prefix="cliptune-search-bench-"))
    try:
        sections = {}
        if "build" in args.sections or "page" in args.sections:
            sections["search-build"], index = build_section(args.model, images, work, 64)
        if "encoding" in args.sections:
            sections["search-encoding"] = encoding_section(args.model, images, captions, 64)
        if "ann" in args.sections:
            sections["search-ann"] = ann_section(args.sizes, args.dim, args.queries, work)
        if "page" in args.sections:
            sections["search-page"] = page_section(index, "a stop sign", 10)
        for name, body in sections.items():
            text = f"{note}\n\n{body}"
            print(f"## {name}\n\n{text}\n")
            if not args.no_write:
                write_section(name, text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
