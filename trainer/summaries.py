"""TensorBoard event files: training and evaluation scalars, and the run's flags."""

import os

import tensorflow as tf


class Summaries:
    """Writers for logs/train and logs/eval; a no-op on workers that must not write."""

    def __init__(self, log_dir: str, enabled: bool):
        if enabled:
            self._writers = {kind: tf.summary.create_file_writer(os.path.join(log_dir, kind))
                             for kind in ("train", "eval")}
        else:
            self._writers = {kind: tf.summary.create_noop_writer() for kind in ("train", "eval")}

    def scalars(self, kind: str, step: int, values: dict) -> None:
        with self._writers[kind].as_default(step=step):
            for name, value in values.items():
                tf.summary.scalar(name, value)

    def text(self, kind: str, step: int, name: str, markdown: str) -> None:
        with self._writers[kind].as_default(step=step):
            tf.summary.text(name, markdown)

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()


def flags_markdown(values: dict) -> str:
    rows = "\n".join(f"| `--{name}` | `{value}` |" for name, value in sorted(values.items()))
    return "| flag | value |\n|---|---|\n" + rows
