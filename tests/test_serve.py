"""`finegrain serve` over real HTTP: a uvicorn server on 127.0.0.1 answering httpx requests.

The index is built from the shipped demo photos with the small random embedder of
test_index.py (a fixed random feature map: enough to find an indexed photo first and to keep
classes apart, with no training to wait for). Every answer is checked against what the
library computes for the same file without a server, every limit against its status and JSON
message, and the index is replaced under a stream of queries by `finegrain index add`.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import shutil
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from typer.testing import CliRunner

import finegrain
from finegrain.cli import app as cli
from finegrain.data import demo_root
from finegrain.data.transforms import eval_transform
from finegrain.eval.inference import InferenceOptions, Predictor
from finegrain.index.build import build_index
from finegrain.index.search import search_index
from finegrain.index.store import IndexFolder
from finegrain.preprocessing import Preprocessing
from finegrain.serve.app import create_app
from finegrain.serve.config import ServeConfig, UploadLimits

CLASSES, TRAIN_PER_CLASS, NEW_PER_CLASS = 6, 8, 3
TOKEN = "a-test-token-of-some-length"
LIMITS = UploadLimits(max_bytes=256 << 10, max_pixels=1_000_000)


# ------------------------------------------------------------------------------------- setup
def copy_demo(split: str, per_class: int, dest: Path) -> Path:
    for folder in sorted((demo_root() / split).iterdir())[:CLASSES]:
        (dest / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.jpg"))[:per_class]:
            shutil.copy(image, dest / folder.name / image.name)
    return dest


def small_model(path: Path, *, classes: list[str] | None = None) -> Path:
    """The 32-pixel, width-8 assemble_resnet50 of test_index.py: an embedder, or a classifier of `classes`."""
    torch.manual_seed(0)
    if classes is None:
        model = finegrain.create_embedder("assemble_resnet50", base_width=8, embedding_size=64)
        model.preprocessing = Preprocessing(model.preprocessing.mean, model.preprocessing.std, 32, 32, 32)
        return finegrain.save_model(model, path)
    model = finegrain.create_model("assemble_resnet50", num_classes=len(classes), base_width=8)
    model.preprocessing = Preprocessing(model.preprocessing.mean, model.preprocessing.std, 32, 36, 32)
    return finegrain.save_model(model, path, classes=tuple(classes))


def build_demo_index(root: Path) -> dict[str, Path]:
    train = copy_demo("train", TRAIN_PER_CLASS, root / "photos")
    weights = small_model(root / "embedder.safetensors")
    build_index(train, root / "index", weights=weights, progress=False)
    return {"root": root, "photos": train, "weights": weights, "index": root / "index"}


class Server:
    """A real uvicorn server on a free 127.0.0.1 port, in a thread of this process."""

    def __init__(self, config: ServeConfig) -> None:
        self.app = create_app(config)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def upload(path: Path | bytes, name: str = "query.jpg") -> dict:
    data = path.read_bytes() if isinstance(path, Path) else path
    return {"image": (name, data, "application/octet-stream")}


def item_ids(index: Path) -> dict[str, int]:
    with IndexFolder(index, gpu=False) as folder:
        return {item.path: item.id for item in folder.all_items()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    found = build_demo_index(root)
    classes = sorted(folder.name for folder in found["photos"].iterdir())
    found["classifier"] = small_model(root / "classifier.safetensors", classes=classes)
    return found


@pytest.fixture(scope="module")
def server(demo):
    running = Server(ServeConfig(index=demo["index"], classifier=demo["classifier"], max_batch=8, max_wait_ms=20,
                                 limits=LIMITS, reload_interval=0))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as session:
        yield session


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == status and body["error"] == code and len(body["message"]) > 10, body
    return body


# ------------------------------------------------------------------------------------ search
def test_an_indexed_photo_finds_itself_first_as_the_library_does(demo, client):
    ids = item_ids(demo["index"])
    photos = sorted(demo["photos"].glob("*/*.jpg"))[::9]
    for photo in photos:
        answer = client.post("/v1/search", files=upload(photo), data={"k": "5"}).json()
        first = answer["neighbours"][0]
        assert first["id"] == ids[str(photo.resolve())] and first["label"] == photo.parent.name
        assert first["score"] == pytest.approx(1.0, abs=1e-4)
        assert answer["query"] == {"label": photo.parent.name, "indexed_id": first["id"]}  # known by its bytes
        expected = search_index(demo["index"], [photo], k=5).results[0].neighbours
        assert [n["id"] for n in answer["neighbours"]] == [n.id for n in expected]
        assert [n["score"] for n in answer["neighbours"]] == pytest.approx([n.similarity for n in expected], abs=1e-5)
        assert [n["rank"] for n in answer["neighbours"]] == [1, 2, 3, 4, 5]


def test_a_photo_not_in_the_index_has_no_known_label_unless_given(demo, client):
    outside = sorted((demo_root() / "test" / sorted(p.name for p in demo["photos"].iterdir())[0]).glob("*.jpg"))[0]
    answer = client.post("/v1/search", files=upload(outside), data={"k": "3"}).json()
    assert answer["query"] == {"label": None, "indexed_id": None} and len(answer["neighbours"]) == 3
    given = client.post("/v1/search", files=upload(outside), data={"k": "3", "label": "Lemon"}).json()
    assert given["query"]["label"] == "Lemon"


def test_k_beyond_the_index_size_returns_every_image_once(demo, client):
    count = len(item_ids(demo["index"]))
    answer = client.post("/v1/search", files=upload(next(demo["photos"].glob("*/*.jpg"))), data={"k": "1000"}).json()
    assert sorted(n["id"] for n in answer["neighbours"]) == list(range(count))


def test_info_reports_the_model_index_and_the_recall_measured_at_build(demo, client):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/info").json()
    with IndexFolder(demo["index"], gpu=False) as folder:
        manifest = folder.manifest
    assert info["index"]["size"] == len(item_ids(demo["index"])) and info["index"]["dim"] == 64
    assert info["index"]["type"] == manifest["index"]["key"]
    assert info["index"]["recall"] == manifest["index"]["recall"]
    assert info["index"]["version"] == (demo["index"] / "manifest.sha256").read_text().split()[0]
    assert info["model"]["weights_sha256"] == hashlib.sha256(demo["weights"].read_bytes()).hexdigest()
    assert info["classifier"]["classes"] == CLASSES
    assert info["limits"] == {"max_upload_bytes": LIMITS.max_bytes, "max_pixels": LIMITS.max_pixels, "max_k": 1000}


def test_classify_gives_the_classifier_top5_with_its_probabilities(demo, client):
    photo = sorted(demo["photos"].glob("*/*.jpg"))[3]
    answer = client.post("/v1/classify", files=upload(photo)).json()["classes"]
    model = finegrain.load_model(demo["classifier"])
    image = eval_transform(model.preprocessing)(np.array(Image.open(photo).convert("RGB")))
    predictor = Predictor(model, "cpu", InferenceOptions.fast(torch.device("cpu")))
    probabilities = torch.softmax(predictor(image[None]), 1)[0]
    top = probabilities.topk(5)
    assert [c["label"] for c in answer] == [model.info.classes[int(i)] for i in top.indices]
    assert [c["probability"] for c in answer] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_concurrent_queries_share_batches_and_get_the_answers_they_get_alone(demo, server, client):
    photos = sorted(demo["photos"].glob("*/*.jpg"))[:16]
    alone = [client.post("/v1/search", files=upload(p), data={"k": "4"}).json()["neighbours"] for p in photos]
    before = client.get("/v1/info").json()["batching"]["search"]

    def ask(photo: Path) -> list[dict]:
        with httpx.Client(base_url=server.url, timeout=60) as own:
            return own.post("/v1/search", files=upload(photo), data={"k": "4"}).json()["neighbours"]

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, photos))
    after = client.get("/v1/info").json()["batching"]["search"]
    assert after["jobs"] - before["jobs"] == 16
    assert after["batches"] - before["batches"] < 16  # some of them were embedded in one forward pass
    for one, many in zip(alone, together):
        assert [n["id"] for n in one] == [n["id"] for n in many]
        assert [n["score"] for n in one] == pytest.approx([n["score"] for n in many], abs=1e-4)


def test_thumbnails_are_the_indexed_images_by_id(demo, client):
    photo = sorted(demo["photos"].glob("*/*.jpg"))[5]
    answer = client.post("/v1/search", files=upload(photo), data={"k": "1"}).json()
    response = client.get(answer["neighbours"][0]["thumbnail"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumbnail = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.float32)
    original = np.asarray(Image.open(photo).convert("RGB"), dtype=np.float32)
    assert thumbnail.shape == original.shape  # the demo photos are smaller than a thumbnail: same size
    assert np.abs(thumbnail - original).mean() < 8  # the same picture after one more JPEG pass


def test_the_page_and_its_two_files_load_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]  # the browser refuses any other origin
    for path in ("/", "/app.js", "/app.css"):
        text = client.get(path).text
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path
    assert '<script src="/app.js"' in page.text and '<link rel="stylesheet" href="/app.css">' in page.text


# ------------------------------------------------------------------------------------ limits
def tiny_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, format="PNG")
    return out.getvalue()


def bomb_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and whose data is cut off: decoding it would fail,
    so only a decision taken from the header can answer 413."""
    data = tiny_png(1, 1)
    ihdr = bytearray(data[8:33])
    ihdr[8:16] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    ihdr[21:25] = zlib.crc32(bytes(ihdr[4:21])).to_bytes(4, "big")
    return data[:8] + bytes(ihdr) + b"\x00\x00\x00\x10IDAT" + b"\x78\x9c" + b"\x00" * 14


