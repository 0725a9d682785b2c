"""Keep freed memory in the process instead of handing every large tensor back to the kernel.

PyTorch's CPU tensors come from the C library's `malloc`. glibc serves any block over its mmap threshold (at most
32 MB) with a fresh `mmap` and returns it with `munmap` when freed, so a convolutional forward over a batch, whose
activations are hundreds of MB, page-faults every activation in afresh, every layer, every batch: on this project's
machine EfficientNet-Lite0 encoded 22.6 images/s at batch 128, with more time in the kernel than in the model. With
large blocks kept on the heap and the heap never trimmed, the same forward ran at 117.1 images/s, and its
outputs are bit-identical (only where memory comes from changes). `benchmarks/heap.py` measures both.

The usual cure is to preload jemalloc or tcmalloc (PyTorch's CPU performance guide); that needs the environment set
before the interpreter starts, so cliptune's commands tune glibc in-process with `mallopt` instead (no library
exposes it). The price is that a process keeps its peak heap until it exits, which suits a command that runs one
job. Set `CLIPTUNE_MALLOC=system` to keep the C library's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap and never trim it (glibc only); True when the setting took effect."""
    if os.environ.get("CLIPTUNE_MALLOC", "").lower() == "system":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
