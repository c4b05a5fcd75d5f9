"""Multi-worker training on localhost: agreement with one worker, preemption, killed workers, cluster env."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import ROOT, make_config, read_metrics
from trainer import distribution
from trainer import train
from trainer.errors import UsageError

# Deterministic flags: no dropout or augmentation (their draws are per replica), plain SGD.
EXACT = ["--dropout=0", "--norandom_flip", "--brightness=0", "--optimizer=sgd", "--learning_rate=0.05", "--seed=3",
         "--early_stopping_patience=0"]


class Launch:
    """`python -m launch.local` in the background, with its output collected line by line."""

    def __init__(self, *argv: str):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen([sys.executable, "-m", "launch.local", *argv], cwd=ROOT, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matches {pattern!r}:\n" + "\n".join(self.lines[-40:]))

    def worker_pid(self, index: int, attempt: int = 0) -> int:
        started = [line for line in self.lines if f"Started worker {index} (pid" in line]
        return int(re.search(r"\(pid (\d+)\)", started[attempt]).group(1))

    def finish(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def text(self) -> str:
        return "\n".join(self.lines)


def worker_flags(cifar_dir, model_dir, *extra):
    return [f"--data_dir={cifar_dir}", f"--model_dir={model_dir}", "--eval_split=test[:128]", "--batch_size=64",
            *extra]


def checkpoint_variables(model_dir, step=None) -> dict:
    directory = os.path.join(model_dir, "checkpoints")
    path = os.path.join(directory, f"ckpt-{step}") if step else tf.train.latest_checkpoint(directory)
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
            if name.startswith("model/") and "OPTIMIZER_SLOT" not in name}


def test_two_workers_from_vertex_cluster_spec_train_as_one_job(cifar_dir, tmp_path):
    flags = worker_flags(cifar_dir, tmp_path / "two", "--train_split=train[:1024]", "--steps_per_epoch=4",
                         "--epochs=2", "--steps_per_loop=2", *EXACT)
    launch = Launch("--workers=2", "--cluster_env=cluster_spec", "--", *flags)
    assert launch.finish() == 0, launch.text()[-5000:]
    fingerprints = {match.group(1): match.group(2) for match in
                    re.finditer(r"\[worker (\d)\].*Final weights fingerprint (\w+)", launch.text())}
    assert len(fingerprints) == 2 and len(set(fingerprints.values())) == 1, fingerprints
    metrics = read_metrics(tmp_path / "two")
    assert metrics["num_replicas"] == 2 and metrics["epochs_completed"] == 2
    assert not [name for name in os.listdir(tmp_path / "two" / "checkpoints") if "worker" in name]
    assert not (tmp_path / "two" / "export.worker-temp").exists()

    one = train.run(make_config(cifar_dir, tmp_path / "one", strategy="default", steps_per_epoch=4, epochs=2,
                                eval_split="test[:128]", dropout=0.0, random_flip=False, brightness=0.0,
                                optimizer="sgd", learning_rate=0.05, seed=3, steps_per_loop=2))
    two, single = checkpoint_variables(tmp_path / "two"), checkpoint_variables(tmp_path / "one")
    after_one_epoch = checkpoint_variables(tmp_path / "one", step=4)
    for name in single:
        difference = np.abs(two[name] - single[name]).max()
        moved = np.abs(single[name] - after_one_epoch[name]).max()
        assert moved > 100 * difference, (name, difference, moved)
    assert metrics["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=1 / 128)


def test_sigterm_on_one_worker_checkpoints_the_cluster_at_that_step_and_the_restart_resumes(cifar_dir, tmp_path):
    flags = worker_flags(cifar_dir, tmp_path, "--train_split=train[:6400]", "--epochs=2", "--steps_per_loop=5")
    launch = Launch("--workers=2", "--restarts=1", "--", *flags)
    launch.wait_for(r"\[worker 1\].*Phase train")
    time.sleep(2.0)
    os.kill(launch.worker_pid(1), signal.SIGTERM)
    assert launch.finish() == 0, launch.text()[-5000:]
    saved = {int(match.group(2)) for match in
             re.finditer(r"\[worker (\d)\].*Preempted: checkpoint saved at step (\d+)", launch.text())}
    assert len(saved) == 1, launch.text()[-5000:]
    step = saved.pop()
    assert re.search(r"Worker 0 exited with status 42", launch.text()) and \
        re.search(r"Worker 1 exited with status 42", launch.text())
    assert f"Resumed from {tmp_path / 'checkpoints' / f'ckpt-{step}'}" in launch.text()
    metrics = read_metrics(tmp_path)
    assert metrics["epochs_completed"] == 2
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith(f"ckpt-{2 * 6400 // 64}")


def test_a_killed_worker_stops_the_other_quickly_and_a_restart_finishes(cifar_dir, tmp_path):
    flags = worker_flags(cifar_dir, tmp_path, "--train_split=train[:6400]", "--epochs=2", "--steps_per_loop=5",
                         "--checkpoint_steps=20", "--heartbeat_timeout=10", "--collective_timeout=60")
    launch = Launch("--workers=2", "--restarts=1", "--grace_seconds=120", "--", *flags)
    launch.wait_for(r"\[worker 0\].*Saved checkpoint .*ckpt-20\b")
    os.kill(launch.worker_pid(0), signal.SIGKILL)
    stopped = launch.wait_for(r"Worker 1 exited with status (\d+), ([\d.]+)s after the first failure")
    assert int(stopped.group(1)) == 1 and float(stopped.group(2)) < 60, launch.text()[-5000:]
    assert re.search(r"\[worker 1\] error: training stopped because a worker of the cluster failed",
                     launch.text()), launch.text()[-5000:]
    assert launch.finish() == 0, launch.text()[-5000:]
    assert re.search(r"Resumed from .*ckpt-\d+", launch.text())
    assert read_metrics(tmp_path)["epochs_completed"] == 2


def test_tf_config_and_cluster_spec_describe_the_same_cluster(monkeypatch):
    addresses = ["10.0.0.1:2222", "10.0.0.2:2222", "10.0.0.3:2222"]
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setenv("CLUSTER_SPEC", json.dumps({
        "cluster": {"workerpool0": addresses[:1], "workerpool1": addresses[1:]}, "environment": "cloud",
        "task": {"type": "workerpool1", "index": 1}, "job": {"worker_pool_specs": []}}))
    assert distribution.cluster_environment() == {
        "cluster": {"chief": addresses[:1], "worker": addresses[1:]}, "task": {"type": "worker", "index": 1}}
    tf_config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": 2}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    assert distribution.cluster_environment() == tf_config  # TF_CONFIG wins when both are set.
    assert distribution.resolve_strategy_name(make_config("unused", "unused")) == "multi_worker_mirrored"


def test_kubernetes_indexed_job_environment_gives_each_pod_its_task(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("CLUSTER_SPEC", raising=False)
    hosts = "job-0.svc:2222,job-1.svc:2222"
    monkeypatch.setenv("WORKER_HOSTS", hosts)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    assert distribution.cluster_environment() == {
        "cluster": {"worker": hosts.split(",")}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    with pytest.raises(UsageError, match="outside"):
        distribution.cluster_environment()


def test_malformed_cluster_environment_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(UsageError, match=r"\$TF_CONFIG is not valid JSON"):
        distribution.cluster_environment()
    monkeypatch.delenv("TF_CONFIG")
    monkeypatch.setenv("CLUSTER_SPEC", json.dumps({"cluster": {}, "task": {"type": "reducer", "index": 0}}))
    with pytest.raises(UsageError, match="not a Vertex AI worker pool"):
        distribution.cluster_environment()