@pytest.mark.parametrize("body, status, code", [
    (b"\xff\xd8" + b"\x00" * (LIMITS.max_bytes + 10), 413, "too_large"),  # over the image limit, in the body limit
    (b"\x00" * (3 * LIMITS.max_bytes), 413, "too_large"),  # over the body limit: refused before it is read
    (b"hello, not an image", 415, "not_an_image"),
    (b"", 415, "not_an_image"),
    (b"%PDF-1.7\n" + b"0" * 100, 415, "not_an_image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415, "not_an_image"),  # PIL could, we never try
    (tiny_png(1001, 1000), 413, "too_many_pixels"),  # a real image over the limit
    (bomb_header(60000, 60000), 413, "too_many_pixels"),  # beyond PIL's own bomb limit
    (bomb_header(1200, 1000), 413, "too_many_pixels"),  # over ours only: decided from the header
    (bomb_header(40, 40), 415, "not_an_image"),  # the same truncated file within the limit: undecodable
], ids=["bytes", "body", "text", "empty", "pdf", "eps", "pixels", "pil-bomb", "header-bomb", "truncated"])
def test_each_upload_limit_answers_its_status_and_a_json_message(client, body, status, code):
    assert_error(client.post("/v1/search", files=upload(body), data={"k": "3"}), status, code)


def test_a_chunked_body_without_a_length_is_cut_off_at_the_limit(client):
    chunks = (b"\0" * (64 << 10) for _ in range(3 * LIMITS.max_bytes // (64 << 10)))  # no Content-Length header
    response = client.post("/v1/search", content=chunks, headers={"content-type": "multipart/form-data; boundary=x"})
    assert_error(response, 413, "too_large")


@pytest.mark.parametrize("k", ["0", "1001", "-3", "ten", "2.5"])
def test_k_outside_1_to_1000_is_422(demo, client, k):
    body = assert_error(client.post("/v1/search", files=upload(next(demo["photos"].glob("*/*.jpg"))),
                                    data={"k": k}), 422, "invalid_request")
    assert "k" in body["message"]


def test_a_request_without_an_image_is_422_and_unknown_routes_404_in_json(client):
    assert "image" in assert_error(client.post("/v1/search", data={"k": "3"}), 422, "invalid_request")["message"]
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(client.get("/v1/search"), 405, "method_not_allowed")


@pytest.mark.parametrize("path", [
    "/v1/thumbnail/../../../../etc/passwd", "/v1/thumbnail/..%2F..%2F..%2Fetc%2Fpasswd",
    "/v1/thumbnail/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/v1/thumbnail/%2Fetc%2Fpasswd", "/v1/thumbnail//etc/passwd",
    "/v1/thumbnail/0/../../../etc/passwd", "/v1/thumbnail/..", "/v1/thumbnail/-1", "/v1/thumbnail/0x1",
    "/v1/thumbnail/1%00", "/v1/thumbnail/99999", "/v1/thumbnail/0%2F..%2F..%2Fembedder.safetensors",
])
def test_thumbnail_path_traversal_answers_404(server, path):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", path)  # sent as written: http.client does not normalise '..'
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == 404, (path, body)
    assert response.getheader("content-type") == "application/json" and b"root:" not in body


def test_a_thumbnail_outside_the_image_folders_is_refused_even_when_indexed(demo, tmp_path):
    from finegrain.serve.live_index import Snapshot

    with IndexFolder(demo["index"], gpu=False) as folder:
        snapshot = Snapshot(folder, "v", embedder=None)
        assert snapshot.image_path(0) is not None
        snapshot.roots = (tmp_path.resolve(),)  # as if the index had been built elsewhere
        assert snapshot.image_path(0) is None
        assert snapshot.image_path(folder.count) is None


# ------------------------------------------------------------------------------------- token
def test_a_token_server_refuses_a_missing_or_wrong_token_on_every_api_route(demo):
    running = Server(ServeConfig(index=demo["index"], token=TOKEN, reload_interval=0))
    try:
        photo = next(demo["photos"].glob("*/*.jpg"))
        with httpx.Client(base_url=running.url, timeout=60) as open_client:
            for method, path in [("GET", "/v1/info"), ("POST", "/v1/search"), ("POST", "/v1/classify"),
                                 ("GET", "/v1/thumbnail/0"), ("GET", "/v1/anything")]:
                for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"},
                                {"Authorization": TOKEN}):
                    response = open_client.request(method, path, headers=headers)
                    assert_error(response, 401, "unauthorized")
                    assert response.headers["www-authenticate"] == "Bearer"
            assert open_client.get("/healthz").status_code == 200 and open_client.get("/").status_code == 200
            good = {"Authorization": f"Bearer {TOKEN}"}
            answer = open_client.post("/v1/search", files=upload(photo), data={"k": "2"}, headers=good)
            assert answer.status_code == 200 and len(answer.json()["neighbours"]) == 2
            assert open_client.get("/v1/thumbnail/0", headers=good).status_code == 200
            assert_error(open_client.post("/v1/classify", files=upload(photo), headers=good), 404, "no_classifier")
    finally:
        running.stop()


def test_the_cli_refuses_a_network_address_without_a_token_and_a_short_token(demo):
    runner = CliRunner()
    result = runner.invoke(cli, ["serve", "--index", str(demo["index"]), "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "--token" in str(result.exception)
    result = runner.invoke(cli, ["serve", "--index", str(demo["index"]), "--token", "short"])
    assert result.exit_code != 0 and "16 characters" in str(result.exception)


# ------------------------------------------------------------------------------- live update
def test_index_add_during_a_stream_of_queries_fails_none_and_the_new_photos_are_found(demo, tmp_path):
    index = Path(shutil.copytree(demo["index"], tmp_path / "index"))
    new = copy_demo("test", NEW_PER_CLASS, tmp_path / "new")
    running = Server(ServeConfig(index=index, max_batch=8, max_wait_ms=5, reload_interval=0.1))
    photos = sorted(demo["photos"].glob("*/*.jpg"))
    failures, answers, stop = [], [], threading.Event()

    def stream(offset: int) -> None:
        with httpx.Client(base_url=running.url, timeout=60) as own:
            turn = offset
            while not stop.is_set():
                photo = photos[turn % len(photos)]
                response = own.post("/v1/search", files=upload(photo), data={"k": "3"})
                turn += 1
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    answers.append((response.json()["index_version"], response.json()["neighbours"][0]["label"],
                                    photo.parent.name))

    try:
        with httpx.Client(base_url=running.url, timeout=60) as own:
            before = own.get("/v1/info").json()["index"]
            streams = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
            for thread in streams:
                thread.start()
            subprocess.run([sys.executable, "-m", "finegrain", "index", "add", "--index", str(index), "--images",
                            str(new)], check=True, capture_output=True, timeout=300)
            deadline = time.monotonic() + 60
            while own.get("/v1/info").json()["index"]["version"] == before["version"]:
                assert time.monotonic() < deadline, "the server did not switch to the new index version"
                time.sleep(0.05)
            time.sleep(0.5)  # keep querying the new version for a moment
            stop.set()
            for thread in streams:
                thread.join()
            after = own.get("/v1/info").json()["index"]
            assert after["size"] == before["size"] + CLASSES * NEW_PER_CLASS
            ids = item_ids(index)
            for photo in sorted(new.glob("*/*.jpg"))[::4]:
                first = own.post("/v1/search", files=upload(photo), data={"k": "1"}).json()["neighbours"][0]
                assert first["id"] == ids[str(photo.resolve())] >= before["size"]
                assert first["score"] == pytest.approx(1.0, abs=1e-4)
                assert own.get(first["thumbnail"]).status_code == 200
    finally:
        stop.set()
        running.stop()
    assert failures == []
    versions = {version for version, _, _ in answers}
    assert versions == {before["version"], after["version"]}  # answered from both versions, none failed
    assert all(found == expected for _, found, expected in answers)  # each indexed photo found itself
