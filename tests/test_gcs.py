"""gs:// run directories against a real Cloud Storage emulator: outputs land, mirrored as the run goes (by the chief
only: tests/test_multiworker.py), uploads resume and are verified, runs resume, bad buckets fail early."""

import json
import os
import re
import signal
import time
from types import SimpleNamespace

from google.api_core.exceptions import Forbidden
import pytest
import requests

from helpers import bucket_files, make_config, run_task, single_error_line, start_task
from trainer.training import gcs
from trainer.training import storage
from trainer.training import train
from trainer.errors import TrainingError
from trainer.errors import UsageError


def test_gs_model_dir_holds_every_output_and_a_second_run_resumes_from_it(cifar_dir, gcs_bucket):
    model_dir = f"gs://{gcs_bucket}/runs/cnn"
    first = train.run(make_config(cifar_dir, model_dir, steps_per_epoch=4, epochs=1, checkpoint_steps=1,
                                  steps_per_loop=1))
    files = bucket_files(gcs_bucket, "runs/cnn")
    for expected in ("config.json", "metrics.json", "history.png", "export/saved_model.pb",
                     "export/assets.extra/labels.txt", "checkpoints/checkpoint", "checkpoints/ckpt-4.index"):
        assert expected in files, (expected, files)
    assert any(re.match(r"logs/train/events\.out\.tfevents\.", name) for name in files)
    assert any(re.match(r"logs/eval/events\.out\.tfevents\.", name) for name in files)
    # Saved after steps 1, 2, 3 and 4, three are kept, here and in the bucket.
    assert sorted(name for name in files if name.startswith("checkpoints/") and name.endswith(".index")) == [
        f"checkpoints/ckpt-{step}.index" for step in (2, 3, 4)]
    assert not [name for name in files if "worker" in name or ".tmp-" in name or "write-check" in name]

    second = train.run(make_config(cifar_dir, model_dir, steps_per_epoch=4, epochs=2, checkpoint_steps=1,
                                   steps_per_loop=1))
    assert second["epochs_completed"] == 2 and second["history"][0] == first["history"][0]
    assert "checkpoints/ckpt-8.index" in bucket_files(gcs_bucket, "runs/cnn")


def test_vertex_output_directories_are_honoured_without_model_dir(cifar_dir, gcs_bucket, monkeypatch):
    base = f"gs://{gcs_bucket}/vertex"
    monkeypatch.setenv("AIP_MODEL_DIR", f"{base}/model/")
    monkeypatch.setenv("AIP_CHECKPOINT_DIR", f"{base}/checkpoints/")
    monkeypatch.setenv("AIP_TENSORBOARD_LOG_DIR", f"{base}/logs/")
    config = make_config(cifar_dir, "", steps_per_epoch=2, epochs=1)
    assert config.model_dir == f"{base}/model/"
    train.run(config)
    assert {"metrics.json", "export/saved_model.pb"} <= set(bucket_files(gcs_bucket, "vertex/model"))
    assert "ckpt-2.index" in bucket_files(gcs_bucket, "vertex/checkpoints")
    assert any(name.startswith("train/events.out.tfevents.") for name in bucket_files(gcs_bucket, "vertex/logs"))


def test_missing_bucket_fails_in_one_line_before_training(cifar_dir, gcs_bucket, tmp_path):
    began = time.monotonic()
    result = run_task(f"--data_dir={cifar_dir}", "--model_dir=gs://no-such-bucket/run", "--train_split=train[:256]")
    line = single_error_line(result)
    assert "bucket gs://no-such-bucket does not exist" in line
    assert "Phase train" not in result.stderr and time.monotonic() - began < 60


def test_results_tools_read_and_write_a_gs_run(cifar_dir, gcs_bucket):
    from trainer.results import evaluate

    model_dir = f"gs://{gcs_bucket}/runs/evaluated"
    metrics = train.run(make_config(cifar_dir, model_dir, steps_per_epoch=2, epochs=1))
    results = evaluate.evaluate_run(model_dir)
    assert results["accuracy"] == metrics["test_accuracy"]
    assert {"evaluation.json", "confusion_matrix.png"} <= set(bucket_files(gcs_bucket, "runs/evaluated"))


