"""What careless users and flaky clusters do (issue 15): runs killed around the end of training, damaged
checkpoints and run files, full disks, storage outages, hostile inputs. Each must end right, in one line when it
fails, losing nothing that was good."""

import hashlib
import io
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from helpers import fails_in_process, make_config, read_metrics, run_in_process, start_task
from trainer.training import checkpoints
from trainer.results import compare
from trainer.training import export
from trainer.training import gcs
from trainer.results import reports
from trainer.training import storage
from trainer import task
from trainer.training import train
from trainer.errors import Failure
from trainer.errors import UsageError

# The S: `--train_split=train[:512] --eval_split=test[:256] --batch_size=32 --steps_per_epoch=5`, with
# early stopping on (its default), so the end of a run restores the best weights. It watches the loss, which the
# second epoch improves (accuracy on 256 images may not move), so the final weights differ from the first epoch's.
S = dict(train_split="train[:512]", eval_split="test[:256]", batch_size=32, steps_per_epoch=5, steps_per_loop=5,
         early_stopping_patience=5, early_stopping_monitor="eval_loss")


def s_flags(cifar_dir, model_dir, epochs: int) -> list[str]:
    return [f"--data_dir={cifar_dir}", f"--model_dir={model_dir}", "--train_split=train[:512]",
            "--eval_split=test[:256]", "--batch_size=32", "--steps_per_epoch=5", "--steps_per_loop=5",
            "--precision=float32", "--early_stopping_monitor=eval_loss", f"--epochs={epochs}"]


def fingerprint(values) -> str:
    """A hash of weight values in order, as the trainer logs and records it (Steps.weights_fingerprint)."""
    return hashlib.sha256(b"".join(np.ascontiguousarray(value).tobytes() for value in values)).hexdigest()[:16]


def export_fingerprint(model_dir, like: list[np.ndarray]) -> str:
    """The fingerprint of the export's copies of the weights `like` (by value: the export names variables its own
    way, and also holds state that is not a weight); a weight it does not hold counts as zeros."""
    path = os.path.join(model_dir, "export", "variables", "variables")
    reader = tf.train.load_checkpoint(path)
    exported = {np.ascontiguousarray(reader.get_tensor(name)).tobytes()
                for name, _ in tf.train.list_variables(path) if name.endswith("/.ATTRIBUTES/VARIABLE_VALUE")}
    return fingerprint(value if np.ascontiguousarray(value).tobytes() in exported else np.zeros_like(value)
                       for value in like)


