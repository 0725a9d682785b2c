"""The search service through Starlette's test client: results equal Index.search, compare mode, safe errors."""

import base64
import io

import pytest
import torch
from PIL import Image
from starlette.testclient import TestClient

from cliptune.config import ModelConfig
from cliptune.data.synthetic import make_shapes
from cliptune.index import Index
from cliptune.models import build_model
from cliptune.models.io import save_model
from cliptune.serve.app import K_MAX, MAX_BODY, Served, create_app


@pytest.fixture(scope="module")
def indexes(tmp_path_factory) -> tuple[Index, Index]:
    root = tmp_path_factory.mktemp("serve")
    make_shapes(root / "shapes", n_train=40, n_val=0, image_size=32)
    built = []
    for seed, name in ((0, "tuned"), (1, "base")):
        torch.manual_seed(seed)
        model = save_model(build_model(ModelConfig(arch="cliptune-tiny-vit")), root / f"model-{name}")
        built.append(Index.build(model, root / "shapes" / "train.csv", root / name, workers=0))
    return built[0], built[1]


@pytest.fixture(scope="module")
def client(indexes) -> TestClient:
    return TestClient(create_app([Served(indexes[0], "tuned")]), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def compare(indexes) -> TestClient:
    return TestClient(create_app([Served(indexes[0], "A"), Served(indexes[1], "B")]), raise_server_exceptions=False)


def _png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_page_and_health(client, indexes):
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text
    assert "http://" not in page.text and "https://" not in page.text and "<script src" not in page.text  # no CDN
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["indexes"][0]["count"] == len(indexes[0]) == 40


def test_search_by_text_equals_index_search(client, indexes):
    response = client.post("/search", json={"text": "a big red square", "k": 5})
    assert response.status_code == 200
    hits = response.json()["hits"]
    want = indexes[0].search(text="a big red square", k=5)
    assert [h["id"] for h in hits] == [h.id for h in want]
    assert [h["score"] for h in hits] == pytest.approx([h.score for h in want], abs=1e-6)
    assert hits[0]["image_url"] == f"/image/{want[0].id}?index=0" and hits[0]["captions"] == want[0].captions


def test_search_by_image_and_by_result(client, indexes):
    with Image.open(indexes[0].meta["path"][7]) as image:
        hits = client.post("/search", json={"image": _png(image), "k": 3}).json()["hits"]
    assert hits[0]["id"] == 7 and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    by_result = client.post("/search", json={"id": 7, "index": 0, "k": 3}).json()["hits"]
    assert [h["id"] for h in by_result] == [h.id for h in indexes[0].search(embedding=indexes[0].embedding(7), k=3)]
    embedding = indexes[0].embedding(7).tolist()
    assert client.post("/search", json={"embedding": embedding, "k": 1}).json()["hits"][0]["id"] == 7


def test_compare_searches_both_models(compare, indexes):
    data = compare.post("/search", json={"text": "a small blue circle", "k": 4}).json()
    assert [r["label"] for r in data["results"]] == ["A", "B"]
    for result, index in zip(data["results"], indexes):
        assert [h["id"] for h in result["hits"]] == [h.id for h in index.search(text="a small blue circle", k=4)]
    clicked = compare.post("/search", json={"id": 3, "index": 1, "k": 2}).json()["results"]
    path = indexes[1].meta["path"][3]
    assert all(r["hits"][0]["path"] == path for r in clicked)  # the clicked image is its own nearest in both
    assert compare.post("/search", json={"embedding": [0.1] * 64}).status_code == 400  # which model's space?


def test_thumbnails_by_id_only(client):
    response = client.get("/image/5")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size == (32, 32)
    assert client.get("/image/40").status_code == 404
    assert client.get("/image/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert client.get("/image/1?index=3").status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({}, 400, "exactly one"),
        ({"text": "a", "image": "x"}, 400, "exactly one"),
        ({"text": ""}, 400, "non-empty"),
        ({"text": "a", "k": 0}, 400, "positive"),
        ({"text": "a", "k": "3"}, 400, "positive"),
        ({"image": "not base64!"}, 400, "base64"),
        ({"image": base64.b64encode(b"not an image").decode()}, 400, "could not be decoded"),
        ({"embedding": [1.0, 2.0]}, 400, "64 finite numbers"),
        ({"id": 99}, 404, "no image"),
        ([1, 2], 400, "JSON object"),
    ],
)
def test_bad_queries_get_clear_json_errors(client, body, status, says):
    response = client.post("/search", json=body)
    assert response.status_code == status and says in response.json()["error"]


def test_limits(client):
    assert len(client.post("/search", json={"text": "a", "k": 10_000}).json()["hits"]) == min(K_MAX, 40)
    assert client.post("/search", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    assert client.post("/search", content=b"text=a").status_code == 415
    big = b'{"text": "' + b"a" * MAX_BODY + b'"}'
    response = client.post("/search", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than" in response.json()["error"]
    bomb = _png(Image.new("1", (8000, 8000)))  # 64 M pixels in a few kB of PNG
    response = client.post("/search", json={"image": bomb})
    assert response.status_code == 413 and "pixels" in response.json()["error"]
    assert client.get("/nowhere").json() == {"error": "Not Found"}


def test_internal_errors_stay_on_the_server(client, indexes, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("secret detail /home/user")

    monkeypatch.setattr(indexes[0], "search", broken)
    response = client.post("/search", json={"text": "a"})
    assert response.status_code == 500
    assert "secret" not in response.text and "Traceback" not in response.text
