"""Checkpoints that follow the multi-worker rules, and saving them when a worker is preempted."""

import glob
import json
import math
import os
import re
import signal
import threading

from absl import logging
import tensorflow as tf
from tensorflow.python.distribute.failure_handling import failure_handling_util

from trainer.training import checkpoint_schema
from trainer.training import storage
from trainer.errors import Preempted
from trainer.errors import UsageError
from trainer.errors import one_line


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
        self.max_to_keep = max_to_keep
        self.checkpoint = tf.train.Checkpoint(**objects)
        if is_chief:
            repair_state_file(directory)
        self._open_managers(task_id)
        self.last_saved_step = None

    def _open_managers(self, task_id: int = 0) -> None:
        self.read_manager = tf.train.CheckpointManager(self.checkpoint, self.directory, max_to_keep=self.max_to_keep)
        if self.is_chief:
            self._write_dir, self.write_manager = self.directory, self.read_manager
        else:
            self._write_dir = os.path.join(self.directory, f".worker-{task_id}-temp")
            _remove(self._write_dir)  # A killed worker may have left one behind.
            self.write_manager = tf.train.CheckpointManager(self.checkpoint, self._write_dir, max_to_keep=1)

    def restore_latest(self) -> str | None:
        """Restores the newest intact checkpoint in the shared directory; returns its path, or None when it has none.

        It walks back from the newest checkpoint on disk (whatever the state file says), skipping each one that
        cannot be read whole, and names those it skipped. When none can be read it stops, changing nothing.
        """
        candidates = checkpoints_on_disk(self.directory)
        skipped = []
        for path in candidates:
            damage = checkpoint_damage(path)
            if damage is not None:
                logging.warning("Skipping checkpoint %s: %s.", path, damage)
                skipped.append(f"{os.path.basename(path)}: {damage}")
                continue
            self._restore(path)
            if skipped:
                logging.warning("Resumed from %s, the newest intact checkpoint, skipping %d newer damaged one(s).",
                                path, len(skipped))
                if self.is_chief:
                    # Later saves must neither count the damaged ones as kept nor make them the latest.
                    kept = [path, *self._intact(candidates[len(skipped) + 1:], self.max_to_keep - 1)]
                    write_state_file(self.directory, path, list(reversed(kept)))
                    self._open_managers()
            return path
        if skipped:
            raise UsageError(f"None of the {len(skipped)} checkpoints in {self.directory} can be read "
                             f"({'; '.join(skipped)[:300]}); nothing was changed. Move them aside to start the run "
                             "over, or give a new --model_dir.")
        return None

    @staticmethod
    def _intact(paths: list[str], count: int) -> list[str]:
        """The first `count` of `paths` that read back whole (each one read only until enough are found)."""
        intact = []
        for path in paths:
            if len(intact) == count:
                break
            if checkpoint_damage(path) is None:
                intact.append(path)
        return intact

    def _restore(self, path: str) -> None:
        try:
            checkpoint_schema.checkpoint_for(self.objects, path, whole=self.checkpoint).restore(
                path).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise UsageError(f"Cannot resume from {path}: it does not match this model and flags "
                             f"({one_line(error, 200)}). Use a new --model_dir.") from error
        self.last_saved_step = checkpoint_number(path)
        logging.info("Resumed from %s.", path)

    def save(self, step: int) -> None:
        if step == self.last_saved_step:
            return
        with storage.disk_space_guard(f"checkpoint {step}", self._write_dir,
                                      leftovers=os.path.join(self._write_dir, f"ckpt-{step}_temp*")):
            path = self.write_manager.save(checkpoint_number=step)
        self.last_saved_step = step
        if self.is_chief:
            logging.info("Saved checkpoint %s.", path)
        else:
            _remove(self._write_dir)
        if self.after_save is not None:
            self.after_save()


def checkpoint_number(path: str) -> int:
    return int(path.rsplit("-", 1)[1])


def checkpoints_on_disk(directory: str) -> list[str]:
    """Every checkpoint in `directory` (its path prefix, e.g. DIR/ckpt-40), newest first, from the files themselves
    and from the state file: a checkpoint missing a file is still listed, so that it is reported as damaged."""
    numbers = set()
    for path in glob.glob(os.path.join(glob.escape(directory), "ckpt-*")):
        match = re.fullmatch(r"ckpt-(\d+)\.(index|data-\d+-of-\d+)", os.path.basename(path))
        if match:
            numbers.add(int(match.group(1)))
    state = _read_state(directory)
    if state is not None:
        for name in [state.model_checkpoint_path, *state.all_model_checkpoint_paths]:
            match = re.fullmatch(r"ckpt-(\d+)", os.path.basename(name))
            if match:
                numbers.add(int(match.group(1)))
    return [os.path.join(directory, f"ckpt-{number}") for number in sorted(numbers, reverse=True)]


def checkpoint_damage(path: str) -> str | None:
    """Why the checkpoint at `path` cannot be restored whole, or None when every tensor in it reads back.

    Reading every tensor checks each against the checksum its index holds, so a truncated or corrupted data
    file is caught here instead of halfway through a restore that has already overwritten some variables.
    """
    if not os.path.exists(path + ".index"):
        return "its .index file is missing"
    if not glob.glob(glob.escape(path) + ".data-*"):
        return "its .data files are missing"
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as error:  # noqa: BLE001  (a cut file raises IndexError, ValueError or op errors by where it ends)
        return f"it cannot be read ({one_line(error, 160)})"
    return None


def _read_state(directory: str):
    """The checkpoint state file's contents, or None when it is absent or damaged."""
    try:
        state = tf.train.get_checkpoint_state(directory)
    except ValueError:  # An empty file.
        return None
    return state if state is not None and state.model_checkpoint_path else None


def repair_state_file(directory: str) -> None:
    """Rebuilds a damaged or missing checkpoint state file from the checkpoint files on disk.

    TensorFlow reads a damaged state file as "no checkpoints" (garbage) or fails (an empty file); either way
    the run would start over and overwrite the good checkpoints it has.
    """
    state_file = os.path.join(directory, "checkpoint")
    on_disk = checkpoints_on_disk(directory)
    if not on_disk or _read_state(directory) is not None:
        return
    if os.path.exists(state_file):
        logging.warning("The checkpoint state file %s is damaged; rebuilding it from the %d checkpoint(s) on disk.",
                        state_file, len(on_disk))
    else:
        logging.warning("%s holds checkpoints but no state file; rebuilding it from them.", directory)
    write_state_file(directory, on_disk[0], list(reversed(on_disk)))


def write_state_file(directory: str, latest: str, kept: list[str]) -> None:
    tf.compat.v1.train.update_checkpoint_state(directory, os.path.basename(latest),
                                               [os.path.basename(path) for path in kept])


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
