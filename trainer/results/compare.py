"""Compares finished runs: a Markdown report with their results side by side and overlaid training curves."""

import dataclasses
import numbers
import os
import posixpath
import re

from absl import flags
from absl import logging
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from trainer import cli
from trainer.training import gcs
from trainer.results import runs
from trainer.training import progress
from trainer.results import reports
from trainer.training import storage
from trainer.errors import Failure
from trainer.errors import UsageError
from trainer.errors import one_line

USAGE = """Compares finished runs of trainer.task: writes a Markdown report (README.md) with a table of their
results and PNG charts of their accuracy and loss per epoch, overlaid, into --output.

    python -m trainer.compare runs/cnn runs/resnet50 --output=reports/cnn-vs-resnet50

It replaces only its own reports: a folder holding a README.md or chart it did not write is refused.
Exit status: 0 done; 1 when the report could not be written (its table is printed first); 2 for bad flags,
such a folder, or a run without a sound metrics.json.
"""
REPORT_FILE = "README.md"
CHART_FILES = ("accuracy.png", "loss.png", "train_loss_steps.png")
# The report's first line, invisible once rendered: it tells compare that a README.md is its own to replace.
REPORT_MARKER = "<!-- Written by trainer.compare, which replaces this file and its charts when run again. -->"
# Reports written before the marker existed began with their title.
OLD_REPORT_TITLE = re.compile(r"# Comparison of \d+ runs\n")
# metrics.json fields the report reads, with the JSON types each may hold (None: may be absent or null).
NUMBER, TEXT, OBJECT, LIST = (numbers.Real,), (str,), (dict,), (list,)
METRICS_FIELDS = {"test_accuracy": NUMBER, "test_loss": NUMBER, "epochs_completed": NUMBER,
                  "best_epoch": NUMBER + (type(None),), "flags": OBJECT + (type(None),),
                  "dataset": TEXT + (type(None),), "eval_split": TEXT + (type(None),),
                  "train_seconds": NUMBER + (type(None),), "train_images_per_second": NUMBER + (type(None),),
                  "num_parameters": NUMBER + (type(None),), "history": LIST + (type(None),)}
JSON_TYPE_NAMES = {bool: "true/false", int: "a number", float: "a number", str: "a string", dict: "an object",
                   list: "a list", type(None): "null"}
# Flags that say where a run lived rather than what it computed.
LOCATION_FLAGS = ("model_dir", "data_dir")
# Per-epoch TensorBoard tags of trainer.task: (log, tag) for each curve.
EPOCH_TAGS = {"train_accuracy": ("train", "accuracy"), "train_loss": ("train", "epoch_loss"),
              "eval_accuracy": ("eval", "accuracy"), "eval_loss": ("eval", "loss")}

FLAGS = cli.flag_registry()
flags.DEFINE_string("output", None, "Directory to write the report (README.md and PNG charts) into.",
                    flag_values=FLAGS)


@dataclasses.dataclass(frozen=True)
class Run:
    """What the report needs of one finished run."""

    name: str
    directory: str
    metrics: dict
    epoch_curves: dict[str, list[tuple[float, float]]]
    step_losses: list[tuple[float, float]]
    wall_seconds: float | None


def read_scalars(log_dir: str) -> tuple[dict[str, list[tuple[int, float]]], list[float]]:
    """{tag: [(step, value)]} of the scalars tf.summary wrote (as tensors) in log_dir, and the events' wall times.

    A step written twice (a run resumed from an earlier checkpoint) keeps its last value.
    """
    if not os.path.isdir(log_dir):
        return {}, []
    accumulator = event_accumulator.EventAccumulator(log_dir, size_guidance={event_accumulator.TENSORS: 0})
    try:
        accumulator.Reload()
    except Exception as error:  # TensorBoard reports damaged event files with many types.
        raise UsageError(f"cannot read the TensorBoard logs in {log_dir}: {one_line(error)}") from error
    scalars, wall_times = {}, []
    for tag in accumulator.Tags()["tensors"]:
        by_step = {}
        for event in accumulator.Tensors(tag):
            wall_times.append(event.wall_time)
            value = tensor_util.make_ndarray(event.tensor_proto)
            if value.ndim == 0 and value.dtype.kind == "f":
                by_step[event.step] = float(value)
        if by_step:
            scalars[tag] = sorted(by_step.items())
    return scalars, wall_times


