"""Multi-worker training on localhost: agreement with one worker (on a folder the chief prepares, into a gs://
directory the chief alone uploads to), preemption, dead and hung workers, the launcher's restarts and exit status,
cluster environments, and the reliability benchmark's accounting."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import reliability
import image_folders
from helpers import ROOT, bucket_files, make_config, read_metrics, single_error_line, start_task, tiny_flags
from trainer.training import distribution
from trainer.training import train
from trainer.errors import UsageError

# Deterministic flags: no dropout or augmentation (their draws are per replica), plain SGD.
# float32: on CPUs with native bfloat16 --precision=auto picks bfloat16, whose rounding would swamp the comparison.
EXACT = ["--dropout=0", "--norandom_flip", "--brightness=0", "--optimizer=sgd", "--learning_rate=0.05", "--seed=3",
         "--early_stopping_patience=0", "--precision=float32"]
# A finished loop call as the trainer logs it at -v=1.
STEP_LINE = r"\] step (\d+) \(epoch"


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

    def wait_for(self, pattern: str, timeout: float = 180, count: int = 1) -> re.Match:
        """The `count`-th line that matches, once it has been printed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            matches = self.matches(pattern)
            if len(matches) >= count:
                return matches[count - 1]
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no {count} lines match {pattern!r}:\n" + "\n".join(self.lines[-40:]))

    def matches(self, pattern: str) -> list[re.Match]:
        return [match for line in list(self.lines) if (match := re.search(pattern, line))]

    def matches_groups(self, pattern: str) -> list[tuple[str, ...]]:
        return [match.groups() for match in self.matches(pattern)]

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


def assert_only_the_chief_wrote_outputs(model_dir, launch: Launch) -> None:
    """One TensorBoard writer per log directory, one final report, and no worker's leftovers."""
    event_files = {}
    for directory, _, names in os.walk(model_dir / "logs"):
        count = sum(name.startswith("events.out.tfevents") for name in names)
        if count:
            event_files[os.path.relpath(directory, model_dir)] = count
    # A second writer (another worker) would add an event file of its own beside the chief's.
    assert "logs/train" in event_files and set(event_files.values()) == {1}, event_files
    assert (model_dir / "metrics.json").is_file() and (model_dir / "history.png").is_file()
    reporters = {match.group(1) for match in launch.matches(r"\[worker (\d)\].*Test accuracy .* Outputs in")}
    assert reporters == {"0"}, reporters
    leftovers = [os.path.join(directory, name) for directory, subdirectories, names in os.walk(model_dir)
                 for name in subdirectories + names if "worker" in name]
    assert not leftovers, leftovers


def downloaded(bucket: str, prefix: str, directory) -> None:
    """Every file under gs://bucket/prefix, copied into directory."""
    from google.cloud import storage as cloud_storage

    for blob in cloud_storage.Client().list_blobs(bucket, prefix=prefix + "/"):
        path = directory / blob.name[len(prefix) + 1:]
        path.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(path)


