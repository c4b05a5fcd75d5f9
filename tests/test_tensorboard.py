"""A real TensorBoard serves what a run logs: scalars, augmented-image grid, confusion matrices, hparams, profile."""

import gzip
import json
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import make_config, read_metrics
from trainer.training import train


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
            with urllib.request.urlopen(request, timeout=10) as response:
                payload = response.read()
                # The profile plugin gzips its answers whatever the request accepts.
                if response.headers.get("Content-Encoding") == "gzip":
                    payload = gzip.decompress(payload)
            return json.loads(payload)
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
    assert {"loss", "accuracy", "test_accuracy", "test_loss"} <= set(tags["eval"])


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


# What the HParams dashboard asks for to fill its table: every session, whatever its status.
SESSION_GROUPS_REQUEST = {"experimentName": "", "startIndex": 0, "sliceSize": 100,
                          "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]}


def test_hparams_dashboard_shows_the_runs_final_eval_and_test_metrics(logged_run, tensorboard):
    """With `tensorboard --logdir MODEL_DIR/logs`, as the README says, every metric column has the run's value."""
    expected = read_metrics(logged_run)
    response = wait_for(lambda: get(f"{tensorboard}/data/plugin/hparams/session_groups", SESSION_GROUPS_REQUEST),
                        lambda response: any(len(group.get("metricValues", [])) >= 4
                                                        for group in response.get("sessionGroups", [])),
                        timeout=20)
    (group,) = response["sessionGroups"]
    assert group["name"] == logged_run.name and group["hparams"]["model"] == "cnn"
    values = {value["name"]["tag"]: value["value"] for value in group["metricValues"]}
    assert values == {"accuracy": pytest.approx(expected["history"][-1]["eval_accuracy"], rel=1e-6),
                      "loss": pytest.approx(expected["history"][-1]["eval_loss"], rel=1e-6),
                      "test_accuracy": pytest.approx(expected["test_accuracy"], rel=1e-6),
                      "test_loss": pytest.approx(expected["test_loss"], rel=1e-6)}


def test_profile_plugin_serves_the_captured_trace(logged_run, tensorboard):
    traces = list(pathlib.Path(logged_run, "logs", "plugins", "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1, "expected one profiler trace for --profile_steps=2,3"
    plugins = get(f"{tensorboard}/data/plugins_listing")
    # Without tensorboard-plugin-profile, TensorBoard lists a "profile_redirect" page that asks to install it.
    assert plugins.get("profile", {}).get("enabled") is True and "profile_redirect" not in plugins
    profile = f"{tensorboard}/data/plugin/profile"
    trace_run = traces[0].parent.name  # The profile plugin's runs are the trace folders under the logdir root.
    assert get(f"{profile}/runs") == [trace_run]
    tools = get(f"{profile}/run_tools?run={trace_run}")
    assert any(tool.startswith("trace_viewer") for tool in tools), tools
    hosts = get(f"{profile}/hosts?run={trace_run}&tag=trace_viewer")
    assert [host["hostname"] for host in hosts] == [traces[0].name.removesuffix(".xplane.pb")]
