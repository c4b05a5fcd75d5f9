"""Checkpoints of the training state and of the best weights, following the multi-worker rules."""

import os

from absl import logging
import tensorflow as tf

from trainer.errors import UsageError
from trainer.errors import one_line

BEST_SUBDIR = "best"


class CheckpointStore:
    """Saves and restores a run's checkpoints.

    Every worker must call `save` (saving is a collective under MultiWorkerMirroredStrategy), but
    only the chief writes into the shared directory; other workers write to a private temporary
    directory that is removed right after.
    """

    def __init__(self, directory: str, *, training_objects: dict, best_objects: dict, is_chief: bool,
                 task_id: int = 0, max_to_keep: int = 3):
        self.directory = directory
        self.is_chief = is_chief
        self.checkpoint = tf.train.Checkpoint(**training_objects)
        self.best_checkpoint = tf.train.Checkpoint(**best_objects)
        self._write_dir = directory if is_chief else os.path.join(directory, f".worker-{task_id}-temp")
        if not is_chief:
            _remove(self._write_dir)  # A killed worker may have left one behind.
        self.manager = tf.train.CheckpointManager(self.checkpoint, self._write_dir, max_to_keep=max_to_keep)
        self.best_manager = tf.train.CheckpointManager(
            self.best_checkpoint, os.path.join(self._write_dir, BEST_SUBDIR), max_to_keep=1)

    def latest(self) -> str | None:
        return tf.train.latest_checkpoint(self.directory)

    def restore_latest(self) -> str | None:
        """Restores the newest checkpoint in the shared directory; returns its path, or None."""
        path = self.latest()
        if path is None:
            return None
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise UsageError(f"Cannot resume from {path}: it does not match this model and flags "
                             f"({one_line(error, 200)}). Use a new --model_dir.") from error
        logging.info("Resumed from %s.", path)
        return path

    def save(self, step: int) -> None:
        path = self.manager.save(checkpoint_number=step)
        self._clean_up_if_temporary()
        if self.is_chief:
            logging.info("Saved checkpoint %s.", path)

    def save_best(self, step: int) -> None:
        self.best_manager.save(checkpoint_number=step)
        self._clean_up_if_temporary()

    def restore_best(self) -> bool:
        path = tf.train.latest_checkpoint(os.path.join(self.directory, BEST_SUBDIR))
        if path is None:
            return False
        self.best_checkpoint.restore(path).expect_partial()
        return True

    def _clean_up_if_temporary(self) -> None:
        if not self.is_chief:
            _remove(self._write_dir)


def _remove(directory: str) -> None:
    if tf.io.gfile.exists(directory):
        tf.io.gfile.rmtree(directory)