def test_a_vertex_cluster_on_a_folder_trains_as_one_worker_would_with_the_chief_alone_preparing_and_uploading(
        cifar_dir, gcs_bucket, tmp_path):
    """Vertex AI's layout (--cluster_env=cluster_spec: worker 0 is the chief, of worker pool 0, and worker 1 is index 0
    of pool 1), on one machine here, training on a folder of images into a gs:// model directory. One job, in one
    cluster run, because each costs two processes of TensorFlow."""
    folder, data_dir = tmp_path / "pets", tmp_path / "tfds"
    image_folders.make_class_folder(folder, image_folders.cifar_images(cifar_dir, per_class=10))
    # 24 training images in batches of 8: 3 steps an epoch, each checkpointed and mirrored to the bucket. A lower
    # learning rate than EXACT's: on so few images, 0.05 amplified the replicas' rounding 20-fold in 6 steps.
    flags = [f"--dataset={folder}", f"--data_dir={data_dir}", "--validation_fraction=0.2", "--batch_size=8",
             "--epochs=2", "--steps_per_loop=1", "--checkpoint_steps=1", *EXACT, "--learning_rate=0.01"]
    launch = Launch("--workers=2", "--cluster_env=cluster_spec", "--grace_seconds=20", "--",
                    f"--model_dir=gs://{gcs_bucket}/runs/two-workers", *flags)
    assert launch.finish() == 0, launch.text()[-5000:]

    # The chief prepared the folder, once; the other worker waited for its word and read the same copy.
    assert launch.matches(r"\[worker 0\].*: preparing 30 images of 3 classes")
    assert not launch.matches(r"\[worker 1\].*: preparing"), launch.text()[-5000:]
    assert launch.matches(r"\[worker 1\].*waiting for the chief to prepare")
    assert launch.matches(r"\[worker 1\].*using its prepared copy in .*6 validation, 24 train images")
    assert len(list((data_dir / "image_folder").iterdir())) == 1  # Nothing half-written beside it.

    # Each worker works in its own local directory; the chief alone mirrors it to the bucket.
    working_dirs = dict(launch.matches_groups(r"^\[worker (\d)\].*Working in (\S+);"))
    assert len(working_dirs) == 2 and len(set(working_dirs.values())) == 2, working_dirs
    mirrored_by = {int(worker) for worker, in launch.matches_groups(r"^\[worker (\d)\].*Mirrored \d+ file")}
    assert mirrored_by == {0}, launch.text()[-5000:]
    files = bucket_files(gcs_bucket, "runs/two-workers")
    assert {"metrics.json", "export/saved_model.pb", "checkpoints/checkpoint", "checkpoints/ckpt-6.index"} <= set(
        files), files
    assert not [name for name in files if re.search(r"worker|\.tmp-|write-check|partial", name)], files
    two = tmp_path / "two"
    downloaded(gcs_bucket, "runs/two-workers", two)
    assert_only_the_chief_wrote_outputs(two, launch)

    # Both workers ended on the same weights, the ones a single worker reaches with the same global batches.
    fingerprints = dict(launch.matches_groups(r"^\[worker (\d)\].*Final weights fingerprint (\w+)"))
    assert len(fingerprints) == 2 and len(set(fingerprints.values())) == 1, fingerprints
    metrics = read_metrics(two)
    assert metrics["num_replicas"] == 2 and metrics["epochs_completed"] == 2
    one = train.run(make_config(str(data_dir), tmp_path / "one", dataset=str(folder), train_split="train",
                                eval_split="validation", validation_fraction=0.2, batch_size=8, epochs=2,
                                steps_per_loop=1, dropout=0.0, random_flip=False, brightness=0.0, optimizer="sgd",
                                learning_rate=0.01, seed=3))
    cluster, single = checkpoint_variables(two, step=6), checkpoint_variables(tmp_path / "one", step=6)
    after_one_epoch = checkpoint_variables(tmp_path / "one", step=3)
    for name in single:
        difference = np.abs(cluster[name] - single[name]).max()
        moved = np.abs(single[name] - after_one_epoch[name]).max()
        assert moved > 100 * difference, (name, difference, moved)
    assert metrics["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=1 / 6)


SAVED_BY_CHIEF = r"\[worker 0\].*Saved checkpoint .*ckpt-(\d+)"
CLUSTER_FAILED = r"\[worker {}\] error: training stopped because a worker of the cluster failed"


def interrupt_and_time_the_survivor(launch: Launch, victim: int, signum: int, attempt: int) -> float:
    """Signals one worker; returns how long the other took to fail on its own, having said why."""
    survivor = 1 - victim
    exits = len(launch.matches(rf"Worker {survivor} exited"))
    errors = len(launch.matches(CLUSTER_FAILED.format(survivor)))
    began = time.monotonic()
    os.kill(launch.worker_pid(victim, attempt), signum)
    stopped = launch.wait_for(rf"Worker {survivor} exited with status (-?\d+)", count=exits + 1)
    seconds = time.monotonic() - began
    assert int(stopped.group(1)) == 1, launch.text()[-5000:]  # Not killed by the launcher: it stopped itself.
    assert len(launch.matches(CLUSTER_FAILED.format(survivor))) == errors + 1, launch.text()[-5000:]
    if signum == signal.SIGSTOP:
        os.kill(launch.worker_pid(victim, attempt), signal.SIGKILL)  # As a cluster replaces a hung pod.
    return seconds


def preempt_worker_one(launch: Launch, steps_per_epoch: int, steps_per_loop: int) -> int:
    """Sends worker 1 SIGTERM, as a preemption notice does; returns the step the cluster then checkpointed at."""
    launch.wait_for(r"\[worker 1\].*" + STEP_LINE)
    logged_before_signal = max(int(match.group(1)) for match in launch.matches(STEP_LINE))
    os.kill(launch.worker_pid(1), signal.SIGTERM)
    step = int(launch.wait_for(r"\[worker \d\].*Preempted: checkpoint saved at step (\d+)").group(1))
    assert step % steps_per_epoch and step >= logged_before_signal, (step, logged_before_signal)
    # The signalled worker notices once its running loop call returns; the cluster then runs one more call.
    text = launch.text()
    noticed = re.search(r"\[worker 1\].*SIGTERM received", text).start()
    first_step_after_notice = int(re.search(r"\[worker 1\].*" + STEP_LINE, text[noticed:]).group(1))
    assert step <= first_step_after_notice + steps_per_loop, (step, first_step_after_notice)
    launch.wait_for(r"Worker 0 exited with status 42")
    launch.wait_for(r"Worker 1 exited with status 42")
    return step


def test_a_preempted_dead_or_hung_worker_stops_the_cluster_and_each_restart_resumes(cifar_dir, tmp_path):
    """One job, interrupted three times, each time restarted by the launcher: a preemption notice (SIGTERM) to
    worker 1, on which the cluster checkpoints where it is and exits 42; then worker 0 killed, whose connections
    break at once (it leads the coordination service); then worker 1 hung (stopped), whose connections stay open, so
    that only its missing heartbeats tell worker 0. One job rather than three, as each attempt costs two processes
    of TensorFlow."""
    heartbeat_timeout, steps_per_epoch, steps_per_loop = 5, 2560 // 64, 5
    # One epoch of 40 steps, each interruption a few steps after the last. Collective timeout and grace period far
    # beyond the bound: only failure detection can meet it.
    flags = worker_flags(cifar_dir, tmp_path, "--train_split=train[:2560]", "--epochs=1",
                         f"--steps_per_loop={steps_per_loop}", "--checkpoint_steps=5",
                         f"--heartbeat_timeout={heartbeat_timeout}", "--collective_timeout=300", "--v=1")
    launch = Launch("--workers=2", "--restarts=3", "--grace_seconds=120", "--", *flags)
    resume_points = [preempt_worker_one(launch, steps_per_epoch, steps_per_loop)]
    for attempt, (victim, signum) in enumerate([(0, signal.SIGKILL), (1, signal.SIGSTOP)], start=1):
        launch.wait_for(r"\[worker 0\].*Resumed from", count=attempt)
        saved_so_far = len(launch.matches(SAVED_BY_CHIEF))
        launch.wait_for(SAVED_BY_CHIEF, count=saved_so_far + 1)  # This attempt has saved a checkpoint.
        seconds = interrupt_and_time_the_survivor(launch, victim, signum, attempt)
        assert seconds < heartbeat_timeout + 20, (victim, signal.Signals(signum).name, seconds)
        resume_points.append(int(launch.matches(SAVED_BY_CHIEF)[-1].group(1)))
    assert launch.finish() == 0, launch.text()[-5000:]
    assert launch.matches(r"\[worker 0\].*stopped sending heartbeats"), launch.text()[-5000:]
    resumed = [int(match.group(1)) for match in launch.matches(r"\[worker 0\].*Resumed from .*ckpt-(\d+)\b")]
    assert resumed == resume_points and resume_points[1] % steps_per_epoch, resume_points  # Killed mid-epoch.
    assert f"Resumed from {tmp_path / 'checkpoints' / f'ckpt-{resume_points[0]}'}" in launch.text()
    assert read_metrics(tmp_path)["epochs_completed"] == 1
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith(f"ckpt-{steps_per_epoch}")


def test_launcher_exits_non_zero_after_its_restarts_are_used_up(cifar_dir, tmp_path):
    launch = Launch("--workers=2", "--restarts=1", "--grace_seconds=1", "--", *worker_flags(cifar_dir, tmp_path))
    for attempt in range(2):
        launch.wait_for(r"Started worker 1 \(pid", count=attempt + 1)
        os.kill(launch.worker_pid(0, attempt), signal.SIGKILL)
    assert launch.finish() == 1, launch.text()[-5000:]
    assert len(launch.matches(r"Started worker 0 \(pid")) == 2
    assert launch.matches(r"The job failed after 2 attempt\(s\)")


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


def canned_attempt(pid: int, steps: range, resumed_from: int | None = None) -> list[str]:
    """The launcher's and the workers' log lines of one attempt of a 2-worker job."""
    lines = [f"I1130 10:00:00.000000 1 local.py:92] Started worker {worker} (pid {pid + worker}) with {{}}"
             for worker in (0, 1)]
    if resumed_from is not None:
        lines += [f"[worker {worker}] I1130 10:00:05.000000 1 checkpoints.py:60] Resumed from "
                  f"/runs/r/checkpoints/ckpt-{resumed_from}." for worker in (0, 1)]
    return lines + [f"[worker {worker}] I1130 10:00:09.000000 1 progress.py:32] step {step} (epoch 1, {step}/390) "
                    "loss 2.0" for step in steps for worker in (0, 1)]


def test_reliability_benchmark_counts_lost_steps_per_attempt():
    log = reliability.RunLog()
    for line in (canned_attempt(100, range(10, 40, 10))  # Killed at step 30, before the first checkpoint.
                 + canned_attempt(200, range(10, 150, 10))  # Started fresh; checkpoints at 50 and 100.
                 + canned_attempt(300, range(110, 130, 10), resumed_from=100)  # Killed at step 120.
                 + canned_attempt(400, range(110, 160, 10), resumed_from=100)):
        log.add(line)
    events = [{"attempt": attempt, "signalled_at_step": step} for attempt, step in ((1, 30), (2, 140), (3, 120))]
    for event in events:
        reliability.account_for(event, log.attempts)
    assert [(event["last_finished_step"], event["resumed_from"], event["lost_steps"]) for event in events] == [
        (30, 0, 30), (140, 100, 40), (120, 100, 20)]
    assert log.attempts[3].pids == {0: 400, 1: 401}


def test_reliability_report_names_its_interruption_count_and_any_sigterm_loss():
    def scenario(*lost_steps, fingerprint="1e56171037c5f3e9"):
        return {"wall_seconds": 100.0, "test_accuracy": 0.7, "attempts": len(lost_steps) + 1,
                "weights_fingerprint": fingerprint, "events": [
                    {"lost_steps": lost, "last_finished_step": 100 + lost, "resumed_from": 100} for lost in lost_steps]}

    results = {"date": "2026-01-01", "commit": "abc+changes", "uninterrupted": scenario(),
               "sigkill": scenario(12, 3, 40), "sigterm": scenario(0, 0, 0),
               "flags": {"epochs": 4, "train_split": "train", "eval_split": "test", "checkpoint_steps": 50,
                         "steps_per_loop": 10, "min_delay": 3.0, "max_delay": 20.0}}
    report = reliability.markdown(results)
    assert "3 × SIGKILL" in report and "12 (112 → 100)" in report and "SIGTERM lost no finished step" in report
    assert report.count("| identical |") == 2 and "**differ**" not in report
    results["sigkill"] = scenario(12, fingerprint="0000000000000000")
    assert "**differ** (`0000000000000000`)" in reliability.markdown(results)
    results["sigterm"] = scenario(0, 7)
    assert "2 × SIGTERM" in reliability.markdown(results) and "**SIGTERM lost 7 finished steps" in \
        reliability.markdown(results)


def free_ports(count: int) -> list[int]:
    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(count)]
    ports = [server.getsockname()[1] for server in sockets]
    for server in sockets:
        server.close()
    return ports


