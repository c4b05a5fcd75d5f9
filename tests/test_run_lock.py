"""The run lock: a second launch on a model_dir fails in one line naming the holder; dead holders are recovered."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, fails_in_process
from trainer.training import gcs
from trainer.training import run_lock
from trainer import task
from trainer.errors import UsageError

HOLD_LOCK = """
import sys, time
from trainer.training import run_lock
lock = run_lock.LocalLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_lock(path, seconds: float) -> subprocess.Popen:
    """Another process holding the lock file `path`; returns once it holds it."""
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path), str(seconds)], stdout=subprocess.PIPE,
                               text=True, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_launch_fails_in_one_line_naming_the_holder_and_changes_nothing(tmp_path, capsys, cifar_dir):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    holder = hold_lock(model_dir / run_lock.LOCK_NAME, 60)
    try:
        line = fails_in_process(capsys, task, f"--data_dir={cifar_dir}", f"--model_dir={model_dir}",
                                "--train_split=train[:512]", "--eval_split=test[:256]", "--batch_size=32",
                                "--steps_per_epoch=5", "--epochs=1")
    finally:
        holder.kill()
        holder.wait()
    assert f"{model_dir} is in use by another run" in line
    assert f"host {socket.gethostname()}, pid {holder.pid}, started 20" in line
    assert sorted(path.name for path in model_dir.iterdir()) == [run_lock.LOCK_NAME]  # No checkpoints/ or logs/.


def test_a_lock_left_by_a_killed_process_is_taken_and_released(tmp_path):
    path = tmp_path / run_lock.LOCK_NAME
    holder = hold_lock(path, 60)
    with pytest.raises(UsageError, match=f"pid {holder.pid}"):
        run_lock.LocalLock(str(path)).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = run_lock.LocalLock(str(path))
    lock.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def bucket_lock(bucket: str, name: str) -> run_lock.BucketLock:
    return run_lock.BucketLock(f"gs://{bucket}/{name}/{run_lock.LOCK_NAME}", gcs.Mirror([], retry_seconds=5))


def write_holder(bucket: str, name: str, holder: dict) -> None:
    from google.cloud import storage

    storage.Client().bucket(bucket).blob(f"{name}/{run_lock.LOCK_NAME}").upload_from_string(json.dumps(holder))


def test_the_bucket_lock_admits_one_launch_and_names_the_holder(gcs_bucket):
    first, second = bucket_lock(gcs_bucket, "locked"), bucket_lock(gcs_bucket, "locked")
    first.acquire(force_unlock=False)
    with pytest.raises(UsageError, match=rf"in use by another run \(host {socket.gethostname()}, pid {os.getpid()}"):
        second.acquire(force_unlock=False)  # This very process is alive and a trainer (pytest runs trainer code).
    first.release()
    second.acquire(force_unlock=False)
    second.release()


def test_a_bucket_lock_from_elsewhere_needs_force_unlock_and_a_dead_local_one_does_not(gcs_bucket, tmp_path,
                                                                                       capsys, cifar_dir):
    elsewhere = {"host": "another-machine", "pid": 7, "started": "2026-12-01T10:00:00+00:00"}
    write_holder(gcs_bucket, "stale", elsewhere)
    line = fails_in_process(capsys, task, f"--data_dir={cifar_dir}", f"--model_dir=gs://{gcs_bucket}/stale",
                            "--train_split=train[:512]", "--epochs=1")
    assert "host another-machine, pid 7, started 2026-12-01T10:00:00+00:00" in line and "--force_unlock" in line

    lock = bucket_lock(gcs_bucket, "stale")
    lock.acquire(force_unlock=True)
    lock.release()

    # A restarted pod or Vertex AI replica keeps its host name; its old process is gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_holder(gcs_bucket, "restarted", {"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"})
    lock = bucket_lock(gcs_bucket, "restarted")
    began = time.monotonic()
    lock.acquire(force_unlock=False)
    assert time.monotonic() - began < 10
    lock.release()


@pytest.mark.parametrize("variable, job", [("CLOUD_ML_JOB_ID", "Vertex AI job 1234"),
                                           ("KUBERNETES_JOB_UID", "Kubernetes job 6f1c-uid")])
def test_a_later_attempt_of_the_same_job_takes_over_its_lock_and_another_job_does_not(gcs_bucket, monkeypatch,
                                                                                      variable, job):
    """Keyed on the job, not the host: a restarted replica may come back on another machine, and another job's
    replica may have the same host name."""
    value = job.rsplit(" ", 1)[1]
    earlier_attempt = {"host": "workerpool0-0", "pid": 7, "started": "2026-12-01T10:00:00+00:00", "job": job,
                       "process": "an-earlier-process"}
    name = f"attempts-{variable}"
    write_holder(gcs_bucket, name, earlier_attempt)
    monkeypatch.setenv(variable, "another-job")
    with pytest.raises(UsageError, match=f"in use by another run \\({job}, host workerpool0-0"):
        bucket_lock(gcs_bucket, name).acquire(force_unlock=False)

    monkeypatch.setenv(variable, value)
    lock = bucket_lock(gcs_bucket, name)
    lock.acquire(force_unlock=False)
    from google.cloud import storage
    written = json.loads(storage.Client().bucket(gcs_bucket).blob(f"{name}/{run_lock.LOCK_NAME}").download_as_bytes())
    assert written["job"] == job and written["pid"] == os.getpid()
    # This attempt's own lock is not taken over by itself a second time.
    with pytest.raises(UsageError, match="in use by another run"):
        bucket_lock(gcs_bucket, name).acquire(force_unlock=False)
    lock.release()


def test_in_a_job_a_dead_process_on_this_host_of_another_job_keeps_its_lock(gcs_bucket, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_holder(gcs_bucket, "other-job", {"host": socket.gethostname(), "pid": dead.pid, "started": "earlier",
                                           "job": "Vertex AI job 1"})
    monkeypatch.setenv("CLOUD_ML_JOB_ID", "2")
    with pytest.raises(UsageError, match="Vertex AI job 1, host"):
        bucket_lock(gcs_bucket, "other-job").acquire(force_unlock=False)
