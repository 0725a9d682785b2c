"""An index opened for search: `Index.open(folder)`, `idx.search(text=... | image=... | embedding=..., k=10)`."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cliptune.data import DataError
from cliptune.index import ann, build, store
from cliptune.index.sources import Item, open_item
from cliptune.inference import Encoder, load_any
from cliptune.models import ClipModel

ModelArg = str | Path | ClipModel | Encoder


@dataclass
class Hit:
    """One search result: `rank` from 1, `score` the cosine similarity, `id` the image's row in the index."""

    rank: int
    score: float
    id: int
    path: str
    captions: list[str]
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_name(model: ModelArg) -> str:
    if isinstance(model, (str, Path)) and Path(model).expanduser().is_dir():
        return str(Path(model).expanduser().resolve())  # so the index can load it again from anywhere
    if isinstance(model, (str, Path)):
        return str(model)
    return f"an in-memory {type(model).__name__} (save it and build from its folder to query without it)"


class Index:
    """Image embeddings of one model with their paths and captions, and a faiss index over them."""

    def __init__(self, folder: Path, info: dict[str, Any], meta: dict[str, list], vectors: Any) -> None:
        self.folder, self.info, self.meta, self.vectors = folder, info, meta, vectors
        self.roots = frozenset(Path(r) for r in info["roots"])
        self._encoder: Encoder | None = None
        self._lock = threading.Lock()  # one forward pass at a time: torch modules are not re-entrant
        self._ids = {path: i for i, path in enumerate(meta["path"])}

    @classmethod
    def open(cls, folder: str | Path, model: ModelArg | None = None) -> Index:
        """Open a finished index; with `model`, refuse it unless it is the model the index was built with."""
        folder = Path(folder).expanduser()
        info_path = folder / build.INFO
        if not info_path.is_file():
            hint = (
                "its build was interrupted: run the same `cliptune index` command again to finish it"
                if (folder / build.BUILDING).is_file()
                else "build one with `cliptune index --model M --images SOURCE --out INDEX`"
            )
            raise DataError(f"{folder}: not a finished index (no {build.INFO}); {hint}")
        info = build.read_info(folder)
        table = store.read(folder / build.ITEMS, columns=store.META_COLUMNS)
        vectors = ann.read(folder / build.VECTORS, info["ann"].get("nprobe", 0))
        if not (table.num_rows == vectors.ntotal == info["count"]):
            raise DataError(
                f"{folder}: {build.ITEMS}, {build.VECTORS} and {build.INFO} disagree on the image count (an update was "
                "interrupted); run the last `cliptune index ... --add` command again"
            )
        index = cls(folder, info, table.to_pydict(), vectors)
        if model is not None:
            index.use_model(model)
        return index

    @classmethod
    def build(cls, model: ModelArg, images: str | Path, out: str | Path, **options: Any) -> Index:
        """Encode `images` (folder, caption table, list file or shards) with `model` into a new index at `out`.

        Options: batch_size, workers, add (update an existing index), exact_max (largest exact faiss index),
        feature_cache (a training run's `runtime.feature_cache`: images whose locked trunk outputs are stored there
        only go through the head).
        """
        clip = model.model if isinstance(model, Encoder) else load_any(model)
        build.build_index(clip, _model_name(model), images, out, **options)
        return cls.open(out, model=clip)

    def __len__(self) -> int:
        return int(self.info["count"])

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def use_model(self, model: ModelArg) -> None:
        """Encode queries with `model`, refused unless it is the one the index was built with."""
        encoder = model if isinstance(model, Encoder) else Encoder(load_any(model))
        build.check_model(self.info["model"], build.model_identity(encoder.model, _model_name(model)), self.folder)
        self._encoder = encoder

    @property
    def encoder(self) -> Encoder:
        """The index's own model, loaded on first use from where it was when the index was built."""
        if self._encoder is None:
            name = self.info["model"]["name"]
            try:
                self.use_model(name)
            except (OSError, ValueError) as e:
                raise DataError(f"{self.folder}: cannot load the index's model {name!r} to encode a query: {e}") from e
        assert self._encoder is not None
        return self._encoder

    def item(self, id: int) -> Item:
        if not 0 <= id < len(self):
            raise DataError(f"image id {id} is not in this index (ids are 0..{len(self) - 1})")
        m = self.meta
        return Item(m["path"][id], Path(m["file"][id]), tuple(m["captions"][id]), m["offset"][id], m["length"][id])

    def open_image(self, id: int) -> Image.Image:
        """The image with this id, opened lazily; only files inside the index's recorded folders are read."""
        return open_item(self.item(id), self.roots)

    def id_of(self, path: str) -> int | None:
        return self._ids.get(path)

    def embedding(self, id: int) -> np.ndarray:
        self.item(id)  # range check with a clear message
        return self.vectors.reconstruct(int(id))

    def query_vector(
        self, text: str | None = None, image: str | Path | Image.Image | None = None, embedding: Any = None
    ) -> np.ndarray:
        given = [name for name, v in (("text", text), ("image", image), ("embedding", embedding)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text=, image=, embedding= (got {', '.join(given) or 'none'})")
        if embedding is not None:
            return self._checked_embedding(embedding)
        if isinstance(image, (str, Path)) and not Path(image).expanduser().is_file():
            raise DataError(f"{image}: query image does not exist")
        with self._lock:
            if text is not None:
                return self.encoder.encode_texts([text])[0]
            return self.encoder.encode_images([image])[0]

    def _checked_embedding(self, embedding: Any) -> np.ndarray:
        vector = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.dim or not np.all(np.isfinite(vector)):
            raise ValueError(f"embedding must be {self.dim} finite numbers (this index's dimension)")
        norm = float(np.linalg.norm(vector))
        if norm == 0:
            raise ValueError("embedding must not be all zeros")
        return vector / norm

    def search(
        self,
        text: str | None = None,
        image: str | Path | Image.Image | None = None,
        embedding: Any = None,
        k: int = 10,
    ) -> list[Hit]:
        """The k images nearest to one query (a caption, an image file or PIL image, or an embedding)."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive whole number, not {k!r}")
        query = self.query_vector(text, image, embedding)
        scores, ids = self.vectors.search(query[None, :].astype(np.float32), min(k, len(self)))
        return [self._hit(rank, float(s), int(i)) for rank, (s, i) in enumerate(zip(scores[0], ids[0]), 1) if i >= 0]

    def _hit(self, rank: int, score: float, id: int) -> Hit:
        m = self.meta
        return Hit(rank, score, id, m["path"][id], list(m["captions"][id]), m["width"][id], m["height"][id])
