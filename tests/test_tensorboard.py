"""A real TensorBoard serves what a run logs: scalars, augmented-image grid, confusion matrices, hparams, profile."""

import json
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import make_config
from trainer import train


@pytest.fixture(scope="module")
def logged_run(cifar_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tensorboard") / "cnn-run"
    train.run(make_config(cifar_dir, model_dir, steps_per_epoch=4, epochs=2, steps_per_loop=1, mixup=0.2,
                          translate=2, profile_steps=(2, 3)))
    return model_dir


@pytest.fixture(scope="module")
def tensorboard(logged_run):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "tensorboard.main", f"--logdir={logged_run / 'logs'}",
                                "--host=127.0.0.1", f"--port={port}", "--load_fast=false", "--reload_interval=1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            try:
                if json.loads(urllib.request.urlopen(f"{url}/data/runs", timeout=5).read()):
                    break
            except OSError:
                pass
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def get(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while True:  # TensorBoard loads event files in the background; retry until they show.
        try:
            return json.loads(urllib.request.urlopen(request, timeout=10).read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def wait_for(fetch, check, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if check(value) or time.monotonic() > deadline:
            return value
        time.sleep(1)


def test_scalars_are_served(tensorboard):
    tags = wait_for(lambda: get(f"{tensorboard}/data/plugin/scalars/tags"),
                    lambda tags: "accuracy" in tags.get("eval", {}))
    assert {"loss", "learning_rate", "images_per_second", "accuracy", "epoch_seconds"} <= set(tags["train"])
    assert {"loss", "accuracy"} <= set(tags["eval"])
    assert {"test_accuracy", "test_loss"} <= set(tags["."])


def test_augmented_images_and_confusion_matrices_are_served(tensorboard):
    tags = wait_for(lambda: get(f"{tensorboard}/data/plugin/images/tags"),
                    lambda tags: "final_confusion_matrix" in tags.get("eval", {}))
    assert "augmented_inputs" in tags["train"]
    assert {"confusion_matrix", "final_confusion_matrix"} <= set(tags["eval"])
    steps = get(f"{tensorboard}/data/plugin/images/images?run=eval&tag=confusion_matrix")
    assert len(steps) == 2  # One per epoch.


def test_hparams_dashboard_lists_the_flags_and_metrics(tensorboard):
    experiment = wait_for(lambda: get(f"{tensorboard}/data/plugin/hparams/experiment", {"experimentName": ""}),
                          lambda experiment: experiment.get("hparamInfos"))
    names = {info["name"] for info in experiment["hparamInfos"]}
    assert {"model", "learning_rate", "batch_size", "mixup"} <= names
    metrics = {info["name"]["tag"] for info in experiment["metricInfos"]}
    assert {"accuracy", "test_accuracy"} <= metrics


def test_profile_trace_is_captured(logged_run, tensorboard):
    traces = list(pathlib.Path(logged_run, "logs", "plugins", "profile").glob("*/*.xplane.pb"))
    assert traces, "no profiler trace was written"
    plugins = get(f"{tensorboard}/data/plugins_listing")
    assert "profile" in plugins or "profile_redirect" in plugins
