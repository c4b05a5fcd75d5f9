"""A run's directory from start-up to end: opened, checked, locked, restored, prepared, and cleaned up on failure."""

import contextlib
import os

from trainer.training import gcs
from trainer.training import run_lock
from trainer.training import storage
from trainer.config import Config
from trainer.errors import Preempted


class RunDirectory:
    """model_dir (local or gs://) for the length of a run, as a context manager.

    Entering does the start-up in order: open it, check it holds no foreign files, take the lock (the chief
    only), restore a gs:// run from the bucket, create the directories, and check a resume (`resuming`).
    Leaving releases the lock. On a failure it also removes the directories it created while they are still
    empty, so that a run failing before it writes anything (say, ImageNet weights cannot be downloaded)
    leaves model_dir as it found it, not with empty folders that look like a run.
    """

    def __init__(self, config: Config, task_id: int, chief: bool):
        self.config, self.task_id, self.chief = config, task_id, chief
        self.paths: storage.RunPaths | None = None
        self.mirror: gcs.Mirror | None = None  # None for a local run.
        self.resuming = False
        self._lock = None
        self._created: list[str] = []

    def __enter__(self) -> "RunDirectory":
        self.paths, self.mirror = storage.open_run(self.config.model_dir, self.task_id,
                                                   retry_seconds=self.config.storage_retry_seconds)
        try:
            self._start()
        except BaseException:
            self._close(failed=True)  # __exit__ is not called when __enter__ raises.
            raise
        return self

    def _start(self) -> None:
        config, paths, mirror = self.config, self.paths, self.mirror
        if mirror is not None:
            mirror.preflight(write=self.chief)
        storage.check_model_dir_is_a_run(config.model_dir, paths, mirror)
        if mirror is not None:
            # Before the restore, which empties the local working directory another launch may be using.
            self._take_lock()
            mirror.restore()
        self._created = storage.prepare_model_dir(paths)
        if mirror is None:
            self._take_lock()  # Its file is in model_dir, which must exist first.
        self.resuming = storage.check_resume(paths, config)

    def _take_lock(self) -> None:
        """The chief locks model_dir for the whole job: the other workers of a multi-worker job write nothing
        shared, and one lock per worker would make them lock each other out."""
        if self.chief:
            self._lock = run_lock.acquire(self.config.model_dir, self.paths.model_dir, self.mirror,
                                          self.config.force_unlock)

    def write_config(self) -> None:
        """config.json, written by the chief once the run has started (see storage.check_resume); a resumed run
        keeps the one it started with."""
        if self.chief and not (self.resuming and os.path.exists(self.paths.config_file)):
            storage.write_json(self.paths.config_file, self.config.to_dict())

    @contextlib.contextmanager
    def uploads(self):
        """The chief's BackgroundUploader of a gs:// run while the body runs, else None: it mirrors the run after
        every checkpoint, and a preempted run waits for it, since the preemption checkpoint must reach the
        bucket before the machine goes."""
        if self.mirror is None or not self.chief:
            yield None
            return
        uploader = gcs.BackgroundUploader(self.mirror, self.config.storage_retry_seconds)
        try:
            yield uploader
        except Preempted:
            uploader.finish()
            raise
        finally:
            uploader.close()

    @property
    def log_mirror(self) -> gcs.Mirror | None:
        """The mirror that sends the TensorBoard logs up: the chief's, for a gs:// run; workers write none."""
        return self.mirror if self.chief else None

    def __exit__(self, error_type, error, traceback) -> None:
        self._close(failed=error_type is not None)

    def _close(self, failed: bool) -> None:
        if self._lock is not None:
            # The lock first: its file may be all the folder holds.
            self._lock.release()
            self._lock = None
        if failed:
            storage.remove_if_empty(self._created)