def test_a_worker_whose_peer_never_starts_obeys_signals_and_gives_up_after_the_cluster_start_timeout(
        cifar_dir, tmp_path):
    """The issue's worker 0 whose worker 1 never comes: SIGTERM and Ctrl-C end it promptly with 42 and 130, and
    without them it stops after --cluster_start_timeout, naming the missing worker. The three run side by side."""
    waiting = {}
    for name in ("sigterm", "sigint", "timeout"):
        ports = free_ports(2)
        tf_config = {"cluster": {"worker": [f"localhost:{port}" for port in ports]},
                     "task": {"type": "worker", "index": 0}}
        timeout = 10 if name == "timeout" else 300
        waiting[name] = (start_task(*tiny_flags(cifar_dir, tmp_path / name), f"--cluster_start_timeout={timeout}",
                                    output=tmp_path / f"{name}.log", env={"TF_CONFIG": json.dumps(tf_config)}),
                         ports[1])
    deadline = time.monotonic() + 240
    for name, signum in (("sigterm", signal.SIGTERM), ("sigint", signal.SIGINT)):
        process, _ = waiting[name]
        while "Waiting for worker 1" not in (tmp_path / f"{name}.log").read_text():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / f"{name}.log").read_text()
            time.sleep(0.2)
        began = time.monotonic()
        process.send_signal(signum)
        assert process.wait(timeout=60) == (42 if signum == signal.SIGTERM else 130)
        assert time.monotonic() - began < 30
    for name, (process, missing_port) in waiting.items():
        process.wait(timeout=240)
        log = (tmp_path / f"{name}.log").read_text()
        line = single_error_line(subprocess.CompletedProcess([], process.returncode, "", log))
        assert not (tmp_path / name).exists(), name  # Nothing was written.
        if name == "timeout":
            assert process.returncode == 1 and f"worker 1 (localhost:{missing_port})" in line
            assert "--cluster_start_timeout=10" in line
