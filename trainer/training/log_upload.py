"""Live TensorBoard for gs:// runs: a thread that sends new event files to the bucket every --log_upload_seconds.

The run's mirror (trainer.gcs) uploads everything with each checkpoint, once an epoch by default; a user watching a
long cloud run in TensorBoard, or in Vertex AI TensorBoard, which streams from the same folder, would see nothing
until then. This thread sends the logs folder alone, on its own clock, whatever the training loop is doing.
"""

import contextlib
import threading
from typing import Callable

from absl import logging

from trainer.training import gcs


class LogUploader:
    """Every `seconds`: flush the event writers, then send the changed files under one mirrored root."""

    def __init__(self, mirror: gcs.Mirror, flush: Callable[[], None], seconds: float):
        self.mirror, self.flush, self.seconds = mirror, flush, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tensorboard-log-upload", daemon=True)
        self._failures = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread after one last upload, so the logs of a failed or stopped run reach the bucket too."""
        self._stop.set()
        self._thread.join()
        self.send()

    def _loop(self) -> None:
        while not self._stop.wait(self.seconds):
            self.send()

    def send(self) -> None:
        try:
            self.flush()
            self.mirror.upload()
            self._failures = 0
        except Exception as error:  # A storage hiccup must not stop training; the next round retries.
            self._failures += 1
            # One warning per run of failures: the checkpoint uploads, which must succeed, report their own errors.
            if self._failures == 1:
                logging.warning("TensorBoard logs could not be sent to %s (%s); retrying every %ss.",
                                self.mirror.roots[0].remote, gcs.service_reason(error), self.seconds)


@contextlib.contextmanager
def live_logs(mirror: gcs.Mirror | None, log_dir: str, flush: Callable[[], None], seconds: float):
    """Runs a LogUploader for the logs root of `mirror` (the run's gs:// mirror) while the body runs; nothing for a
    local run (TensorBoard reads it as it is written) or for a worker that writes no logs (mirror None)."""
    root = next((root for root in mirror.roots if root.local == log_dir), None) if mirror is not None else None
    if root is None:
        yield
        return
    uploader = LogUploader(gcs.Mirror([root]), flush, seconds)
    logging.info("TensorBoard events go to %s every %ss.", root.remote, seconds)
    uploader.start()
    try:
        yield
    finally:
        uploader.stop()
