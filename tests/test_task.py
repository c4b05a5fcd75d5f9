"""The command line: the documented run end to end, --help and --flagfile, and one clear line per bad input."""

import gc
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import helpers
from helpers import read_metrics, run_task, single_error_line
from trainer import cli
from trainer import task

def online() -> bool:
    try:
        socket.getaddrinfo("storage.googleapis.com", 443)
        return True
    except OSError:
        return False


def fails_in_process(capsys, *argv: str) -> str:
    """Runs the entry point in this process; returns its one stderr line after checking the contract."""
    return helpers.fails_in_process(capsys, task, *argv)


@pytest.fixture(scope="module")
def smoke_run(cifar_dir, tmp_path_factory):
    """The README's smoke command, with its flags in a --flagfile, in a fresh process."""
    model_dir = tmp_path_factory.mktemp("smoke") / "run"
    flagfile = model_dir.parent / "smoke.flags"
    flagfile.write_text("\n".join(["--model=cnn", "--epochs=2", "--train_split=train[:4000]",
                                   "--eval_split=test[:1000]", f"--model_dir={model_dir}"]) + "\n")
    result = run_task(f"--flagfile={flagfile}", env={"TFDS_DATA_DIR": cifar_dir})
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir, result


def test_smoke_run_writes_every_output_and_beats_chance(smoke_run):
    model_dir, result = smoke_run
    metrics = read_metrics(model_dir)
    assert metrics["epochs_completed"] == 2 and len(metrics["history"]) == 2
    assert metrics["test_accuracy"] > 0.25  # Chance is 0.10.
    for key in ("test_loss", "train_images_per_second", "class_names", "flags"):
        assert metrics[key], key
    assert metrics["flags"]["train_split"] == "train[:4000]"
    assert {"train_loss", "train_accuracy", "eval_loss", "eval_accuracy"} <= set(metrics["history"][0])
    assert (model_dir / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (model_dir / "export" / "saved_model.pb").exists()
    for kind in ("train", "eval"):
        assert list((model_dir / "logs" / kind).glob("events.out.tfevents.*")), kind
    assert "epoch 2/2" in result.stderr and "img/s" in result.stderr and "ETA" in result.stderr


def test_the_log_holds_the_jobs_messages_not_the_libraries_info(smoke_run):
    _, result = smoke_run
    python_info = [line for line in result.stderr.splitlines() if re.match(r"I\d{4} ", line) or "INFO:" in line]
    sources = {match.group(1) for line in python_info if (match := re.search(r" (\w+)\.py:\d+\]", line))}
    assert {"train", "progress", "checkpoints", "export"} <= sources
    # TFDS's dataset readers, TensorFlow's checkpoint shards and SavedModel renames log INFO through absl too.
    assert not sources & {"dataset_info", "reader", "logging_logger", "functional_saver", "signature_serialization"}
    assert not [line for line in python_info if line.startswith("INFO:tensorflow")]
    # A cache read in part is thrown away with a warning: the job reads each cached split whole.
    assert "did not fully read the dataset being cached" not in result.stderr


def test_tensorboard_logs_hold_the_documented_scalars_and_flags(smoke_run):
    from tensorboard.backend.event_processing import event_accumulator

    model_dir, _ = smoke_run
    tags = {}
    for kind in ("train", "eval"):
        accumulator = event_accumulator.EventAccumulator(str(model_dir / "logs" / kind),
                                                         size_guidance={"tensors": 0})
        accumulator.Reload()
        tags[kind] = set(accumulator.Tags()["tensors"])
    assert {"loss", "accuracy", "learning_rate", "images_per_second", "epoch_seconds", "flags"} <= tags["train"]
    assert {"loss", "accuracy"} <= tags["eval"]


def test_export_reloads_in_a_fresh_process_without_this_package(smoke_run, tmp_path):
    model_dir, _ = smoke_run
    script = f"""
import sys
sys.modules["trainer"] = None  # Any import of this package now fails.
import numpy as np, tensorflow as tf
model = tf.saved_model.load({str(model_dir / 'export')!r})
images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
probabilities = model.serve(tf.constant(images)).numpy()
default = model.signatures["serve"](images=tf.constant(images))
import json
print(json.dumps({{"shape": probabilities.shape, "sums": probabilities.sum(axis=1).tolist(),
                  "signature_outputs": list(default.keys())}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ""}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["shape"] == [5, 10] and output["signature_outputs"]
    np.testing.assert_allclose(output["sums"], 1.0, rtol=1e-4)
    labels = (model_dir / "export" / "assets.extra" / "labels.txt").read_text().split()
    assert labels[:2] == ["airplane", "automobile"] and len(labels) == 10


def test_help_describes_every_flag():
    result = run_task("--helpfull")
    assert result.returncode == 0
    for name in ("model", "weights", "strategy", "tpu", "precision", "batch_size", "epochs", "learning_rate", "seed",
                 "lr_schedule", "early_stopping_patience", "image_size", "fine_tune_epochs", "model_dir", "data_dir",
                 "dataset", "train_split", "eval_split", "steps_per_epoch", "steps_per_loop", "jit_compile"):
        assert f"--{name}:" in result.stdout or f"--[no]{name}:" in result.stdout, name


@pytest.mark.parametrize("argv, expected", [
    (["--model=vgg16"], "flag --model=vgg16: value should be one of <cnn|resnet50|airbench|linear>"),
    (["--strategy=horovod"], "flag --strategy=horovod: value should be one of <auto|default|one_device|mirrored"),
    (["--precision=float8"], "value should be one of <auto|float32|mixed_float16|mixed_bfloat16>"),
    (["--batch_size=0"], "--batch_size=0 must be a positive integer"),
    (["--batch_size=-8"], "--batch_size=-8 must be a positive integer"),
    (["--epochs=-1"], "--epochs=-1 must be zero or more"),
    (["--strategy=tpu"], "--strategy=tpu needs a TPU: give --tpu=NAME"),
    (["--strategy=mirrored", "--devices=/gpu:0,/gpu:1"], "--devices: /gpu:0 does not exist on this machine"),
    (["--strategy=one_device", "--devices=/cpu:7"], "--devices: /cpu:7 does not exist on this machine; available:"),
    (["--strategy=mirrored", "--cpu_devices=2", "--batch_size=33"],
     "--batch_size=33 does not split evenly over 2 replicas; use a multiple of 2"),
    (["--model=cnn", "--weights=imagenet"], "--model=cnn has no ImageNet weights"),
    (["--weights=/no/such/file.h5"], "--weights=/no/such/file.h5: no such file"),
    (["--steps_per_loop=0"], "--steps_per_loop=0 must be at least 1"),
    (["stray"], "unexpected arguments stray"),
])
def test_bad_flag_values_get_one_clear_line(capsys, tmp_path, argv, expected):
    line = fails_in_process(capsys, f"--model_dir={tmp_path / 'run'}", *argv)
    assert expected in line


def test_unknown_dataset_and_split_get_one_clear_line(capsys, cifar_dir, tmp_path):
    line = fails_in_process(capsys, "--dataset=cifar11", f"--data_dir={cifar_dir}", f"--model_dir={tmp_path}")
    assert "--dataset=cifar11 is not a TFDS dataset" in line
    # The same model_dir again: a run that failed before training must not block the corrected one.
    line = fails_in_process(capsys, "--train_split=validation", f"--data_dir={cifar_dir}", f"--model_dir={tmp_path}")
    assert "--train_split=validation is not a split of cifar10" in line and "train, test" in line
    # The folder existed before, so it stays, but as empty as it was.
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []


def test_weights_file_of_another_model_gets_one_clear_line(capsys, cifar_dir, tmp_path):
    import keras

    path = tmp_path / "dense.weights.h5"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]).save_weights(str(path))
    line = fails_in_process(capsys, "--model=resnet50", f"--weights={path}", "--image_size=32",
                            f"--data_dir={cifar_dir}", f"--model_dir={tmp_path / 'run'}")
    assert f"--weights={path} does not hold ResNet50 (no-top) weights" in line
    # It failed before training, so it leaves no empty run folders behind.
    assert not (tmp_path / "run").exists()


def test_unwritable_model_dir_gets_one_clear_line_and_nothing_is_lost(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    line = fails_in_process(capsys, f"--model_dir={blocker / 'run'}")
    assert f"--model_dir={blocker / 'run'} is not writable" in line
    assert blocker.read_text() == "keep me"


def test_nan_loss_gets_one_clear_line(capsys, cifar_dir, tmp_path):
    line = fails_in_process(capsys, f"--data_dir={cifar_dir}", f"--model_dir={tmp_path}", "--optimizer=sgd",
                            "--learning_rate=1e12", "--train_split=train[:512]", "--eval_split=test[:64]",
                            "--steps_per_loop=1")
    assert "The loss became" in line and "at step" in line and "last good checkpoint" in line


def test_resuming_with_different_flags_is_refused_and_keeps_the_run(capsys, smoke_run):
    model_dir, _ = smoke_run
    before = (model_dir / "config.json").read_text()
    line = fails_in_process(capsys, f"--model_dir={model_dir}", "--model=resnet50", "--weights=none")
    assert "holds a run started with other flags" in line and "--model='cnn' before, 'resnet50' now" in line
    assert (model_dir / "config.json").read_text() == before


def test_real_process_exit_codes_for_a_flag_error_and_a_usage_error(tmp_path):
    parse_error = run_task("--model=vgg16")
    assert single_error_line(parse_error).startswith("error: flag --model=vgg16") and parse_error.returncode == 2
    # The job as its entry point runs it, reporting whether TensorFlow (seconds to load) was loaded by the end.
    script = ("import runpy, sys\nsys.argv = ['trainer.task', '--batch_size=0', '--model_dir=" + str(tmp_path) + "']\n"
              "try:\n    runpy.run_module('trainer.task', run_name='__main__')\n"
              "finally:\n    print('tensorflow' in sys.modules)\n")
    usage_error = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                                 cwd=helpers.ROOT, env={**os.environ, "PYTHONPATH": str(helpers.ROOT)})
    assert "--batch_size=0" in single_error_line(usage_error) and usage_error.returncode == 2
    assert usage_error.stdout.strip() == "False"  # Refused at once, before TensorFlow loads.


def test_unreachable_tpu_gets_one_clear_line(tmp_path):
    result = run_task("--strategy=tpu", "--tpu=local", f"--model_dir={tmp_path}")
    assert "--strategy=tpu: cannot reach TPU 'local'" in single_error_line(result)


@pytest.mark.skipif(online(), reason="this machine is online, so the offline download failure cannot happen")
def test_missing_dataset_offline_says_how_to_point_at_a_copy(tmp_path):
    result = run_task(f"--data_dir={tmp_path / 'empty'}", f"--model_dir={tmp_path / 'run'}")
    line = single_error_line(result)
    assert "cannot reach the internet" in line and "--data_dir" in line and "TFDS_DATA_DIR" in line


@pytest.mark.skipif(online() or (pathlib.Path.home() / ".keras" / "models" /
                                 "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5").exists(),
                    reason="ImageNet weights can be downloaded or are cached here")
def test_imagenet_weights_offline_suggest_alternatives(capsys, cifar_dir, tmp_path):
    line = fails_in_process(capsys, "--model=resnet50", "--image_size=32", f"--data_dir={cifar_dir}",
                            f"--model_dir={tmp_path}")
    assert "cannot download the ResNet50 ImageNet weights" in line and "--weights=none" in line


def wait_for_line(process, log: pathlib.Path, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def test_sigterm_two_seconds_after_start_exits_42_in_one_line_having_written_nothing(cifar_dir, tmp_path):
    process = helpers.start_task(*helpers.tiny_flags(cifar_dir, tmp_path / "run"), output=tmp_path / "log")
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 42
    line = single_error_line(subprocess.CompletedProcess([], 42, "", (tmp_path / "log").read_text()))
    assert "stopped by SIGTERM" in line and "rerun the same command" in line
    assert not (tmp_path / "run").exists()


def test_sigterm_during_the_last_loop_call_logs_what_the_run_does_and_finishes(cifar_dir, tmp_path):
    # One loop call for the whole run: the signal lands in it (its first call traces the loop, for seconds).
    log = tmp_path / "log"
    process = helpers.start_task(*helpers.tiny_flags(cifar_dir, tmp_path / "run", "--steps_per_loop=100",
                                                     "--train_split=train[:256]", "--eval_split=test[:64]"), output=log)
    wait_for_line(process, log, "Phase train")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=240) == 0, log.read_text()[-3000:]
    assert re.search(r"SIGTERM came too late for a preemption checkpoint: training is complete and checkpointed "
                     r"\(step 4\), so the run goes on to its final evaluation and export", log.read_text())
    assert read_metrics(tmp_path / "run")["epochs_completed"] == 1


def test_blocks_run_without_the_collector_and_leave_it_as_it_was():
    assert gc.isenabled()
    frozen_before = gc.get_freeze_count()
    with cli.without_garbage_collection():
        assert not gc.isenabled()
        made_by_the_import = [[index] for index in range(1000)]  # Tracked containers, as modules' objects are.
    assert gc.isenabled() and gc.get_freeze_count() >= frozen_before + len(made_by_the_import)
    gc.disable()
    try:
        with cli.without_garbage_collection():
            pass
        assert not gc.isenabled()  # A caller that had turned it off keeps it off.
    finally:
        gc.enable()
