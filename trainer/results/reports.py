"""What a finished run reports: metrics.json, the notebook's accuracy and loss charts, and the results tools' charts."""

import matplotlib
import numpy as np

matplotlib.use("Agg")  # Training machines have no display.
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from trainer.training import storage  # noqa: E402


class Throughput:
    """Training images per second over a session, leaving out each compiled loop's first call, which includes
    tracing and XLA compilation, unless the session made no other call (then the rate with tracing is all there is).
    """

    def __init__(self):
        self.timed_images, self.timed_seconds = 0, 0.0
        self.all_images, self.all_seconds = 0, 0.0

    def add(self, images: int, seconds: float, includes_tracing: bool) -> None:
        self.all_images, self.all_seconds = self.all_images + images, self.all_seconds + seconds
        if not includes_tracing:
            self.timed_images, self.timed_seconds = self.timed_images + images, self.timed_seconds + seconds

    @property
    def images_per_second(self) -> float | None:
        if self.timed_seconds:
            return self.timed_images / self.timed_seconds
        return self.all_images / self.all_seconds if self.all_seconds else None


def run_metrics(config, steps, state, final: dict, *, fingerprint: str, throughput: Throughput,
                session_seconds: float) -> dict:
    """metrics.json's record of a finished run (a steps.Steps and its checkpoints.TrainingState)."""
    history = state.history
    return {
        "test_accuracy": final["eval_accuracy"], "test_loss": final["eval_loss"],
        "eval_split": config.eval_split, "epochs_completed": len(history),
        "best_epoch": int(state.best_epoch.numpy()) if config.early_stopping_patience else len(history),
        "train_images_per_second": throughput.images_per_second or _epochs_images_per_second(history),
        "train_seconds": float(state.train_seconds.numpy()), "session_seconds": session_seconds,
        "history": history, "class_names": list(steps.info.class_names), "dataset": steps.info.name,
        "num_parameters": int(steps.model.count_params()), "precision": steps.precision,
        "strategy": type(steps.strategy).__name__, "num_replicas": steps.num_replicas,
        "flags": config.to_dict(), "weights_fingerprint": fingerprint,
        "class_weights": steps.loop.class_weights_record,
        # The checkpoint these outputs come from: a rerun compares it with the newest checkpoint.
        "checkpoint_step": int(state.global_step.numpy()),
        "phases": [{"name": phase.name, "epochs": [phase.first_epoch + 1, phase.end_epoch],
                    "trainable_variables": len(phase.variables),
                    "trainable_parameters": int(sum(np.prod(variable.shape) for variable in phase.variables))}
                   for phase in steps.phases],
    }


def _epochs_images_per_second(history: list[dict]) -> float | None:
    """The epochs' own rates, for a session that trained no step (it only completed the outputs); the first epoch
    includes tracing, so it counts only when it is the only one."""
    rates = [entry["images_per_second"] for entry in history if entry.get("images_per_second")]
    rates = rates[1:] if len(rates) > 1 else rates
    return float(np.mean(rates)) if rates else None


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
        axes.xaxis.set_major_locator(_whole_numbers())
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.set_title(label)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    _save_png(figure, path)


def plot_confusion_matrix(path: str, confusion, class_names, title: str) -> None:
    """A heat map of the confusion matrix: colour is the share of the true class, text the count."""
    confusion = np.asarray(confusion)
    num_classes = len(class_names)
    support = confusion.sum(axis=1, keepdims=True)
    shares = confusion / np.maximum(support, 1)
    side = min(4 + 0.6 * num_classes, 24)
    figure, axes = plt.subplots(figsize=(side + 1.5, side))
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    colorbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    colorbar.set_label("share of the true class")
    # Beyond ~30 classes the counts no longer fit in their cells; the colours still tell the story.
    if num_classes <= 30:
        font_size = 9 if num_classes <= 12 else 7
        for true, predicted in np.ndindex(confusion.shape):
            axes.text(predicted, true, f"{confusion[true, predicted]:,}", ha="center", va="center",
                      fontsize=font_size, color="white" if shares[true, predicted] > 0.5 else "black")
    label_size = 9 if num_classes <= 30 else 6
    axes.set_xticks(range(num_classes), class_names, rotation=45, ha="right", fontsize=label_size)
    axes.set_yticks(range(num_classes), [f"{name} ({int(count):,})" for name, count in zip(class_names, support[:, 0])],
                    fontsize=label_size)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class (examples)")
    axes.set_title(title)
    figure.tight_layout()
    _save_png(figure, path)


