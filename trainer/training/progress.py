"""Console progress: a bar within the epoch on a terminal, and one log line per epoch with an ETA."""

import sys
import time

from absl import logging


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """Tracks epoch times to estimate the time left, and draws the in-epoch bar on a terminal."""

    def __init__(self, total_epochs: int, steps_per_epoch: int, stream=None):
        self.total_epochs = total_epochs
        self.steps_per_epoch = steps_per_epoch
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty()
        self._epoch_seconds = []
        self._epoch_started = time.monotonic()

    def start_epoch(self) -> None:
        self._epoch_started = time.monotonic()

    def update(self, epoch: int, step_in_epoch: int, global_step: int, loss: float, images_per_second: float) -> None:
        """After each training loop call: a bar on a terminal; in logs, a line a minute (and every call at -v=1)."""
        logging.vlog(1, "step %d (epoch %d, %d/%d) loss %.4f", global_step, epoch + 1, step_in_epoch,
                     self.steps_per_epoch, loss)
        if not self.interactive:
            logging.log_every_n_seconds(
                logging.INFO, "epoch %d/%d  step %d/%d  loss %.4f  %s img/s", 60, epoch + 1, self.total_epochs,
                step_in_epoch, self.steps_per_epoch, loss, f"{images_per_second:,.0f}")
            return
        width = 30
        done = int(width * step_in_epoch / self.steps_per_epoch)
        bar = "=" * done + "." * (width - done)
        self.stream.write(f"\repoch {epoch + 1}/{self.total_epochs} [{bar}] {step_in_epoch}/{self.steps_per_epoch}"
                          f" loss {loss:.4f} {images_per_second:,.0f} img/s ")
        self.stream.flush()

    def end_epoch(self, epoch: int, metrics: dict, epochs_left: int) -> None:
        seconds = time.monotonic() - self._epoch_started
        self._epoch_seconds.append(seconds)
        if self.interactive:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()
        recent = self._epoch_seconds[-3:]
        eta = epochs_left * sum(recent) / len(recent)
        logging.info(
            "epoch %d/%d  loss %.4f  accuracy %.4f  eval_loss %.4f  eval_accuracy %.4f  %s img/s  "
            "%.1fs  ETA %s", epoch + 1, self.total_epochs, metrics["train_loss"], metrics["train_accuracy"],
            metrics["eval_loss"], metrics["eval_accuracy"], f"{metrics['images_per_second']:,.0f}", seconds,
            format_duration(eta))


class ImageProgress:
    """Images done of a total, with images/s and ETA: a bar on a terminal, else a log line every 10 s."""

    def __init__(self, total: int, verb: str, stream=None):
        self.total, self.verb, self.done = total, verb, 0
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.started = time.monotonic()

    def update(self, count: int) -> None:
        self.done += count
        seconds = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / seconds
        eta = format_duration((self.total - self.done) / max(rate, 1e-9))
        if self.interactive:
            width = 30
            bar = "=" * int(width * self.done / self.total)
            self.stream.write(f"\r{self.verb} [{bar:.<{width}}] {self.done:,}/{self.total:,} images  "
                              f"{rate:,.0f} img/s  ETA {eta} ")
            self.stream.flush()
        else:
            logging.log_every_n_seconds(logging.INFO, "%s %s/%s images  %s img/s  ETA %s", 10, self.verb,
                                        f"{self.done:,}", f"{self.total:,}", f"{rate:,.0f}", eta)

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\r" + " " * 90 + "\r")
            self.stream.flush()
        seconds = time.monotonic() - self.started
        logging.info("%s %s images in %.1fs (%s img/s).", self.verb, f"{self.done:,}", seconds,
                     f"{self.done / max(seconds, 1e-9):,.0f}")
