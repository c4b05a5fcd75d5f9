"""Live TensorBoard: a gs:// run's events reach the bucket every --log_upload_seconds, long before a checkpoint."""

import signal
import time

import tensorflow as tf

from helpers import bucket_files
from helpers import start_task


def scalar_tags(event_file_bytes: bytes, path) -> set[str]:
    path.write_bytes(event_file_bytes)
    tags = set()
    for record in tf.data.TFRecordDataset(str(path)):
        event = tf.compat.v1.Event.FromString(record.numpy())
        tags.update(value.tag for value in event.summary.value)
    return tags


def test_events_reach_vertex_tensorboard_folder_before_the_first_checkpoint(cifar_dir, gcs_bucket, tmp_path):
    """In Vertex AI's layout (AIP_TENSORBOARD_LOG_DIR), with an epoch far longer than the test: the training loss
    must show up in the bucket while no checkpoint exists yet."""
    from google.cloud import storage

    base = f"gs://{gcs_bucket}/vertex"
    env = {"AIP_MODEL_DIR": f"{base}/model/", "AIP_CHECKPOINT_DIR": f"{base}/checkpoints/",
           "AIP_TENSORBOARD_LOG_DIR": f"{base}/logs/"}
    # 8,192 steps of one image: the first checkpoint, at the epoch's end, is minutes away. (A larger
    # --steps_per_epoch than the split holds would be cut to the split: 2,048 images in batches of 32 took 2 s.)
    process = start_task(f"--data_dir={cifar_dir}", "--train_split=train[:8192]", "--eval_split=test[:128]",
                         "--batch_size=1", "--steps_per_loop=2", "--epochs=1",
                         "--precision=float32", "--log_upload_seconds=1", output=tmp_path / "log.txt", env=env)
    try:
        deadline, seen = time.monotonic() + 240, None
        while time.monotonic() < deadline and process.poll() is None:
            events = [name for name in bucket_files(gcs_bucket, "vertex/logs") if name.startswith("train/events")]
            if events:
                blob = storage.Client().bucket(gcs_bucket).blob(f"vertex/logs/{events[0]}")
                if "loss" in scalar_tags(blob.download_as_bytes(), tmp_path / "events"):
                    seen = bucket_files(gcs_bucket, "vertex/checkpoints")
                    break
            time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    assert seen is not None, (tmp_path / "log.txt").read_text()[-3000:]
    assert not any(name.startswith("ckpt-") for name in seen), seen