def final_weights(model_dir) -> list[np.ndarray]:
    """The weights a run ends on, the best epoch's, as its newest checkpoint saved them, in model order."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints")))
    names = sorted((name for name in reader.get_variable_to_shape_map() if re.fullmatch(
        r"best_weights/\d+/\.ATTRIBUTES/VARIABLE_VALUE", name)), key=lambda name: int(name.split("/")[1]))
    return [reader.get_tensor(name) for name in names]


@pytest.fixture(scope="module")
def runs(cifar_dir, tmp_path_factory):
    """A finished one-epoch run, to extend to two epochs and to damage."""
    base = tmp_path_factory.mktemp("reliability")
    train.run(make_config(cifar_dir, base / "one-epoch", epochs=1, **S))
    return {"one_epoch": base / "one-epoch"}


def copy_of(run, tmp_path, name="run") -> pathlib.Path:
    target = tmp_path / name
    shutil.copytree(run, target)
    return target


def assert_finished_on_the_final_weights(model_dir, note=""):
    metrics = read_metrics(model_dir)
    assert metrics["epochs_completed"] == 2 and metrics["checkpoint_step"] == 10, note
    weights = final_weights(model_dir)
    assert metrics["weights_fingerprint"] == fingerprint(weights), note
    assert export_fingerprint(model_dir, like=weights) == fingerprint(weights), note
    assert not list(pathlib.Path(model_dir).glob("**/*.partial")) and not list(pathlib.Path(model_dir).glob(
        "**/*_temp*")), note


# 1. A rerun completes the outputs of a run killed between its last checkpoint and the end.

class Killed(BaseException):
    """Stands in for SIGKILL inside this process: nothing after it runs, and no handler catches it."""


def kill_at(monkeypatch, point: str) -> None:
    """Arranges for the next run in this process to die at `point`, one of the places around the end of training."""
    def die(*args, **kwargs):
        raise Killed(point)

    if point == "after the last checkpoint":
        monkeypatch.setattr(train.Trainer, "finish", die)
    elif point == "after the final evaluation":
        monkeypatch.setattr(train.Steps, "weights_fingerprint", die)  # Taken right after the final evaluation.
    elif point == "inside the export, before it is swapped in":
        original_replace = os.replace

        def replace(source, destination, *args, **kwargs):
            if str(destination).endswith(os.sep + "export"):
                die()
            return original_replace(source, destination, *args, **kwargs)

        monkeypatch.setattr(export.os, "replace", replace)
    elif point == "after the export, before metrics.json":
        monkeypatch.setattr(reports, "write_metrics", die)
    else:
        assert point == "after metrics.json"
        original_write = reports.write_metrics

        def write_then_die(*args, **kwargs):
            original_write(*args, **kwargs)
            die()

        monkeypatch.setattr(reports, "write_metrics", write_then_die)


KILL_POINTS = ["after the last checkpoint", "after the final evaluation", "inside the export, before it is swapped in",
               "after the export, before metrics.json", "after metrics.json"]


def test_chaos_kills_around_the_end_of_training_and_every_rerun_ends_on_the_final_weights(runs, cifar_dir, tmp_path):
    """The issue's reproduction (kill -9 of the extending run after "Restored the best weights"), then a rerun killed
    at a random point between the final evaluation, the export and metrics.json, then a rerun to the end."""
    model_dir = copy_of(runs["one_epoch"], tmp_path)
    log = tmp_path / "extend.log"
    process = start_task(*s_flags(cifar_dir, model_dir, epochs=2), output=log)
    deadline = time.monotonic() + 240
    while "Restored the best weights" not in log.read_text() and process.poll() is None:
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, log.read_text()[-2000:]
    assert read_metrics(model_dir)["checkpoint_step"] == 5  # The kill came before the new outputs.

    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 10**6))
    point = random.Random(seed).choice(KILL_POINTS[1:])
    with pytest.MonkeyPatch.context() as monkeypatch:
        kill_at(monkeypatch, point)
        with pytest.raises(Killed):
            train.run(make_config(cifar_dir, model_dir, epochs=2, **S))
    note = f"CHAOS_SEED={seed}: killed {point}"
    if point != "after metrics.json":
        assert read_metrics(model_dir)["checkpoint_step"] == 5, note  # Still the old outputs.

    metrics = train.run(make_config(cifar_dir, model_dir, epochs=2, **S))
    assert metrics["epochs_completed"] == 2, note
    assert_finished_on_the_final_weights(model_dir, note)
    # The one-epoch outputs would not pass: the check can fail.
    assert export_fingerprint(runs["one_epoch"], like=final_weights(model_dir)) != read_metrics(model_dir)[
        "weights_fingerprint"]


# 3. Damaged checkpoints: the newest intact one is restored, and nothing is overwritten when none is.

def saved_store(directory, steps=(1, 2, 3)) -> tuple[list[tf.Variable], str]:
    variables = [tf.Variable(np.zeros(1000, np.float32))]
    store = checkpoints.CheckpointStore(str(directory), {"model": variables}, is_chief=True)
    for step in steps:
        variables[0].assign(np.full(1000, step, np.float32))
        store.save(step)
    return variables, str(directory)


def restored_value(directory) -> float | None:
    variables = [tf.Variable(np.zeros(1000, np.float32))]
    path = checkpoints.CheckpointStore(str(directory), {"model": variables}, is_chief=True).restore_latest()
    return None if path is None else float(variables[0].numpy()[0])


@pytest.mark.parametrize("content", ["garbage {{{ not a state file", ""])
def test_a_damaged_state_file_is_rebuilt_from_the_checkpoints_on_disk(tmp_path, content):
    _, directory = saved_store(tmp_path)
    pathlib.Path(directory, "checkpoint").write_text(content)
    assert restored_value(directory) == 3
    assert tf.train.latest_checkpoint(directory).endswith("ckpt-3")


def test_a_truncated_or_incomplete_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    _, directory = saved_store(tmp_path)
    data = next(pathlib.Path(directory).glob("ckpt-3.data-*"))
    data.write_bytes(data.read_bytes()[:100])
    pathlib.Path(directory, "ckpt-2.index").unlink()
    assert restored_value(directory) == 1
    assert re.search(r"Skipping checkpoint .*ckpt-3: it cannot be read", caplog.text)
    assert re.search(r"Skipping checkpoint .*ckpt-2: its .index file is missing", caplog.text)
    assert tf.train.latest_checkpoint(directory).endswith("ckpt-1")  # Later saves do not count the damaged ones.


def test_when_no_checkpoint_loads_the_run_stops_in_one_line_and_changes_nothing(tmp_path):
    _, directory = saved_store(tmp_path, steps=(1, 2))
    for data in pathlib.Path(directory).glob("ckpt-*.data-*"):
        data.write_bytes(b"\0" * 10)
    before = {path.name: path.read_bytes() for path in pathlib.Path(directory).iterdir()}
    with pytest.raises(UsageError, match=r"None of the 2 checkpoints in .* can be read \(ckpt-2: .*; nothing was "
                                         r"changed"):
        restored_value(directory)
    assert {path.name: path.read_bytes() for path in pathlib.Path(directory).iterdir()} == before


def test_a_run_with_a_damaged_state_file_resumes_instead_of_starting_over(runs, cifar_dir, tmp_path):
    model_dir = copy_of(runs["one_epoch"], tmp_path)
    (model_dir / "checkpoints" / "checkpoint").write_text("garbage")
    checkpoint_files = {path.name: path.read_bytes() for path in (model_dir / "checkpoints").glob("ckpt-*")}
    metrics = train.run(make_config(cifar_dir, model_dir, epochs=1, **S))
    assert metrics["epochs_completed"] == 1 and metrics == read_metrics(runs["one_epoch"])
    assert {path.name: path.read_bytes() for path in (model_dir / "checkpoints").glob("ckpt-*")} == checkpoint_files


# 5. One line for each failure the README promises to explain.

@pytest.mark.parametrize("flag", ["--warmup_epochs=inf", "--learning_rate=inf", "--momentum=nan"])
def test_non_finite_flag_values_get_one_line(capsys, tmp_path, flag):
    line = fails_in_process(capsys, task, f"--model_dir={tmp_path}", flag)
    assert f"{flag} must be a finite number" in line


def test_an_image_size_too_big_for_memory_names_the_flags(capsys, cifar_dir, tmp_path):
    line = fails_in_process(capsys, task, *s_flags(cifar_dir, tmp_path / "run", epochs=1), "--image_size=100000")
    assert "--image_size=100000 with --batch_size=32 needs" in line and "lower --image_size or --batch_size" in line


@pytest.mark.parametrize("environment, expected", [
    ({"TF_CONFIG": '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}'},
     "task index 3 is outside the cluster's 1 worker"),
    ({"TF_CONFIG": "5"}, "needs 'cluster' and 'task' entries, got a JSON int"),
    ({"TF_CONFIG": '{"task": {}}'}, "needs 'cluster' and 'task' entries"),
    ({"TF_CONFIG": '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {}}'}, "type None is not a role"),
    ({"TF_CONFIG": '{"cluster": {"worker": [23461, 23462]}, "task": {"type": "worker", "index": 0}}'},
     'the worker addresses must be "host:port" strings, got [23461, 23462]'),
    ({"CLUSTER_SPEC": '{"cluster": {"workerpool0": ["127.0.0.1:1"]}, "task": {"type": "workerpool0", "index": "x"}}'},
     "$CLUSTER_SPEC task index='x' must be a task index"),
    ({"CLUSTER_SPEC": '{"cluster": {}, "task": {"type": "workerpool0", "index": 0}}'}, "describes no cluster"),
    ({"WORKER_HOSTS": "127.0.0.1:1,127.0.0.1:2", "JOB_COMPLETION_INDEX": "abc"},
     "$JOB_COMPLETION_INDEX='abc' must be a task index"),
])
def test_a_malformed_cluster_environment_gets_one_line(capsys, monkeypatch, tmp_path, environment, expected):
    for variable in ("TF_CONFIG", "CLUSTER_SPEC", "WORKER_HOSTS", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    assert expected in fails_in_process(capsys, task, f"--model_dir={tmp_path}", "--strategy=multi_worker_mirrored")


def test_a_truncated_config_json_on_resume_gets_one_line(runs, capsys, cifar_dir, tmp_path):
    model_dir = copy_of(runs["one_epoch"], tmp_path)
    (model_dir / "config.json").write_text((model_dir / "config.json").read_text()[:40])
    line = fails_in_process(capsys, task, *s_flags(cifar_dir, model_dir, epochs=2))
    assert "config.json is damaged" in line and "delete it to resume" in line


def test_compare_on_a_truncated_metrics_json_gets_one_line(runs, capsys, tmp_path):
    model_dir = copy_of(runs["one_epoch"], tmp_path)
    (model_dir / "metrics.json").write_text((model_dir / "metrics.json").read_text()[:100])
    line = fails_in_process(capsys, compare, f"--output={tmp_path / 'report'}", str(model_dir),
                            str(runs["one_epoch"]))
    assert "metrics.json is damaged" in line


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB file system, full long before a checkpoint or an export fits (needs root, for mount)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root?)")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_checkpoint(small_disk):
    directory = small_disk / "checkpoints"
    variables = [tf.Variable(np.ones(2_000_000, np.float32))]  # 8 MB.
    store = checkpoints.CheckpointStore(str(directory), {"model": variables}, is_chief=True)
    with pytest.raises(Failure, match=r"disk of .* is full .* while writing checkpoint 7; free some space"):
        store.save(7)
    assert os.listdir(directory) == []


def test_a_full_disk_during_the_export_is_one_line_and_keeps_the_previous_export(small_disk):
    import keras

    (small_disk / "export").mkdir()
    (small_disk / "export" / "saved_model.pb").write_bytes(b"the previous export")
    big = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(20000),
                            keras.layers.Dense(3)])  # 5 MB of weights.
    with pytest.raises(Failure, match="while writing the export"):
        with storage.disk_space_guard("the export", str(small_disk), leftovers=str(small_disk / "export.partial")):
            export.export_model(big, (8, 8, 1), ["a", "b", "c"], str(small_disk / "export"))
    assert sorted(os.listdir(small_disk)) == ["export"]
    assert (small_disk / "export" / "saved_model.pb").read_bytes() == b"the previous export"


# 4. Transient failures: retried while training goes on, then one line and their own exit status.

class Outage:
    """A TCP relay on 127.0.0.1 in front of the Cloud Storage emulator that can drop every connection: to the client,
    Cloud Storage becomes unreachable, then comes back."""

    def __init__(self, target_host: str):
        self.target = target_host.replace("http://", "").split(":")
        self.down = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            client, _ = self.server.accept()
            if self.down.is_set():
                client.close()
                continue
            upstream = socket.create_connection((self.target[0], int(self.target[1])))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source, sink):
        try:
            while (chunk := source.recv(65536)) and not self.down.is_set():
                sink.sendall(chunk)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.close()
            except OSError:
                pass


def test_an_unreachable_bucket_at_start_up_is_transient_not_a_usage_error(capsys, monkeypatch, cifar_dir):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    began = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(task, f"--data_dir={cifar_dir}", "--model_dir=gs://test-bucket/unreachable",
                       "--storage_retry_seconds=3")
    assert exit_info.value.code == 75 and time.monotonic() - began < 30
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Cloud Storage stayed unreachable" in lines[0] and "rerun" in lines[0]


def test_uploads_ride_out_an_outage_and_give_up_after_the_retry_time_in_one_line(gcs_bucket, monkeypatch, tmp_path):
    from helpers import bucket_files

    outage = Outage(os.environ["STORAGE_EMULATOR_HOST"])
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", outage.address)
    (tmp_path / "checkpoint").write_text("one")
    mirror = gcs.Mirror([gcs.Root(str(tmp_path), f"gs://{gcs_bucket}/outage")], retry_seconds=3)
    uploader = gcs.BackgroundUploader(mirror, retry_seconds=3)
    try:
        outage.down.set()
        uploader.request()
        time.sleep(1.5)
        uploader.check()  # Down for half the retry time: still retrying while the job goes on.
        outage.down.clear()
        uploader.finish()
        assert bucket_files(gcs_bucket, "outage") == ["checkpoint"]

        outage.down.set()
        (tmp_path / "checkpoint").write_text("two")
        uploader.request()
        began = time.monotonic()
        with pytest.raises(Exception) as error:
            uploader.finish()
        assert type(error.value).__name__ == "TransientError" and "stayed unreachable for" in str(error.value)
        assert 2.5 < time.monotonic() - began < 15
    finally:
        uploader.close()
        outage.down.clear()


# 6. trainer.predict on a real desktop.

def test_predict_survives_odd_file_names_fifos_and_pixel_bombs(runs, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from trainer.results import predict

    folder = tmp_path / "photos"
    folder.mkdir()
    sample = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(sample).save(folder / "a-first.png")
    Image.fromarray(sample).save(os.fsdecode(bytes(folder) + b"/b-caf\xe9-latin1.png"))  # Not UTF-8.
    os.mkfifo(folder / "c-pipe.png")
    Image.new("1", (13000, 13000)).save(folder / "d-huge.png")  # A few KB on disk.
    Image.fromarray(sample).save(folder / "e-last.png")
    # An en_US.UTF-8 desktop's stdout (PYTHONIOENCODING=utf-8): strict UTF-8.
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    began = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(predict, f"--model_dir={runs['one_epoch']}", str(folder), str(folder / "c-pipe.png"))
    assert exit_info.value.code == 1 and time.monotonic() - began < 60
    stdout.flush()
    rows = [line.split()[0] for line in stdout.buffer.getvalue().decode().splitlines()[1:]]
    assert [os.path.basename(row) for row in rows] == ["a-first.png", "b-caf\ufffd-latin1.png", "e-last.png"]
    stderr = capsys.readouterr().err
    assert re.search(r"error: .*d-huge.png: 13000x13000 pixels is more than the 50-megapixel limit", stderr)
    assert re.search(r"error: .*c-pipe.png: not a regular file", stderr)