def plot_reliability_diagram(path: str, reliability: list[dict], expected_calibration_error: float,
                             title: str) -> None:
    """Accuracy against top-1 confidence per bin, with the diagonal of perfect calibration and each bin's gap to it,
    over a histogram of how many examples each bin holds."""
    figure, (accuracy_axes, count_axes) = plt.subplots(2, 1, figsize=(6.5, 7.5), sharex=True,
                                                       gridspec_kw={"height_ratios": [3, 1]})
    lowers = np.array([entry["lower"] for entry in reliability])
    widths = np.array([entry["upper"] - entry["lower"] for entry in reliability])
    filled = [index for index, entry in enumerate(reliability) if entry["examples"]]
    accuracies = np.array([reliability[index]["accuracy"] for index in filled])
    confidences = np.array([reliability[index]["confidence"] for index in filled])
    accuracy_axes.bar(lowers[filled], accuracies, widths[filled], align="edge", color="C0", edgecolor="white",
                      label="accuracy in the bin")
    accuracy_axes.bar(lowers[filled], confidences - accuracies, widths[filled], bottom=accuracies, align="edge",
                      color="C3", alpha=0.3, edgecolor="C3", hatch="//", label="gap to the mean confidence")
    accuracy_axes.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    accuracy_axes.set_xlim(0, 1)
    accuracy_axes.set_ylim(0, 1)
    accuracy_axes.set_ylabel("accuracy")
    accuracy_axes.set_title(f"{title}\nexpected calibration error {expected_calibration_error:.4f} "
                            f"({len(reliability)} equal-width bins)", fontsize=10)
    accuracy_axes.grid(alpha=0.3)
    accuracy_axes.legend(loc="upper left", fontsize=9)
    count_axes.bar(lowers, [entry["examples"] for entry in reliability], widths, align="edge", color="grey",
                   edgecolor="white")
    count_axes.set_xlabel("top-1 confidence")
    count_axes.set_ylabel("examples")
    count_axes.grid(alpha=0.3)
    figure.tight_layout()
    _save_png(figure, path)


def plot_runs(path: str, panels: dict[str, dict[str, list[tuple[float, float]]]], *, xlabel: str, ylabel: str,
              title: str) -> None:
    """Curves of several runs overlaid, one panel per entry of `panels` (e.g. train and eval).

    `panels` maps a panel title to {run name: [(x, y), ...]}; a run keeps its colour in every panel.
    """
    runs = list(dict.fromkeys(name for curves in panels.values() for name in curves))
    figure, all_axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 0.5, 4), squeeze=False,
                                    sharey=True)
    for axes, (panel, curves) in zip(all_axes[0], panels.items()):
        for name, points in curves.items():
            if points:
                xs, ys = zip(*points)
                axes.plot(xs, ys, "o-" if len(points) <= 30 else "-", markersize=4,
                          color=f"C{runs.index(name) % 10}", label=name)
        axes.xaxis.set_major_locator(_whole_numbers())
        axes.set_xlabel(xlabel)
        axes.set_title(panel)
        axes.grid(alpha=0.3)
        axes.legend()
    all_axes[0][0].set_ylabel(ylabel)
    figure.suptitle(title)
    figure.tight_layout()
    _save_png(figure, path)


def _whole_numbers() -> MaxNLocator:
    """Ticks at whole epochs (or steps) only: no tick at epoch 1.2. One tick is enough, or a one-epoch run's axis
    falls back to ticks at 0.96, 0.98, ..."""
    return MaxNLocator(integer=True, min_n_ticks=1)


def _save_png(figure, path: str) -> None:
    """Writes the figure atomically, so a reader never sees half a PNG and a failed write leaves no temporary file."""
    # The layout is done (tight_layout): with its engine still set, savefig would lay the figure out again in an
    # extra pass over every text, a sixth of drawing a confusion matrix.
    figure.set_layout_engine("none")
    try:
        with storage.replacing(path, "wb", ".png") as file:
            figure.savefig(file, dpi=100, format="png")
    finally:
        plt.close(figure)