def test_checkpoints_reach_the_bucket_while_the_run_goes_on_and_a_preempted_run_uploads_its_last(
        cifar_dir, gcs_bucket, tmp_path):
    model_dir = f"gs://{gcs_bucket}/runs/preempted"
    log = tmp_path / "trainer.log"
    process = start_task(f"--data_dir={cifar_dir}", f"--model_dir={model_dir}", "--train_split=train[:1024]",
                         "--eval_split=test[:256]", "--batch_size=64", "--epochs=50", "--early_stopping_patience=0",
                         "--checkpoint_steps=4", "--steps_per_loop=1", output=log)
    try:
        first = wait_for_checkpoint_in_bucket(gcs_bucket, "runs/preempted", process, log)
        # Still training, with no metrics.json yet: the checkpoint was mirrored when it was saved, not at the end.
        assert process.poll() is None and "metrics.json" not in bucket_files(gcs_bucket, "runs/preempted"), first
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert status == 42, output[-3000:]
    step = re.search(r"Preempted: checkpoint saved at step (\d+)", output).group(1)
    files = bucket_files(gcs_bucket, "runs/preempted")
    assert f"checkpoints/ckpt-{step}.index" in files, files
    assert f'model_checkpoint_path: "ckpt-{step}"' in remote_bytes(gcs_bucket, "runs/preempted/checkpoints/checkpoint"
                                                                     ).decode()


def wait_for_checkpoint_in_bucket(bucket: str, prefix: str, process, log, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        found = [name for name in bucket_files(bucket, prefix) if re.fullmatch(r"checkpoints/ckpt-\d+\.index", name)]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint reached gs://{bucket}/{prefix} while the trainer ran (status "
                         f"{process.poll()}):\n{log.read_text()[-3000:]}")


class RecordingTransport(requests.Session):
    """The HTTP session of a storage client: records every request, and can fail or damage uploads on their way."""

    def __init__(self, failed_final_chunks: int = 0, damaged_chunks: int = 0):
        super().__init__()
        self.sent: list[SimpleNamespace] = []
        self.failed_final_chunks, self.damaged_chunks = failed_final_chunks, damaged_chunks

    def request(self, method, url, data=None, headers=None, **kwargs):
        content_range = (headers or {}).get("content-range", "")
        payload = data if isinstance(data, bytes) else b""
        self.sent.append(SimpleNamespace(method=method, url=url, content_range=content_range, size=len(payload)))
        # A resumable upload's last chunk is the one that states the total size.
        if method == "PUT" and content_range and not content_range.endswith("/*") and self.failed_final_chunks:
            self.failed_final_chunks -= 1
            return unavailable(method, url)
        if method == "PUT" and payload and self.damaged_chunks:
            self.damaged_chunks -= 1
            data = bytes([payload[0] ^ 0xFF]) + payload[1:]
        return super().request(method, url, data=data, headers=headers, **kwargs)


def unavailable(method: str, url: str) -> requests.Response:
    response = requests.Response()
    response.status_code, response.url, response._content = 503, url, b"injected: service unavailable"
    response.request = requests.Request(method, url).prepare()
    return response


def mirror_with_large_file(bucket: str, tmp_path, transport: RecordingTransport) -> tuple[gcs.Mirror, bytes]:
    """A run directory holding a file of two chunks and a bit, like a checkpoint shard, and a small file."""
    from google.cloud import storage as cloud_storage

    local = tmp_path / "run"
    local.mkdir()
    content = os.urandom(2 * gcs.RESUMABLE_CHUNK_BYTES + 100 * 1024 + 17)
    (local / "ckpt-1.data-00000-of-00001").write_bytes(content)
    (local / "metrics.json").write_text('{"test_accuracy": 0.5}\n')
    root = gcs.Root(str(local), f"gs://{bucket}/{tmp_path.name}")
    return gcs.Mirror([root], client=cloud_storage.Client(_http=transport)), content


def remote_bytes(bucket: str, name: str) -> bytes:
    from google.cloud import storage as cloud_storage

    return cloud_storage.Client().bucket(bucket).blob(name).download_as_bytes()


