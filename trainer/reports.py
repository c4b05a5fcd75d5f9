"""What a finished run reports: metrics.json and the notebook's accuracy and loss charts."""

import os
import tempfile

import matplotlib

matplotlib.use("Agg")  # Training machines have no display.
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)

from trainer import storage  # noqa: E402


def write_metrics(path: str, metrics: dict) -> None:
    storage.write_json(path, metrics)


def plot_history(path: str, history: list[dict], title: str) -> None:
    """Train vs eval accuracy and loss per epoch, side by side, written atomically as a PNG."""
    epochs = [entry["epoch"] for entry in history]
    figure, (accuracy_axes, loss_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for axes, metric, label in ((accuracy_axes, "accuracy", "Accuracy"), (loss_axes, "loss", "Loss")):
        axes.plot(epochs, [entry[f"train_{metric}"] for entry in history], "o-", label="train")
        axes.plot(epochs, [entry[f"eval_{metric}"] for entry in history], "o-", label="eval")
        fine_tune = [entry["epoch"] for entry in history if entry.get("phase") == "fine_tune"]
        if fine_tune:
            axes.axvline(fine_tune[0] - 0.5, color="grey", linestyle=":", label="fine-tuning starts")
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.set_title(label)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    directory = os.path.dirname(path) or "."
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".tmp-", suffix=".png", delete=False) as file:
        figure.savefig(file, dpi=100, format="png")
    plt.close(figure)
    storage.publish(file.name, path)
