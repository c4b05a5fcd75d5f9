"""trainer.serve as a real server process on 127.0.0.1: predictions, Vertex AI routes, metrics, load, bad input, page.

One server process serves the whole module (started once: it costs seconds); the session trains one tiny run.
"""

import base64
import concurrent.futures
import fcntl
import http.client
import io
import json
import os
import pathlib
import re
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from benchmarks.serving import ServerProcess
from helpers import fails_in_process
from helpers import make_config
from helpers import run_in_process
from trainer.results import predict
from trainer.serving import serve

VERTEX_PREDICT = "/v1/endpoints/1234/deployedModels/5678:predict"
VERTEX_HEALTH = "/v1/endpoints/1234/deployedModels/5678"
# Small limits, so that each refusal takes a small request.
LIMITS = ("--max_request_bytes=300000", "--max_instances=8", "--max_image_pixels=4000000")


def train_served_run(tmp_path_factory, cifar_dir) -> pathlib.Path:
    """One tiny cnn run per test session, shared by the serving and export tests; the first to ask trains it.

    pytest-xdist's workers each have a temporary directory below a shared one: the run goes there, trained by
    the first worker while the others wait on a lock.
    """
    from trainer.training import train

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    model_dir = shared / "served-run"
    with open(shared / "served-run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (model_dir / "export" / "saved_model.pb").exists():
            train.run(make_config(cifar_dir, model_dir))
    return model_dir


@pytest.fixture(scope="session")
def served_run(tmp_path_factory, cifar_dir) -> pathlib.Path:
    return train_served_run(tmp_path_factory, cifar_dir)


@pytest.fixture(scope="module")
def server(served_run, tmp_path_factory):
    process = ServerProcess(served_run, *LIMITS, log_path=tmp_path_factory.mktemp("server") / "server.log",
                            env={"AIP_PREDICT_ROUTE": VERTEX_PREDICT, "AIP_HEALTH_ROUTE": VERTEX_HEALTH})
    process.start()
    yield process
    assert process.stop() == 0, process.log()[-3000:]  # SIGTERM is a clean shutdown, as Kubernetes expects.


def encode(pixels: np.ndarray, kind: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, kind, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def request(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            chunked: bool = False) -> tuple[int, dict | str]:
    """(status, parsed JSON or text) of one request on a new connection."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request(method, path, body=iter([body]) if chunked else body, headers=headers or {},
                           encode_chunked=chunked)
        response = connection.getresponse()
        text = response.read().decode()
        is_json = response.getheader("content-type", "").startswith("application/json")
        return response.status, json.loads(text) if is_json else text
    finally:
        connection.close()


def predict_files(url: str, files: list[bytes], path: str = "/v1/models/cnn:predict", **body) -> tuple[int, dict]:
    payload = json.dumps({"instances": [{"b64": b64(data)} for data in files], **body}).encode()
    return request(url, "POST", path, payload, {"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[pathlib.Path]:
    folder = tmp_path_factory.mktemp("serve-photos")
    random = np.random.default_rng(5)
    files = {"odd.png": encode(random.integers(0, 256, (47, 61, 3), np.uint8)),
             "big.jpg": encode(random.integers(0, 256, (300, 200, 3), np.uint8), "JPEG", quality=90),
             "grey.png": encode(random.integers(0, 256, (20, 13), np.uint8)),
             "alpha.png": encode(random.integers(0, 256, (33, 90, 4), np.uint8))}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in files]


def test_predictions_agree_with_trainer_predict(server, served_run, photos, capsys):
    status, answer = predict_files(server.url, [path.read_bytes() for path in photos], parameters={"top_k": 10})
    assert status == 200, answer
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(predict, f"--model_dir={served_run}", "--output=json", "--top_k=10", *map(str, photos))
    assert exit_info.value.code == 0
    expected = json.loads(capsys.readouterr().out)
    assert len(answer["predictions"]) == len(expected) == len(photos)
    for served, record in zip(answer["predictions"], expected):
        assert [item["class"] for item in served["top_k"]] == [item["class"] for item in record["predictions"]]
        assert [item["probability"] for item in served["top_k"]] == pytest.approx(
            [item["probability"] for item in record["predictions"]], abs=1e-5)
        assert served["probabilities"] == pytest.approx({item["class"]: item["probability"]
                                                         for item in record["predictions"]}, abs=1e-5)


def test_vertex_routes_take_both_instance_forms(server, photos):
    image = photos[0].read_bytes()
    assert request(server.url, "GET", VERTEX_HEALTH) == (200, {"status": "ready", "model": "cnn"})
    body = json.dumps({"instances": [{"image_bytes": {"b64": b64(image)}}, {"b64": b64(image)}],
                       "parameters": {"top_k": 2}}).encode()
    status, answer = request(server.url, "POST", VERTEX_PREDICT, body, {"Content-Type": "application/json"})
    assert status == 200, answer
    first, second = answer["predictions"]
    assert first == second and len(first["top_k"]) == 2 and len(first["probabilities"]) == 10
    assert first["top_k"][0]["probability"] == max(first["probabilities"].values())
    _, default = predict_files(server.url, [image])
    assert len(default["predictions"][0]["top_k"]) == 3  # --top_k's default when the request does not say.


def test_status_and_metadata_describe_the_run(server, served_run):
    assert request(server.url, "GET", "/v1/models/cnn")[1]["model_version_status"][0]["state"] == "AVAILABLE"
    status, metadata = request(server.url, "GET", "/v1/models/cnn/metadata")
    metrics = json.loads((served_run / "metrics.json").read_text())
    assert status == 200
    assert metadata["model"]["network"] == "cnn" and metadata["model"]["classes"] == metrics["class_names"]
    assert metadata["model"]["test_accuracy"] == metrics["test_accuracy"]
    assert metadata["serving"]["max_instances"] == 8 and metadata["serving"]["batching"] is True
    status, page = request(server.url, "GET", "/")
    assert status == 200 and '<script src="/static/app.js">' in page
    assert request(server.url, "GET", "/static/style.css")[0] == 200


def metric_values(url: str) -> dict[str, float]:
    status, text = request(url, "GET", "/metrics")
    assert status == 200
    return {key: float(value) for key, value in re.findall(r"^(serving_\S+) (\S+)$", text, re.M)}


def test_metrics_count_requests_errors_latency_and_batches(server, photos):
    route = 'route="/v1/models/{name:model}:predict"'
    before = metric_values(server.url)
    for _ in range(3):
        assert predict_files(server.url, [photos[0].read_bytes()])[0] == 200
    assert predict_files(server.url, [b"no image"])[0] == 400
    after = metric_values(server.url)

    def change(name):
        return after.get(name, 0) - before.get(name, 0)

    assert change(f'serving_requests_total{{code="200",{route}}}') == 3
    assert change(f'serving_errors_total{{code="400",{route}}}') == 1
    assert change(f"serving_request_latency_seconds_count{{{route}}}") == 4
    assert change("serving_batch_size_count") >= 1 and change("serving_batch_size_sum") == 3
    assert change("serving_instances_total") == 3 and after["serving_model_ready"] == 1


def test_load_every_request_answered_with_its_own_prediction(server):
    """500 requests from 16 threads, 25 different images: each answer equals that image's answer alone, so merging
    requests into batches never mixes them up; the server then still answers health checks."""
    random = np.random.default_rng(7)
    images = [encode(random.integers(0, 256, (32, 32, 3), np.uint8)) for _ in range(25)]
    alone = [predict_files(server.url, [image])[1]["predictions"][0] for image in images]
    before = metric_values(server.url)
    local = threading.local()

    def send(index: int):
        if not hasattr(local, "connection"):  # One keep-alive connection per thread, as a client pool keeps.
            host, port = server.url.removeprefix("http://").split(":")
            local.connection = http.client.HTTPConnection(host, int(port), timeout=60)
        body = json.dumps({"instances": [{"b64": b64(images[index % 25])}]})
        local.connection.request("POST", "/v1/models/cnn:predict", body, {"Content-Type": "application/json"})
        response = local.connection.getresponse()
        return index, response.status, json.loads(response.read())

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, range(500)))
    assert len(answers) == 500
    for index, status, answer in answers:
        assert status == 200, answer
        got = answer["predictions"][0]
        assert [item["class"] for item in got["top_k"]] == [item["class"] for item in alone[index % 25]["top_k"]]
        assert got["probabilities"] == pytest.approx(alone[index % 25]["probabilities"], abs=1e-5)
    after = metric_values(server.url)
    calls = after["serving_batch_size_count"] - before["serving_batch_size_count"]
    assert after["serving_batch_size_sum"] - before["serving_batch_size_sum"] == 500
    assert calls < 500, "no two requests were merged into one model call"
    assert request(server.url, "GET", "/healthz")[0] == 200


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG of a few hundred bytes whose header declares width x height pixels: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (1 + 3 * width) * 2)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", rows) + chunk(b"IEND", b""))


GOOD = encode(np.full((32, 32, 3), 120, np.uint8))
NOISE_JPEG = encode(np.random.default_rng(0).integers(0, 256, (128, 128, 3), np.uint8), "JPEG")
JSON = {"Content-Type": "application/json"}


def instances(*files: bytes) -> bytes:
    return json.dumps({"instances": [{"b64": b64(data)} for data in files]}).encode()


BAD_REQUESTS = {
    "not an image": ("POST", "/v1/models/cnn:predict", instances(GOOD, b"%PDF-1.4 not an image"), JSON, 400,
                     "instances[1]: not an image file"),
    "truncated JPEG": ("POST", "/v1/models/cnn:predict",
                       instances(NOISE_JPEG[:len(NOISE_JPEG) // 2]),
                       JSON, 400, "instances[0]: cannot decode the image"),
    "decompression bomb": ("POST", "/v1/models/cnn:predict", instances(GOOD, GOOD, png_declaring(3000, 3000)), JSON,
                           400, "instances[2]: the image declares 3,000x3,000 pixels, more than --max_image_pixels"),
    "Pillow-size bomb": ("POST", "/v1/models/cnn:predict", instances(png_declaring(100000, 100000)), JSON, 400,
                         "instances[0]: the image declares more pixels than Pillow allows"),
    "body too large": ("POST", "/v1/models/cnn:predict", instances(b"x" * 240000), JSON, 413,
                       "more than --max_request_bytes=300,000"),
    "too many instances": ("POST", "/v1/models/cnn:predict", instances(*[GOOD] * 9), JSON, 413,
                           "9 instances, more than --max_instances=8"),
    "malformed JSON": ("POST", "/v1/models/cnn:predict", b'{"instances": [{"b64": ', JSON, 400,
                       "the body is not valid JSON"),
    "wrong content type": ("POST", "/v1/models/cnn:predict", instances(GOOD), {"Content-Type": "text/plain"}, 415,
                           "Content-Type: application/json, not text/plain"),
    "no content type": ("POST", "/v1/models/cnn:predict", instances(GOOD), {}, 415, "not no Content-Type"),
    "not base64": ("POST", "/v1/models/cnn:predict", b'{"instances": [{"b64": "@@@"}]}', JSON, 400,
                   "instances[0]: b64 is not valid base64"),
    "wrong instance form": ("POST", "/v1/models/cnn:predict", b'{"instances": [{"url": "http://x/y.png"}]}', JSON, 400,
                            'instances[0] must be {"b64"'),
    "bad top_k": ("POST", "/v1/models/cnn:predict", b'{"instances": [{"b64": "AA=="}], "parameters": {"top_k": 11}}',
                  JSON, 400, "top_k must be an integer from 1 to 10"),
    "unknown route": ("GET", "/v2/predict", None, {}, 404, "no route GET /v2/predict"),
    "unknown model": ("POST", "/v1/models/resnet:predict", instances(GOOD), JSON, 404,
                      "no model named 'resnet'; this server serves 'cnn'"),
    "wrong method": ("GET", "/v1/models/cnn:predict", None, {}, 405, "GET is not allowed"),
    # Pillow reads an EPS file's size, then needs Ghostscript to draw it.
    "EPS image": ("POST", "/v1/models/cnn:predict", instances(encode(np.zeros((8, 8, 3), np.uint8), "EPS")), JSON,
                  400, "instances[0]: EPS images are not supported; send PNG, JPEG, GIF, BMP, WebP or TIFF."),
    "JSON nested too deeply": ("POST", "/v1/models/cnn:predict", b"[" * 100_000 + b"]" * 100_000, JSON, 400,
                               "the body's JSON is nested too deeply"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(server, case):
    method, path, body, headers, expected_status, expected_message = BAD_REQUESTS[case]
    status, answer = request(server.url, method, path, body, headers)
    assert status == expected_status and isinstance(answer, dict) and set(answer) == {"error"}, (status, answer)
    assert expected_message in answer["error"]
    assert predict_files(server.url, [GOOD])[0] == 200


def test_a_chunked_body_is_cut_off_at_the_limit(server):
    status, answer = request(server.url, "POST", "/v1/models/cnn:predict", instances(b"x" * 240000), JSON,
                             chunked=True)
    assert status == 413 and "at least" in answer["error"] and "--max_request_bytes=300,000" in answer["error"]
    assert predict_files(server.url, [GOOD])[0] == 200


@pytest.mark.parametrize("make_dir, message", [
    (lambda root: root / "missing", "is not a directory"),
    (lambda root: root, "has no export/ folder"),
])
def test_a_model_dir_that_cannot_be_served_stops_start_up(tmp_path, capsys, make_dir, message):
    model_dir = make_dir(tmp_path)
    assert message in fails_in_process(capsys, serve, f"--model_dir={model_dir}", "--port=0")


def test_an_unreadable_export_stops_the_server_with_one_error_line(tmp_path, capsys):
    """The export is found but cannot be loaded: the server, already listening, stops with exit status 2."""
    (tmp_path / "export" / "variables").mkdir(parents=True)
    (tmp_path / "export" / "saved_model.pb").write_bytes(b"not a SavedModel")
    assert "is not an export of trainer.task" in fails_in_process(capsys, serve, f"--model_dir={tmp_path}",
                                                                  "--port=0")


def test_flags_and_vertex_environment(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("AIP_HTTP_PORT", "8123")
    monkeypatch.setenv("AIP_STORAGE_URI", str(tmp_path))
    serve.FLAGS.unparse_flags()  # Earlier tests parsed other values in this process.
    serve.FLAGS(["trainer.serve"])
    try:
        assert serve.listening_port() == 8123 and serve.settings_from_flags().model_dir == str(tmp_path)
        serve.FLAGS(["trainer.serve", "--port=9000"])
        assert serve.listening_port() == 9000
    finally:
        serve.FLAGS.unparse_flags()
    monkeypatch.setenv("AIP_HTTP_PORT", "http")
    assert "$AIP_HTTP_PORT='http' is not a port number" in fails_in_process(capsys, serve)
    for flag, message in (("--max_batch_size=0", "--max_batch_size=0 must be from 1 to 4096."),
                          ("--model_name=a/b", "--model_name='a/b' is not valid"),
                          ("--batch_timeout_ms=-1", "--batch_timeout_ms=-1 must be from 0 to 1000.")):
        assert message in fails_in_process(capsys, serve, f"--model_dir={tmp_path}", flag)




def test_a_busy_port_is_one_error_line(tmp_path, capsys, served_run):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert f"cannot listen on --host=127.0.0.1 --port={port}" in fails_in_process(
            capsys, serve, f"--model_dir={served_run}", f"--port={port}")


def test_health_says_not_ready_until_the_model_is_loaded(served_run):
    """The server answers at once; until its model is loaded the health route and predictions say 503."""
    import uvicorn

    from trainer.serving import prediction_requests
    from trainer.serving import served_model
    from trainer.serving import server as server_lib

    release = threading.Event()

    def slow_load():
        release.wait(30)
        return served_model.load(str(served_run), None)

    settings = server_lib.ServerSettings(model_dir=str(served_run), model_name=None, limits=prediction_requests.Limits(
        max_request_bytes=1 << 20, max_instances=4, max_image_pixels=1 << 20))
    application = server_lib.create_app(settings, slow_load, on_load_failure=lambda error: None)
    listener = serve.open_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    running = uvicorn.Server(uvicorn.Config(application, log_config=None, log_level="warning"))
    thread = threading.Thread(target=running.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not running.started and time.monotonic() < deadline:
            time.sleep(0.02)
        status, answer = request(url, "GET", "/healthz")
        assert status == 503 and "still loading" in answer["error"]
        assert predict_files(url, [GOOD])[0] == 503
        release.set()
        while request(url, "GET", "/healthz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert predict_files(url, [GOOD])[0] == 200
    finally:
        release.set()
        running.should_exit = True
        thread.join(30)


def test_the_page_shows_predictions_in_a_real_browser(server, tmp_path):
    """Headless Chromium uploads two images (and a file that is not one) through the page's file picker and
    draws each image's top classes with the API's probabilities, and the error for the other file."""
    pytest.importorskip("selenium", reason="pip install selenium")
    import docs.screenshot as screenshot

    if screenshot.browser_paths() is None:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    random = np.random.default_rng(11)
    files = {"small.png": encode(random.integers(0, 256, (32, 32, 3), np.uint8)),
             "photo.jpg": encode(random.integers(0, 256, (240, 320, 3), np.uint8), "JPEG"),
             "notes.txt": b"not an image"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with screenshot.headless_chromium() as driver:
        cards = screenshot.classify_on_page(driver, f"{server.url}/", [tmp_path / name for name in files])
        screenshot.save_page(driver, tmp_path / "page.png")
    for card, name in zip(cards[:2], files):
        assert card["state"] == "done" and card["thumbnail_loaded"], card
        expected = predict_files(server.url, [files[name]])[1]["predictions"][0]["top_k"]
        assert [(cls, round(probability, 5)) for cls, probability, _ in card["bars"]] == [
            (item["class"], round(item["probability"], 5)) for item in expected]
        assert card["bars"][0][2] == f"{100 * expected[0]['probability']:.1f}%"
    assert cards[2]["state"] == "failed" and "not an image file" in cards[2]["message"]
    with Image.open(tmp_path / "page.png") as page:
        assert page.width == 1280 and page.height >= 800


def test_a_gs_run_is_downloaded_and_served(served_run, gcs_bucket):
    """A run in Cloud Storage (the emulator) loads like the local one and gives the same answers."""
    from google.cloud import storage

    from trainer.serving import served_model

    bucket = storage.Client().bucket(gcs_bucket)
    for path in served_run.rglob("*"):
        if path.is_file() and "checkpoints" not in path.parts and "logs" not in path.parts:
            bucket.blob(f"serve-run/{path.relative_to(served_run)}").upload_from_filename(str(path))
    remote = served_model.load(f"gs://{gcs_bucket}/serve-run", None)
    local = served_model.load(str(served_run), None)
    assert remote.name == local.name == "cnn" and remote.class_names == local.class_names
    assert remote.description["test_accuracy"] == local.description["test_accuracy"]
    images = np.random.default_rng(13).integers(0, 256, (4, 32, 32, 3), np.uint8)
    np.testing.assert_allclose(remote.probabilities(images), local.probabilities(images), atol=1e-6)
