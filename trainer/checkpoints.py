"""Checkpoints that follow the multi-worker rules, and saving them when a worker is preempted."""

import json
import math
import os
import signal
import threading

from absl import logging
import tensorflow as tf
from tensorflow.python.distribute.failure_handling import failure_handling_util

from trainer.errors import Preempted
from trainer.errors import UsageError
from trainer.errors import one_line

# Checkpoint entries that checkpoints written by earlier versions of the trainer lack; such a
# checkpoint still resumes, without them.
ADDED_LATER = ("random_states",)


class TrainingState(tf.Module):
    """Progress that must survive a restart; saved in every checkpoint."""

    def __init__(self):
        super().__init__(name="training_state")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.train_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.best_value = tf.Variable(math.nan, dtype=tf.float64, trainable=False)
        self.best_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False)
        self.epochs_without_improvement = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.history_json = tf.Variable("[]", dtype=tf.string, trainable=False)

    @property
    def history(self) -> list[dict]:
        return json.loads(self.history_json.numpy().decode())

    def append_history(self, entry: dict) -> None:
        self.history_json.assign(json.dumps(self.history + [entry]))


class CheckpointStore:
    """Saves and restores a run's checkpoints.

    Every worker must call `save` (saving is a collective under MultiWorkerMirroredStrategy), but
    only the chief writes into the shared directory; other workers write to a private temporary
    directory that is removed right after. Every worker restores from the shared directory.
    """

    def __init__(self, directory: str, objects: dict, *, is_chief: bool, task_id: int = 0, max_to_keep: int = 3,
                 after_save=None):
        self.directory = directory
        self.after_save = after_save
        self.is_chief = is_chief
        self.objects = objects
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.read_manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=max_to_keep)
        if is_chief:
            self._write_dir, self.write_manager = directory, self.read_manager
        else:
            self._write_dir = os.path.join(directory, f".worker-{task_id}-temp")
            _remove(self._write_dir)  # A killed worker may have left one behind.
            self.write_manager = tf.train.CheckpointManager(self.checkpoint, self._write_dir, max_to_keep=1)
        self.last_saved_step = None

    def restore_latest(self) -> str | None:
        """Restores the newest checkpoint in the shared directory; returns its path, or None."""
        path = self.read_manager.latest_checkpoint
        if path is None:
            return None
        try:
            self._checkpoint_matching(path).restore(path).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise UsageError(f"Cannot resume from {path}: it does not match this model and flags "
                             f"({one_line(error, 200)}). Use a new --model_dir.") from error
        self.last_saved_step = int(path.rsplit("-", 1)[1])
        logging.info("Resumed from %s.", path)
        return path

    def _checkpoint_matching(self, path: str) -> tf.train.Checkpoint:
        """The run's checkpoint, less the entries added since an older `path` was written."""
        saved = {name.split("/", 1)[0] for name, _ in tf.train.list_variables(path)}
        missing = [name for name in ADDED_LATER if name in self.objects and name not in saved]
        if not missing:
            return self.checkpoint
        logging.warning("%s was written by an earlier version without %s; resuming without them, so the "
                        "random draws of dropout differ from an uninterrupted run's.", path, ", ".join(missing))
        return tf.train.Checkpoint(**{name: value for name, value in self.objects.items() if name not in missing})

    def save(self, step: int) -> None:
        if step == self.last_saved_step:
            return
        path = self.write_manager.save(checkpoint_number=step)
        self.last_saved_step = step
        if self.is_chief:
            logging.info("Saved checkpoint %s.", path)
        else:
            _remove(self._write_dir)
        if self.after_save is not None:
            self.after_save()


def _remove(directory: str) -> None:
    if tf.io.gfile.exists(directory):
        tf.io.gfile.rmtree(directory)


# Longer than the handler's one-second poll, so the wait ends when the poll does.
_HANDLER_POLL_WAIT_SECONDS = 5.0


class PreemptionGuard:
    """Turns SIGTERM on any worker into a checkpoint of the whole cluster at one step, then `Preempted`.

    It rides on tf.distribute's PreemptionCheckpointHandler, which agrees on the step across workers
    through the coordination service. Where that handler does nothing (TPUs, and CPU machines on
    Google Cloud), the workers agree with an all-reduce of the flag instead.
    """

    def __init__(self, strategy: tf.distribute.Strategy, store: CheckpointStore):
        self._strategy, self._store = strategy, store
        self._signalled = threading.Event()
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        _quiet_watcher_thread_failures()
        self._handler = None
        platform = failure_handling_util.detect_platform()
        if not isinstance(strategy, tf.distribute.TPUStrategy) and platform not in (
                failure_handling_util.PlatformDevice.GCE_CPU, failure_handling_util.PlatformDevice.GCE_TPU):
            watch_gce = platform == failure_handling_util.PlatformDevice.GCE_GPU
            termination = tf.distribute.experimental.TerminationConfig(
                termination_watcher_fn=lambda: self._signalled.is_set() or (
                    watch_gce and failure_handling_util.termination_watcher_function_gce()),
                exit_fn=self._exit, save_fn=lambda checkpoint_number: store.save(checkpoint_number))
            self._handler = tf.distribute.experimental.PreemptionCheckpointHandler(
                getattr(strategy, "cluster_resolver", None), store.read_manager, termination_config=termination)
        self._step = None

    def _on_sigterm(self, signum, frame):
        del signum, frame
        # Python runs this only once the running training loop call has returned.
        logging.warning("SIGTERM received: the cluster will checkpoint within the next training loop call and exit.")
        self._signalled.set()

    def _exit(self):
        raise Preempted(self._step)

    def check(self, step: int) -> None:
        """Called by every worker after each training loop call; raises Preempted once saved.

        With the handler, the worker that got the signal names the step after the next loop call
        and the whole cluster saves there; without it, the cluster saves at this call's step.
        """
        self._step = step
        if self._handler is not None:
            if self._signalled.is_set():
                self._wait_for_handler_to_notice()
            self._handler.save_checkpoint_if_preempted(checkpoint_number=step)
        elif self._any_worker_signalled():
            self._store.save(step)
            self._exit()

    def _wait_for_handler_to_notice(self) -> None:
        """The handler polls our signal flag once a second and only then tells the cluster; without
        this wait the check right after the signal usually misses it, costing one more loop call.
        The thread is a private attribute: should TensorFlow rename it, the guard only saves later."""
        watcher = getattr(self._handler, "_poll_termination_signal_thread", None)
        if watcher is not None:
            watcher.join(timeout=_HANDLER_POLL_WAIT_SECONDS)

    def _any_worker_signalled(self) -> bool:
        flag = tf.constant(int(self._signalled.is_set()))
        per_replica = self._strategy.run(lambda: tf.identity(flag))
        return bool(self._strategy.reduce(tf.distribute.ReduceOp.MAX, per_replica, axis=None).numpy())

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous_handler)


_WATCHER_THREADS = ("PeerTerminationWatcher", "WorkerTerminationSignalWatcher")


def _quiet_watcher_thread_failures() -> None:
    """Makes the handler's watcher threads, which die with a traceback when a peer dies (often after
    the main thread has already reported it), log one line instead. Installed once per process."""
    previous = threading.excepthook
    if getattr(previous, "quiets_watchers", False):
        return

    def hook(hook_args):
        if hook_args.thread is not None and hook_args.thread.name.startswith(_WATCHER_THREADS):
            logging.warning("Preemption watcher stopped: %s", one_line(hook_args.exc_value, 200))
            return
        previous(hook_args)

    hook.quiets_watchers = True
    threading.excepthook = hook
