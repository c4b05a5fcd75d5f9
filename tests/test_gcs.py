"""gs:// run directories against a real Cloud Storage emulator: outputs land, runs resume, bad buckets fail early."""

import re
import time

from conftest import bucket_files, make_config, run_task, single_error_line
from trainer import train


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
    from trainer import evaluate

    model_dir = f"gs://{gcs_bucket}/runs/evaluated"
    metrics = train.run(make_config(cifar_dir, model_dir, steps_per_epoch=2, epochs=1))
    results = evaluate.evaluate_run(model_dir)
    assert results["accuracy"] == metrics["test_accuracy"]
    assert {"evaluation.json", "confusion_matrix.png"} <= set(bucket_files(gcs_bucket, "runs/evaluated"))
