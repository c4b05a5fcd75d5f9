"""The charts runs write: whole epochs on their axes."""

import pytest

from trainer.results import reports


@pytest.mark.parametrize("epochs", [1, 2, 7])
def test_the_history_chart_ticks_whole_epochs_only(tmp_path, monkeypatch, epochs):
    ticks = []
    save_png = reports._save_png

    def save_and_read_ticks(figure, path):
        figure.canvas.draw()
        for axes in figure.axes:
            low, high = axes.get_xlim()
            ticks.append([tick for tick in axes.get_xticks() if low <= tick <= high])
        save_png(figure, path)

    monkeypatch.setattr(reports, "_save_png", save_and_read_ticks)
    history = [{"epoch": epoch, "train_accuracy": 0.1 * epoch, "eval_accuracy": 0.1, "train_loss": 2.0 / epoch,
                "eval_loss": 2.0} for epoch in range(1, epochs + 1)]
    reports.plot_history(str(tmp_path / "history.png"), history, "cnn on cifar10")
    assert (tmp_path / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(ticks) == 2 and all(axes_ticks and all(tick == int(tick) for tick in axes_ticks) for axes_ticks in ticks)
    assert all(min(axes_ticks) <= 1 and max(axes_ticks) >= epochs for axes_ticks in ticks)
