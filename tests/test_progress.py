"""Console progress: a bar on a terminal, a log line per epoch with an ETA from recent epochs."""

import io

from absl import logging

from trainer.training import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_that_fills_and_is_cleared_at_the_epoch_end(monkeypatch):
    lines = []
    monkeypatch.setattr(logging, "info", lambda message, *args: lines.append(message % args))
    terminal = Terminal()
    meter = progress.Progress(total_epochs=3, steps_per_epoch=10, stream=terminal)
    meter.start_epoch()
    meter.update(0, 5, 5, 1.25, 1234.0)
    assert terminal.getvalue().endswith("epoch 1/3 [===============...............] 5/10 loss 1.2500 1,234 img/s ")
    meter.update(0, 10, 10, 1.0, 1000.0)
    assert "[==============================] 10/10" in terminal.getvalue()
    meter.end_epoch(0, {"train_loss": 1.0, "train_accuracy": 0.5, "eval_loss": 1.1, "eval_accuracy": 0.45,
                        "images_per_second": 1000.0}, epochs_left=2)
    assert terminal.getvalue().endswith("\r")  # The bar is wiped before the epoch's log line.
    assert lines and "epoch 1/3  loss 1.0000  accuracy 0.5000" in lines[-1] and "ETA 0m00s" in lines[-1]


def test_the_eta_is_the_epochs_left_times_the_recent_epoch_time(monkeypatch):
    lines = []
    monkeypatch.setattr(logging, "info", lambda message, *args: lines.append(message % args))
    clock = iter([0.0, 0.0, 100.0, 100.0, 220.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    meter = progress.Progress(total_epochs=5, steps_per_epoch=10, stream=io.StringIO())
    metrics = {"train_loss": 1.0, "train_accuracy": 0.5, "eval_loss": 1.0, "eval_accuracy": 0.5,
               "images_per_second": 10.0}
    meter.start_epoch()
    meter.end_epoch(0, metrics, epochs_left=4)  # 100 s epoch.
    meter.start_epoch()
    meter.end_epoch(1, metrics, epochs_left=3)  # 120 s epoch: 3 x 110 s left.
    assert lines[-1].endswith("ETA 5m30s")
    assert not meter.interactive