def read_run(directory: str, name: str) -> Run:
    run_dir = runs.local_run_dir(directory)
    if gcs.is_gcs(directory):
        download_logs(directory, os.path.join(run_dir, "logs"))
    metrics = storage.read_json(os.path.join(run_dir, "metrics.json"))
    if metrics is None:
        raise UsageError(f"{directory} has no metrics.json; give the --model_dir of a finished run of trainer.task.")
    check_metrics(metrics, os.path.join(directory, "metrics.json"))
    logs = {kind: read_scalars(os.path.join(run_dir, "logs", kind)) for kind in ("train", "eval")}
    wall_times = logs["train"][1] + logs["eval"][1]
    curves, step_losses = _epoch_curves(metrics, {kind: scalars for kind, (scalars, _) in logs.items()})
    return Run(name, directory, metrics, curves, step_losses,
               max(wall_times) - min(wall_times) if wall_times else None)


def check_metrics(metrics: dict, path: str) -> None:
    """Refuses, naming the file and the field, a metrics.json whose fields the report reads have other types."""
    problems = [f'"{name}" is {_json_type(metrics[name]) if name in metrics else "missing"}'
                for name, types in METRICS_FIELDS.items()
                if (name in metrics or type(None) not in types) and not _holds(metrics.get(name), types)]
    history = metrics.get("history") or []
    if not problems and not all(isinstance(entry, dict) and all(_holds(entry.get(field), NUMBER)
                                                                for field in ("epoch", *EPOCH_TAGS))
                                for entry in history):
        problems.append('"history" has entries without a number for each of epoch, ' + ", ".join(EPOCH_TAGS))
    if problems:
        raise UsageError(f"{path} is not a metrics.json of trainer.task, or it is damaged: {'; '.join(problems)}.")


def _holds(value, types: tuple) -> bool:
    # JSON's true and false are Python bools, which are numbers to isinstance.
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _json_type(value) -> str:
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def download_logs(model_dir: str, local_logs: str) -> None:
    """Fetches a gs:// run's TensorBoard logs into local_logs; the download of the run leaves them out, as
    evaluate and predict do not need them."""
    from google.api_core import exceptions as api_exceptions

    remote_logs = storage.run_locations(model_dir)["logs"]
    if not gcs.split_uri(remote_logs)[1]:
        raise UsageError(f"{model_dir}: its TensorBoard logs are a whole bucket ({remote_logs}), which compare "
                         "does not download; copy the run to a local directory and compare that.")
    parent, logs_name = posixpath.split(remote_logs)
    try:
        gcs.Mirror([gcs.Root(os.path.dirname(local_logs), parent)]).download_tree(logs_name, local_logs)
    except (api_exceptions.GoogleAPIError, OSError) as error:
        raise UsageError(f"{model_dir}: cannot download its TensorBoard logs from {remote_logs} "
                         f"({one_line(error, 160)}).") from error


def _epoch_curves(metrics: dict, logs: dict) -> tuple[dict, list]:
    """Per-epoch curves from the TensorBoard logs (metrics.json's history when they are gone), and the
    per-step training loss with steps counted in epochs."""
    if not all(tag in logs[kind] for kind, tag in EPOCH_TAGS.values()):
        history = metrics.get("history") or []
        return {curve: [(entry["epoch"], entry[curve]) for entry in history] for curve in EPOCH_TAGS}, []
    # Epoch-end scalars are written once per epoch, at the epoch's last global step.
    epoch_ends = [step for step, _ in logs["train"]["accuracy"]]
    curves = {curve: [(epoch, value) for epoch, (_, value) in enumerate(logs[kind][tag], start=1)]
              for curve, (kind, tag) in EPOCH_TAGS.items()}
    steps_per_epoch = max(epoch_ends[0], 1)
    step_losses = [(step / steps_per_epoch, value) for step, value in logs["train"].get("loss", [])]
    return curves, step_losses


