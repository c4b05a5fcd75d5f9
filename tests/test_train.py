"""The training loop: strategies agree, precision, resumption, NaN handling, early stopping."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from helpers import ROOT, make_config, read_metrics, run_task
from trainer.training import checkpoints
from trainer.training import train
from trainer.errors import TrainingError


def model_variables(model_dir, step: int | None = None) -> dict:
    """The model's variables in the run's latest checkpoint (or the one of `step`), by name."""
    checkpoint_dir = os.path.join(model_dir, "checkpoints")
    path = os.path.join(checkpoint_dir, f"ckpt-{step}") if step else tf.train.latest_checkpoint(checkpoint_dir)
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
            if name.startswith("model/") and "OPTIMIZER_SLOT" not in name}


def checkpoint_step(model_dir) -> int:
    path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    return int(path.rsplit("-", 1)[1])


def test_mirrored_over_two_devices_matches_the_default_strategy(cifar_dir, tmp_path):
    # No dropout or augmentation: their random draws are per replica, so they differ by design.
    # Plain SGD keeps float rounding differences from being amplified as Adam does near zero gradients.
    common = dict(dropout=0.0, random_flip=False, brightness=0.0, steps_per_epoch=6, epochs=2, seed=3,
                  optimizer="sgd", learning_rate=0.05)
    default_metrics = train.run(make_config(cifar_dir, tmp_path / "default", strategy="default", **common))
    metrics = train.run(make_config(cifar_dir, tmp_path / "mirrored", strategy="mirrored", cpu_devices=2, **common))
    assert metrics["num_replicas"] == 2 and default_metrics["num_replicas"] == 1
    default, mirrored = model_variables(tmp_path / "default"), model_variables(tmp_path / "mirrored")
    after_one_epoch = model_variables(tmp_path / "default", step=6)
    assert default.keys() == mirrored.keys() and len(default) >= 8
    for name in default:
        difference = np.abs(mirrored[name] - default[name]).max()
        moved = np.abs(default[name] - after_one_epoch[name]).max()
        assert moved > 100 * difference, (name, difference, moved)
    assert metrics["test_accuracy"] == pytest.approx(default_metrics["test_accuracy"], abs=1 / 256)


def test_mixed_bfloat16_trains_on_cpu(cifar_dir, tmp_path):
    metrics = train.run(make_config(cifar_dir, tmp_path, precision="mixed_bfloat16", steps_per_epoch=4))
    assert metrics["precision"] == "mixed_bfloat16"
    assert np.isfinite(metrics["test_loss"]) and np.isfinite(metrics["history"][0]["train_loss"])


def test_rerun_after_epoch_one_trains_only_the_missing_epoch_then_stays_finished(cifar_dir, tmp_path):
    first = train.run(make_config(cifar_dir, tmp_path, epochs=1))
    assert first["epochs_completed"] == 1
    second = train.run(make_config(cifar_dir, tmp_path, epochs=2))
    assert second["epochs_completed"] == 2
    assert second["history"][0] == first["history"][0]
    steps = checkpoint_step(tmp_path)
    assert steps == 2 * (1024 // 64)
    third = train.run(make_config(cifar_dir, tmp_path, epochs=2))
    assert third == read_metrics(tmp_path) and third["history"] == second["history"]
    assert checkpoint_step(tmp_path) == steps


def test_sigkill_mid_epoch_resumes_from_the_last_checkpoint(cifar_dir, tmp_path):
    flags = [f"--data_dir={cifar_dir}", f"--model_dir={tmp_path}", "--train_split=train[:4096]",
             "--eval_split=test[:256]", "--batch_size=64", "--epochs=2", "--steps_per_loop=4",
             "--checkpoint_steps=8", "--early_stopping_patience=0"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "trainer.task", *flags], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint_dir = tmp_path / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        path = tf.train.latest_checkpoint(str(checkpoint_dir)) if checkpoint_dir.exists() else None
        if path and 16 <= int(path.rsplit("-", 1)[1]) < 64:  # Inside epoch 1 (64 steps per epoch).
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = checkpoint_step(tmp_path)
    assert 16 <= killed_at < 64, killed_at
    assert not (tmp_path / "metrics.json").exists()

    result = run_task(*flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed from {checkpoint_dir / f'ckpt-{killed_at}'}" in result.stderr
    metrics = read_metrics(tmp_path)
    assert metrics["epochs_completed"] == 2 and checkpoint_step(tmp_path) == 2 * 64


def test_nan_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(cifar_dir, tmp_path):
    config = make_config(cifar_dir, tmp_path, optimizer="sgd", learning_rate=1e12, momentum=0.0,
                         steps_per_loop=1, checkpoint_steps=1)
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step (\d+)") as failure:
        train.run(config)
    bad_step = int(failure.value.args[0].split(" at step ")[1].split()[0])
    saved = sorted(int(name.split("-")[1].split(".")[0]) for name in os.listdir(tmp_path / "checkpoints")
                   if name.startswith("ckpt-") and name.endswith(".index"))
    assert saved and max(saved) == bad_step - 1
    assert all(np.isfinite(value).all() for value in model_variables(tmp_path).values())
    assert not (tmp_path / "metrics.json").exists()


class _Stopped(Exception):
    """Stands for a run that dies right after a checkpoint, in-process."""


def run_stopped_then_rerun(monkeypatch, config, owner, method: str, stop_when) -> dict:
    """Runs `config` until `owner.method` returns with `stop_when(*its arguments)` true, then reruns it."""
    original = getattr(owner, method)

    def call_then_maybe_stop(instance, *args):
        original(instance, *args)
        if stop_when(*args):
            raise _Stopped()

    monkeypatch.setattr(owner, method, call_then_maybe_stop)
    with pytest.raises(_Stopped):
        train.run(config)
    monkeypatch.undo()
    return train.run(config)


def test_early_stopping_restores_the_best_weights_and_a_run_stopped_after_an_epoch_ends_as_if_never_stopped(
        cifar_dir, tmp_path, monkeypatch):
    # Adam at this rate stalls near chance, so early stopping (patience 1) decides where the run ends;
    # the rerun only matches if it restores the optimizer, the early-stopping state and the best weights.
    common = dict(epochs=6, early_stopping_patience=1, learning_rate=0.02, steps_per_epoch=4, dropout=0.0)
    straight = train.run(make_config(cifar_dir, tmp_path / "straight", **common))
    history = straight["history"]
    assert straight["epochs_completed"] < 6 and len(history) < 6, "early stopping should end this run early"
    # It restores the best weights: the final evaluation is the best epoch's.
    best = max(range(len(history)), key=lambda index: history[index]["eval_accuracy"])
    assert straight["best_epoch"] == best + 1 and history[-1]["eval_accuracy"] <= history[best]["eval_accuracy"]
    assert straight["test_accuracy"] == pytest.approx(history[best]["eval_accuracy"], abs=1e-6)

    resumed = run_stopped_then_rerun(monkeypatch, make_config(cifar_dir, tmp_path / "stopped", **common),
                                     train.Trainer, "end_epoch", lambda phase, epoch, *rest: epoch == 0)
    for key in ("epochs_completed", "best_epoch", "weights_fingerprint"):
        assert resumed[key] == straight[key], key
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], rel=1e-6)
    for ours, theirs in zip(resumed["history"], straight["history"]):
        assert ours["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-6)


def test_a_run_stopped_mid_epoch_and_rerun_draws_the_same_dropout_and_augmentation(cifar_dir, tmp_path, monkeypatch):
    # Dropout (the cnn's 0.5) and on-device augmentation are on: the rerun matches the straight run only if it
    # restores their random state, and resumes the data at the step it stopped. Under mirrored, where each replica
    # draws its own; the default strategy's one replica is the simpler case of the same code.
    common = dict(epochs=2, steps_per_loop=4, checkpoint_steps=4, dropout=0.5, random_flip=True, brightness=0.2,
                  strategy="mirrored", cpu_devices=2)
    straight = train.run(make_config(cifar_dir, tmp_path / "straight", **common))

    # Stopped right after the checkpoint at step 8, mid-way through epoch 1 (16 steps per epoch).
    resumed = run_stopped_then_rerun(monkeypatch, make_config(cifar_dir, tmp_path / "stopped", **common),
                                     checkpoints.CheckpointStore, "save", lambda step: step == 8)
    assert resumed["weights_fingerprint"] == straight["weights_fingerprint"]
    train_losses = [[entry["train_loss"] for entry in run["history"]] for run in (resumed, straight)]
    assert train_losses[0] == train_losses[1]
