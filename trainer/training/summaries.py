"""TensorBoard event files: scalars, images, the run's flags as text and hparams, and profiler traces."""

import os

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

# What the HParams dashboard lists for each run: (tag, display name), all in logs/eval (see Summaries).
HPARAMS_METRICS = (("accuracy", "eval accuracy"), ("loss", "eval loss"), ("test_accuracy", "test accuracy"),
                   ("test_loss", "test loss"))


class Summaries:
    """Writers for logs/train and logs/eval; no-ops on workers that must not write.

    The run-level summaries (kind "run": the final test metrics and the HParams session) go to logs/eval,
    beside the per-epoch eval metrics. TensorBoard looks up a session's metrics in the run named
    "<session run>/<group>"; a session at the logdir root is run ".", and "./eval" matches no run, so
    with `tensorboard --logdir MODEL_DIR/logs` the eval columns of the HParams dashboard would stay empty.
    """

    def __init__(self, log_dir: str, enabled: bool):
        self.log_dir, self.enabled = log_dir, enabled
        if enabled:
            self._writers = {kind: tf.summary.create_file_writer(os.path.join(log_dir, kind))
                             for kind in ("train", "eval")}
        else:
            self._writers = {kind: tf.summary.create_noop_writer() for kind in ("train", "eval")}
        # One writer per directory: TensorBoard stops reading an event file once a newer one appears beside it.
        self._writers["run"] = self._writers["eval"]
        self._profiling = False

    def scalars(self, kind: str, step: int, values: dict) -> None:
        with self._writers[kind].as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def text(self, kind: str, step: int, name: str, markdown: str) -> None:
        with self._writers[kind].as_default(step=step):
            tf.summary.text(name, markdown)

    def image_grid(self, kind: str, step: int, name: str, images: np.ndarray, description: str = "") -> None:
        """Tiles a batch of uint8 images [N, H, W, C] into one picture, so it reads at a glance."""
        with self._writers[kind].as_default(step=step):
            tf.summary.image(name, grid(images)[np.newaxis], step=step, description=description)

    def png(self, kind: str, step: int, name: str, png_bytes: bytes) -> None:
        with self._writers[kind].as_default(step=step):
            tf.summary.image(name, tf.image.decode_png(png_bytes)[tf.newaxis], step=step)

    def hparams(self, values: dict, run_name: str) -> None:
        """The run's flags for TensorBoard's HParams dashboard, which compares runs side by side."""
        clean = {name: value if isinstance(value, (bool, int, float, str)) else str(value)
                 for name, value in values.items() if value is not None}
        metrics = [hparams_api.Metric(tag, display_name=name) for tag, name in HPARAMS_METRICS]
        with self._writers["run"].as_default(step=0):
            hparams_api.hparams_config(hparams=[hparams_api.HParam(name) for name in clean], metrics=metrics)
            hparams_api.hparams(clean, trial_id=run_name)

    def start_profiler(self) -> None:
        if self.enabled and not self._profiling:
            tf.profiler.experimental.start(self.log_dir)
            self._profiling = True

    def stop_profiler(self) -> None:
        if self._profiling:
            tf.profiler.experimental.stop()
            self._profiling = False

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()


def write_png(log_dir: str, step: int, name: str, png_bytes: bytes, description: str = "") -> None:
    """One PNG as an image summary in its own event file in `log_dir`, for a tool that writes once and exits."""
    writer = tf.summary.create_file_writer(log_dir)
    with writer.as_default(step=step):
        tf.summary.image(name, tf.image.decode_png(png_bytes)[tf.newaxis], step=step, description=description)
    writer.close()


def grid(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> one [rows*H, columns*W, 3] image, with 1-pixel white separators."""
    images = np.asarray(images, np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    count, height, width, _ = images.shape
    columns = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    canvas = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1, 3), 255, np.uint8)
    for index, image in enumerate(images):
        top, left = (index // columns) * (height + 1), (index % columns) * (width + 1)
        canvas[top:top + height, left:left + width] = image
    return canvas


def flags_markdown(values: dict) -> str:
    rows = "\n".join(f"| `--{name}` | `{value}` |" for name, value in sorted(values.items()))
    return "| flag | value |\n|---|---|\n" + rows