def run_names(directories: list[str]) -> list[str]:
    """Each run's folder name, or its whole path where folder names repeat."""
    names = [os.path.basename(os.path.abspath(directory)) for directory in directories]
    if len(set(names)) < len(names):
        names = [os.path.normpath(directory) for directory in directories]
    return names


def write_report(runs: list[Run], output: str) -> str:
    """Writes README.md and its charts into output; returns the Markdown.

    README.md goes first: it marks the folder as compare's, so that a rerun after a chart failed to write
    replaces what this run wrote instead of refusing it as the user's.
    """
    plots = []
    for metric, label in (("accuracy", "Accuracy"), ("loss", "Loss")):
        panels = {phase: {run.name: run.epoch_curves[f"{phase}_{metric}"] for run in runs}
                  for phase in ("train", "eval")}
        plots.append((f"{label} per epoch (train and eval)", f"{metric}.png",
                      dict(panels=panels, xlabel="epoch", ylabel=label, title=f"{label} per epoch")))
    # Worth a chart only when the runs logged more often than once per epoch.
    if any(len(run.step_losses) > len(run.epoch_curves["train_loss"]) for run in runs):
        plots.append(("Training loss at every logged step", "train_loss_steps.png",
                      dict(panels={"train": {run.name: run.step_losses for run in runs}}, xlabel="epoch",
                           ylabel="Loss", title="Training loss at every logged step")))
    markdown = markdown_report(runs, [(title, file_name) for title, file_name, _ in plots])
    with storage.replacing(os.path.join(output, REPORT_FILE), suffix=".md") as file:
        file.write(markdown)
    for _, file_name, arguments in plots:
        reports.plot_runs(os.path.join(output, file_name), **arguments)
    return markdown