def test_large_files_go_up_in_resumable_chunks_and_a_failed_chunk_alone_is_sent_again(gcs_bucket, tmp_path):
    transport = RecordingTransport(failed_final_chunks=1)
    mirror, content = mirror_with_large_file(gcs_bucket, tmp_path, transport)
    mirror.upload()
    assert remote_bytes(gcs_bucket, f"{tmp_path.name}/ckpt-1.data-00000-of-00001") == content
    chunks = [request for request in transport.sent if request.method == "PUT"]
    assert chunks and all("uploadType=resumable" in request.url for request in chunks)
    assert max(request.size for request in chunks) == gcs.RESUMABLE_CHUNK_BYTES
    last_chunk = len(content) % gcs.RESUMABLE_CHUNK_BYTES
    assert sum(request.size for request in chunks) == len(content) + last_chunk
    # The small file went up in one request.
    assert len([request for request in transport.sent if "uploadType=multipart" in request.url]) == 1
    assert json.loads(remote_bytes(gcs_bucket, f"{tmp_path.name}/metrics.json")) == {"test_accuracy": 0.5}


def test_a_checksum_mismatch_is_detected_and_the_file_sent_again(gcs_bucket, tmp_path):
    transport = RecordingTransport(damaged_chunks=1)
    mirror, content = mirror_with_large_file(gcs_bucket, tmp_path, transport)
    mirror.upload()
    assert remote_bytes(gcs_bucket, f"{tmp_path.name}/ckpt-1.data-00000-of-00001") == content
    sessions = [request for request in transport.sent if request.method == "POST" and "uploadType=resumable" in
                request.url]
    assert len(sessions) == 2


def test_repeated_checksum_mismatches_stop_with_one_line_and_leave_no_damaged_file(gcs_bucket, tmp_path):
    mirror, _ = mirror_with_large_file(gcs_bucket, tmp_path, RecordingTransport(damaged_chunks=1000))
    with pytest.raises(TrainingError) as caught:
        mirror.upload()
    message = str(caught.value)
    assert "ckpt-1.data-00000-of-00001" in message and "failed its CRC32C check 2 times" in message, message
    assert "\n" not in message
    assert "ckpt-1.data-00000-of-00001" not in bucket_files(gcs_bucket, tmp_path.name)


class BucketThatRefusesWrites:
    """A storage client for a bucket that exists and may be read, but not written (no storage.objects.create)."""

    def lookup_bucket(self, name: str, timeout: float | None = None, retry=None):
        return SimpleNamespace(name=name)

    def bucket(self, name: str):
        return SimpleNamespace(blob=lambda blob_name: SimpleNamespace(upload_from_string=self.refuse,
                                                                      delete=self.refuse))

    @staticmethod
    def refuse(*args, **kwargs):
        raise Forbidden("POST https://storage.googleapis.com/upload/storage/v1/b/read-only/o: trainer@p.iam."
                        "gserviceaccount.com does not have storage.objects.create access\nto the object.")


def test_bucket_that_is_not_writable_fails_the_chief_in_one_line(tmp_path):
    mirror = gcs.Mirror([gcs.Root(str(tmp_path), "gs://read-only/runs/cnn")], client=BucketThatRefusesWrites())
    mirror.preflight(write=False)  # A worker only reads, so it may go on.
    with pytest.raises(UsageError) as caught:
        mirror.preflight(write=True)
    assert str(caught.value) == ("gs://read-only/runs/cnn: no permission to write gs://read-only (trainer@p.iam."
                                 "gserviceaccount.com does not have storage.objects.create access to the object).")


def test_chief_and_worker_on_one_machine_get_their_own_working_directories(monkeypatch):
    """Vertex AI numbers each worker pool from 0, so the chief (pool 0) and the first worker (pool 1) are both
    index 0; launch.local --cluster_env=cluster_spec runs them on one machine."""
    for variable in ("TF_CONFIG", "WORKER_HOSTS", "JOB_COMPLETION_INDEX", "AIP_MODEL_DIR"):
        monkeypatch.delenv(variable, raising=False)
    cluster = {"workerpool0": ["127.0.0.1:2222"], "workerpool1": ["127.0.0.1:2223"]}
    directories = {}
    for pool in cluster:
        monkeypatch.setenv("CLUSTER_SPEC", json.dumps({"cluster": cluster, "task": {"type": pool, "index": 0}}))
        paths, _ = storage.open_run("gs://test-bucket/runs/shared", task_id=0)
        directories[pool] = paths.model_dir
    assert directories["workerpool0"] != directories["workerpool1"], directories
    # A restarted task finds its own directory again.
    assert storage.open_run("gs://test-bucket/runs/shared", task_id=0)[0].model_dir == directories["workerpool1"]
