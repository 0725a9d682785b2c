"""The search service: a JSON API and one self-contained page over one index, or two side by side.

Safe by default: images are served by id only (never a client-given path) and only from the index's own folders,
request bodies and decoded images are size-limited, k is capped, and every error is a short JSON message
(no stack trace reaches the client).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import warnings
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from cliptune.data.images import to_rgb
from cliptune.index import Index

logger = logging.getLogger("cliptune.serve")

MAX_BODY = 12 * 1024 * 1024  # an 8 MB image is about 11 MB as base64
MAX_PIXELS = 40_000_000  # decompression-bomb guard: refuse images that would decode to more pixels than this
K_MAX = 100
THUMBNAIL = 256


class BadRequest(Exception):
    """A client error: answered as {"error": message} with `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Served:
    """One index on the page: its position, its label and the model it was built with."""

    index: Index
    label: str

    def describe(self, position: int) -> dict[str, Any]:
        model = self.index.info["model"]["name"]
        return {"index": position, "label": self.label, "model": model, "count": len(self.index)}


def decode_image(data: bytes) -> Image.Image:
    """An uploaded image as RGB, refusing what is not an image or would decode to more than MAX_PIXELS."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise BadRequest(f"image is {image.width}x{image.height}; at most {MAX_PIXELS} pixels", 413)
                image.load()
                return to_rgb(image)
    except BadRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadRequest(f"image refused: {e}", 413) from e
    except Exception as e:
        raise BadRequest(f"image could not be decoded ({type(e).__name__}); send a PNG, JPEG, GIF or WebP") from e


def _k(body: dict[str, Any]) -> int:
    k = body.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise BadRequest(f"k must be a positive whole number, not {k!r}")
    return min(k, K_MAX)


def _positions(body: dict[str, Any], served: list[Served]) -> list[int]:
    if "index" not in body:
        return list(range(len(served)))
    position = body["index"]
    if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < len(served):
        raise BadRequest(f"index must be one of {list(range(len(served)))}, not {position!r}")
    return [position]


def _queries(body: dict[str, Any], served: list[Served]) -> dict[int, dict[str, Any]]:
    """For each index to search, the query keyword (text= / image= / embedding=) to pass to Index.search."""
    kinds = [key for key in ("text", "image", "embedding", "id") if key in body]
    if len(kinds) != 1:
        raise BadRequest('give exactly one of "text", "image" (base64), "embedding" or "id" (with "index")')
    kind, value = kinds[0], body[kinds[0]]
    positions = _positions(body, served)
    if kind == "text":
        if not isinstance(value, str) or not value.strip() or len(value) > 1000:
            raise BadRequest('"text" must be a non-empty string of at most 1000 characters')
        return {p: {"text": value} for p in positions}
    if kind == "image":
        image = decode_image(_base64(value))
        return {p: {"image": image} for p in positions}
    if kind == "embedding":
        if len(served) > 1 and "index" not in body:
            raise BadRequest('an embedding belongs to one model\'s space: say which with "index"')
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value):
            raise BadRequest('"embedding" must be a list of numbers')
        return {p: {"embedding": value} for p in positions}
    return _by_result(value, body, served)


def _base64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise BadRequest('"image" must be the image file as a base64 string')
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest('"image" is not valid base64') from e


def _by_result(image_id: Any, body: dict[str, Any], served: list[Served]) -> dict[int, dict[str, Any]]:
    """Search by an image of the index: its stored embedding where an index holds it, else its pixels encoded."""
    if "index" not in body and len(served) > 1:
        raise BadRequest('"id" needs "index": which index the image id belongs to')
    owner = served[body.get("index", 0)].index
    if isinstance(image_id, bool) or not isinstance(image_id, int) or not 0 <= image_id < len(owner):
        raise BadRequest(f"no image with id {image_id!r} in this index", 404)
    path = owner.meta["path"][image_id]
    queries: dict[int, dict[str, Any]] = {}
    for position, entry in enumerate(served):
        row = entry.index.id_of(path)
        if row is not None:
            queries[position] = {"embedding": entry.index.embedding(row)}
        else:
            with owner.open_image(image_id) as image:
                image.load()
                queries[position] = {"image": to_rgb(image)}
    return queries


def _hits(served: list[Served], position: int, query: dict[str, Any], k: int) -> list[dict[str, Any]]:
    hits = served[position].index.search(k=k, **query)
    return [{**h.to_dict(), "image_url": f"/image/{h.id}?index={position}"} for h in hits]


async def _json_body(request: Request) -> dict[str, Any]:
    if "application/json" not in request.headers.get("content-type", ""):
        raise BadRequest("send the query as JSON (Content-Type: application/json)", 415)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise BadRequest(f"request body is larger than {MAX_BODY // (1024 * 1024)} MB", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise BadRequest(f"request body is larger than {MAX_BODY // (1024 * 1024)} MB", 413)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest("request body is not valid JSON") from e
    if not isinstance(data, dict):
        raise BadRequest('request body must be a JSON object such as {"text": "a red car", "k": 10}')
    return data


def create_app(served: list[Served]) -> Starlette:
    """The app over `served` (one index, or two for a before/after comparison)."""
    page = files("cliptune.serve").joinpath("page.html").read_text(encoding="utf-8")

    async def index_page(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "indexes": [s.describe(i) for i, s in enumerate(served)]})

    async def search(request: Request) -> JSONResponse:
        body = await _json_body(request)
        k = _k(body)
        queries = await run_in_threadpool(_queries, body, served)
        results = []
        for position, query in queries.items():
            hits = await run_in_threadpool(_hits, served, position, query, k)
            results.append({**served[position].describe(position), "hits": hits})
        return JSONResponse({"k": k, "results": results, "hits": results[0]["hits"]})

    @lru_cache(maxsize=1024)
    def thumbnail(position: int, image_id: int) -> bytes:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with served[position].index.open_image(image_id) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise BadRequest(f"image {image_id} is too large to show", 413)
                image.draft("RGB", (THUMBNAIL, THUMBNAIL))  # JPEG: decode at a reduced size directly
                rgb = to_rgb(image)
        rgb.thumbnail((THUMBNAIL, THUMBNAIL))
        out = io.BytesIO()
        rgb.save(out, format="JPEG", quality=85)
        return out.getvalue()

    async def image(request: Request) -> Response:
        raw_id, raw_index = request.path_params["image_id"], request.query_params.get("index", "0")
        if not raw_index.isdigit() or int(raw_index) >= len(served):
            raise BadRequest(f"index must be one of {list(range(len(served)))}", 404)
        if not raw_id.isdigit() or int(raw_id) >= len(served[int(raw_index)].index):
            raise BadRequest(f"no image with id {raw_id!r} in this index", 404)
        data = await run_in_threadpool(thumbnail, int(raw_index), int(raw_id))
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    routes = [
        Route("/", index_page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/search", search, methods=["POST"]),
        Route("/image/{image_id}", image, methods=["GET"]),
    ]
    handlers = {BadRequest: _bad_request, ValueError: _bad_query, HTTPException: _http_error, Exception: _internal}
    return Starlette(routes=routes, exception_handlers=handlers)


async def _bad_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BadRequest)
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


async def _bad_query(request: Request, exc: Exception) -> JSONResponse:
    # Index.search's own messages (wrong embedding size, an image outside the index's folders) are for the user
    return JSONResponse({"error": str(exc)}, status_code=400)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("error answering %s %s", request.method, request.url.path)
    return JSONResponse({"error": "internal error; see the server's log"}, status_code=500)