def check_output(output: str) -> None:
    """Refuses an --output that is not a folder, or a folder whose report files compare did not write: it replaces
    only its own reports, so a README.md or chart of the user's (--output=. in a repository) is never lost."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"--output={output} is a file; give a folder for the report (new, or an earlier report's).")
    report = os.path.join(output, REPORT_FILE)
    if is_own_report(report):
        return
    foreign = [name for name in (REPORT_FILE, *CHART_FILES) if os.path.lexists(os.path.join(output, name))]
    if foreign:
        raise UsageError(f"--output={output} already holds {', '.join(foreign)}, which trainer.compare did not write "
                         "and will not replace; give a new folder, or the folder of an earlier report of compare.")


def is_own_report(path: str) -> bool:
    """Whether path is a README.md that compare wrote (it starts with its marker, or an older report's title)."""
    if not os.path.isfile(path) or os.path.islink(path):
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            start = file.read(len(REPORT_MARKER) + 1)
    except OSError:
        return False
    return start == REPORT_MARKER + "\n" or bool(OLD_REPORT_TITLE.match(start))


def markdown_report(runs: list[Run], charts: list[tuple[str, str]]) -> str:
    lines = [REPORT_MARKER, f"# Comparison of {len(runs)} runs", "", *results_table(runs), ""]
    evaluated_on = {(run.metrics.get("dataset"), run.metrics.get("eval_split")) for run in runs}
    if len(evaluated_on) == 1:
        dataset, split = evaluated_on.pop()
        lines.append(f"Test accuracy and loss on {dataset} `{split}`.")
    else:
        lines.append("**The runs were evaluated on different data** (see the table), so their test metrics are "
                     "not directly comparable.")
    lines += ["", "Train time counts training steps only; wall time runs from the first to the last TensorBoard "
              "event. Train img/s leaves out each compiled loop's first call (tracing), so it is `-` for a run too "
              "short to call a loop twice."]
    lines.append("")
    for title, file_name in charts:
        lines += [f"## {title}", "", f"![{title}]({file_name})", ""]
    differing = flag_differences(runs)
    if differing:
        lines += ["## Flags that differ", "", "| flag | " + " | ".join(run.name for run in runs) + " |",
                  "|---|" + "---|" * len(runs)]
        lines += [f"| `--{name}` | " + " | ".join("-" if value is None else f"`{value}`" for value in values) + " |"
                  for name, values in differing.items()]
        lines.append("")
    lines += ["## Runs", ""] + [f"- `{run.name}`: `{run.directory}`" for run in runs]
    return "\n".join(lines) + "\n"


def results_table(runs: list[Run]) -> list[str]:
    """The Markdown table of the runs' results, the best test accuracy in bold."""
    has_recipe = any((run.metrics.get("flags") or {}).get("recipe") for run in runs)
    mixed_data = len({(run.metrics.get("dataset"), run.metrics.get("eval_split")) for run in runs}) > 1
    best = max(run.metrics["test_accuracy"] for run in runs)
    header = ["run", "model"] + ["recipe"] * has_recipe + ["evaluated on"] * mixed_data + [
        "test accuracy", "test loss", "epochs", "train time", "wall time", "train img/s", "parameters"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---|" * (has_recipe + mixed_data) + "---:|" * 7]
    for run in runs:
        metrics, run_flags = run.metrics, run.metrics.get("flags") or {}
        accuracy = f"{metrics['test_accuracy']:.4f}"
        epochs = f"{metrics['epochs_completed']}"
        if metrics.get("best_epoch") and metrics["best_epoch"] != metrics["epochs_completed"]:
            epochs += f" (best {metrics['best_epoch']})"
        cells = [run.name, str(run_flags.get("model", "-"))]
        cells += [str(run_flags.get("recipe") or "-")] * has_recipe
        cells += [f"{metrics.get('dataset')} `{metrics.get('eval_split')}`"] * mixed_data
        cells += [f"**{accuracy}**" if metrics["test_accuracy"] == best and len(runs) > 1 else accuracy,
                  f"{metrics['test_loss']:.4f}", epochs, _duration(metrics.get("train_seconds")),
                  _duration(run.wall_seconds), _count(metrics.get("train_images_per_second")),
                  _count(metrics.get("num_parameters"))]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def flag_differences(runs: list[Run]) -> dict[str, list]:
    """{flag: [value per run]} for the flags whose values differ between the runs."""
    all_flags = [run.metrics.get("flags") or {} for run in runs]
    names = sorted({name for run_flags in all_flags for name in run_flags} - set(LOCATION_FLAGS))
    return {name: [run_flags.get(name) for run_flags in all_flags] for name in names
            if len({repr(run_flags.get(name)) for run_flags in all_flags}) > 1}


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else progress.format_duration(seconds)


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def main(argv: list[str]) -> None:
    directories = argv[1:]
    if not directories:
        raise UsageError("give the directories of the finished runs to compare, e.g. "
                         "python -m trainer.compare runs/cnn runs/resnet50 --output=reports/cnn-vs-resnet50")
    if not FLAGS.output:
        raise UsageError("--output is required: the directory to write the report into.")
    if len(set(map(os.path.normpath, directories))) < len(directories):
        raise UsageError(f"a run is named twice in {' '.join(directories)}; give each run once.")
    if FLAGS.output.startswith("gs://"):
        raise UsageError(f"--output={FLAGS.output}: writing reports to gs:// is not supported; give a local directory.")
    check_output(FLAGS.output)
    runs = [read_run(directory, name) for directory, name in zip(directories, run_names(directories))]
    # The table first: a report that cannot be written still leaves its results on the screen.
    print("\n".join(results_table(runs)), flush=True)
    try:
        os.makedirs(FLAGS.output, exist_ok=True)
        write_report(runs, FLAGS.output)
    except OSError as error:
        # A failed move names the file it would have replaced; a failed creation, only a temporary file.
        where = f"{error.filename2}: " if error.filename2 else ""
        raise Failure(f"the report could not be written to {FLAGS.output} ({where}{error.strerror or error}); "
                      "the table above is its summary.") from error
    logging.info("Wrote the report to %s.", os.path.join(FLAGS.output, REPORT_FILE))

