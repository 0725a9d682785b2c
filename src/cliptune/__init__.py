"""cliptune: fine-tune CLIP-style image-text models on your own data. Public API: finetune, load, evaluate, Index,
export."""

from __future__ import annotations

from typing import Any

__all__ = ["Index", "evaluate", "export", "finetune", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so `cliptune --help` and `import cliptune.config` do not pay for importing torch.
    if name == "Index":
        from cliptune.index import Index

        return Index
    if name == "export":  # the package cliptune.export, callable: cliptune.export(model, "hf", "out/dir")
        import cliptune.export

        return cliptune.export
    if name in __all__:
        from cliptune import api

        return getattr(api, name)
    raise AttributeError(f"module 'cliptune' has no attribute {name!r}")
