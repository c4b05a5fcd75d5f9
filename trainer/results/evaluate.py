"""Evaluates a finished run on a TFDS split: overall, top-5 and per-class metrics, calibration, and the confusion
matrix."""

import json
import os
import re

from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from trainer import cli
from trainer import config as config_lib
from trainer.training import data
from trainer.training import progress
from trainer.results import reports
from trainer.results import runs
from trainer.training import storage
from trainer.training import summaries
from trainer.errors import Failure
from trainer.errors import UsageError
from trainer.errors import one_line

USAGE = """Evaluates a finished run on a TFDS split: accuracy, loss, top-5 accuracy, per-class precision and
recall, the most confused classes, the expected calibration error; writes evaluation.json,
confusion_matrix.png and reliability_diagram.png into the run, and the diagram into TensorBoard
(logs/evaluation).

Exit status: 0 done; 1 when the results could not be written into the run (the report is printed first);
2 for bad flags or a directory that is not a run.

    python -m trainer.evaluate --model_dir=DIR [--split=test] [--dataset=cifar10] [--data_dir=DIR] [--tta]
"""
EVALUATION_FILE = "evaluation.json"
CONFUSION_PLOT = "confusion_matrix.png"
RELIABILITY_PLOT = "reliability_diagram.png"
# TensorBoard run of evaluate's images: its own directory, since a new event file beside training's would stop
# TensorBoard reading training's.
EVALUATION_LOGS = os.path.join("logs", "evaluation")
CALIBRATION_BINS = 15
MOST_CONFUSED = 10
TOP_K_ACCURACY = 5
# Probabilities are clipped before the log, as Keras does for probability inputs, so one confident
# mistake cannot make the loss infinite.
EPSILON = 1e-7


# Evaluation.

def applied_tta(config: dict, requested: bool) -> dict:
    """The TTA the evaluation applies, as evaluation.json records it.

    A run trained with --tta has it inside its model (export and rebuilt checkpoint alike), so flipping here
    too would only add views the run never averaged (its shifted views, mirrored); --tta then changes nothing.
    """
    if config.get("tta"):
        if requested:
            logging.info("The model averages its own test-time views (the run trained with --tta); "
                         "--tta adds no flips.")
        return {"tta": True, "tta_by": "model", "tta_translate": config.get("tta_translate", 0)}
    if requested and config.get("random_flip") is False:
        logging.warning("--tta: the run trained with --random_flip=false, so mirror images are new to the model "
                        "and flip TTA can change its answers; evaluate without --tta to measure it as trained.")
    return {"tta": requested, "tta_by": "evaluate" if requested else None, "tta_translate": 0}


def describe_tta(results: dict) -> str:
    """'flip TTA', with the model's shifted views and where it ran; '' without TTA."""
    if not results["tta"]:
        return ""
    shifts = f" + {results['tta_translate']}-pixel shifts" if results.get("tta_translate") else ""
    return f"flip{shifts} TTA{' in the model' if results.get('tta_by') == 'model' else ''}"


def predict_split(classifier: runs.Classifier, builder, split: str, total: int, *, batch_size: int, tta: bool) -> tuple:
    """(probabilities [N, classes], labels [N]) of the `total` examples of the split, in order; with `tta`,
    averaged with the mirror images'."""
    batches = data.decoded_examples(builder, split).batch(batch_size).prefetch(data.AUTOTUNE)
    meter = progress.ImageProgress(total, "evaluated")
    probabilities, labels = [], []
    for images, batch_labels in batches:
        batch = classifier.probabilities(images)
        if tta:
            # Flip test-time augmentation: the model saw mirrored images in training, so both views count.
            batch = (batch + classifier.probabilities(tf.reverse(images, axis=[2]))) / 2
        probabilities.append(batch)
        labels.append(batch_labels.numpy())
        meter.update(len(batch))
    meter.close()
    return np.concatenate(probabilities), np.concatenate(labels)


def summarize(probabilities: np.ndarray, labels: np.ndarray, class_names) -> dict:
    """Overall, top-k and per-class metrics, the confusion matrix and the most confused pairs."""
    num_classes = len(class_names)
    predictions = probabilities.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    correct, support, predicted = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    true_probabilities = probabilities[np.arange(len(labels)), labels]
    summary = {
        "num_examples": int(len(labels)),
        "accuracy": float(correct.sum() / len(labels)),
        "loss": float(np.mean(-np.log(np.clip(true_probabilities, EPSILON, 1.0)))),
        "top5_accuracy": None,
    }
    if num_classes > TOP_K_ACCURACY:
        top = np.argsort(-probabilities, axis=1, kind="stable")[:, :TOP_K_ACCURACY]
        summary["top5_accuracy"] = float(np.mean((top == labels[:, None]).any(axis=1)))
    summary["classes"] = []
    for index, name in enumerate(class_names):
        recall = _ratio(correct[index], support[index])
        precision = _ratio(correct[index], predicted[index])
        f1 = None if precision is None or recall is None else 2 * correct[index] / (support[index] + predicted[index])
        summary["classes"].append({"name": name, "examples": int(support[index]), "predicted": int(predicted[index]),
                                   "accuracy": recall, "precision": precision, "recall": recall, "f1": f1})
    off_diagonal = confusion - np.diag(correct)
    pairs = sorted(((int(off_diagonal[true, guess]), true, guess) for true, guess in zip(*np.nonzero(off_diagonal))),
                   key=lambda pair: (-pair[0], pair[1], pair[2]))[:MOST_CONFUSED]
    summary["most_confused"] = [{"true": class_names[true], "predicted": class_names[guess], "count": count,
                                 "share_of_true": count / int(support[true])} for count, true, guess in pairs]
    summary["confusion_matrix"] = confusion.tolist()
    summary["class_names"] = list(class_names)
    summary.update(calibration(probabilities, labels))
    return summary


def calibration(probabilities: np.ndarray, labels: np.ndarray, num_bins: int = CALIBRATION_BINS) -> dict:
    """The expected calibration error of the top-1 confidence over `num_bins` equal-width bins of (0, 1], each
    bin (lower, upper]: the examples' share in each bin times |its accuracy - its mean confidence|, summed."""
    confidences = probabilities.max(axis=1).astype(np.float64)
    correct = probabilities.argmax(axis=1) == labels
    bins = np.clip(np.ceil(confidences * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    reliability, error = [], 0.0
    for index in range(num_bins):
        members = bins == index
        count = int(members.sum())
        accuracy = float(correct[members].mean()) if count else None
        confidence = float(confidences[members].mean()) if count else None
        if count:
            error += count / len(labels) * abs(accuracy - confidence)
        reliability.append({"lower": index / num_bins, "upper": (index + 1) / num_bins, "examples": count,
                            "accuracy": accuracy, "confidence": confidence})
    return {"expected_calibration_error": float(error),
            "calibration_method": f"{num_bins} equal-width bins of the top-1 confidence",
            "reliability": reliability}


def _ratio(numerator, denominator) -> float | None:
    return float(numerator / denominator) if denominator else None


def evaluate_run(model_dir: str, **options) -> dict:
    """Evaluates the run in model_dir; writes evaluation.json and confusion_matrix.png there; returns the results.

    The options are measure_run's.
    """
    run_dir, results = measure_run(model_dir, **options)
    write_results(model_dir, run_dir, results)
    return results


def measure_run(model_dir: str, *, split: str | None = None, dataset: str | None = None,
                data_dir: str | None = None, tta: bool = False, batch_size: int = 256) -> tuple[str, dict]:
    """(the local run directory, the results) of evaluating the run in model_dir; writes nothing.

    dataset, split and data_dir default to the run's own (its config.json).
    """
    run_dir = runs.local_run_dir(model_dir)
    config = runs.read_run_config(run_dir)
    data_dir = data_dir or config.get("data_dir")
    classifier = runs.load_classifier(run_dir, data_dir)
    dataset = dataset or config.get("dataset")
    split = split or config.get("eval_split")
    if not dataset or not split:
        raise UsageError(f"{run_dir} has no config.json to take the dataset and split from; give --dataset and "
                         "--split.")
    builder = data.load_builder(dataset, data_dir, **data.folder_options(config))
    data.num_examples(builder, split, "--split")  # Checked here so that a bad split names --split.
    info = data.dataset_info(builder, split, split)
    if info.image_shape != classifier.image_shape or info.num_classes != len(classifier.class_names):
        raise UsageError(f"--dataset={dataset} has {info.num_classes} classes of {info.image_shape} images, but the "
                         f"model in {model_dir} takes {classifier.image_shape} images and knows "
                         f"{len(classifier.class_names)} classes; give the dataset it was trained on.")
    augmentation = applied_tta(config, tta)
    logging.info("Evaluating %s on %s %s (%s examples%s).", classifier.source, dataset, split,
                 f"{info.num_eval_examples:,}", f", {describe_tta(augmentation)}" if augmentation["tta"] else "")
    probabilities, labels = predict_split(classifier, builder, split, info.num_eval_examples, batch_size=batch_size,
                                         tta=augmentation["tta_by"] == "evaluate")
    results = {"model_dir": model_dir, "model": config.get("model"), "source": classifier.source, "dataset": dataset,
               "split": split, **augmentation, **summarize(probabilities, labels, info.class_names)}
    return run_dir, results


def write_results(model_dir: str, run_dir: str, results: dict) -> None:
    """Writes evaluation.json and confusion_matrix.png into the run, each atomically: a write that fails is one
    line naming the file (exit status 1) and leaves the file that was there, and no temporary file, behind."""
    title = (f"{results['model'] or 'model'} on {results['dataset']} {results['split']}"
             f"{f' ({describe_tta(results)})' if results['tta'] else ''}: accuracy {results['accuracy']:.4f}")
    writes = ((EVALUATION_FILE, lambda path: _write_json(path, results)),
              (CONFUSION_PLOT, lambda path: reports.plot_confusion_matrix(path, results["confusion_matrix"],
                                                                          results["class_names"], title)),
              (RELIABILITY_PLOT, lambda path: reports.plot_reliability_diagram(
                  path, results["reliability"], results["expected_calibration_error"], title)),
              (EVALUATION_LOGS, lambda path: _write_reliability_summary(path, run_dir, results)))
    for file_name, write in writes:
        try:
            write(os.path.join(run_dir, file_name))
        except OSError as error:
            raise Failure(f"the results could not be written to {os.path.join(model_dir, file_name)} "
                          f"({error.strerror or one_line(error)}); the report above is complete.") from error
    runs.save_back(model_dir)
    logging.info("Wrote %s, %s and %s into %s, and the reliability diagram into TensorBoard (%s).",
                 EVALUATION_FILE, CONFUSION_PLOT, RELIABILITY_PLOT, model_dir, EVALUATION_LOGS)


def _write_reliability_summary(log_dir: str, run_dir: str, results: dict) -> None:
    """The reliability diagram as a TensorBoard image at the run's final step, tagged by split."""
    with open(os.path.join(run_dir, RELIABILITY_PLOT), "rb") as file:
        png_bytes = file.read()
    step = (storage.read_json(os.path.join(run_dir, "metrics.json")) or {}).get("checkpoint_step", 0)
    tag = "reliability_diagram/" + re.sub(r"[^\w.-]+", "_", results["split"]).strip("_")
    summaries.write_png(log_dir, step, tag, png_bytes,
                        description=f"ECE {results['expected_calibration_error']:.4f} on {results['dataset']} "
                        f"{results['split']} ({results['calibration_method']}).")


def _write_json(path: str, results: dict) -> None:
    with storage.replacing(path, suffix=".json") as file:
        json.dump(results, file, indent=2, sort_keys=True)
        file.write("\n")


def format_results(results: dict) -> str:
    """The evaluation as a person reads it: overall metrics, a per-class table and the most confused pairs."""
    top5 = f"  top-5 accuracy {results['top5_accuracy']:.4f}" if results["top5_accuracy"] is not None else ""
    lines = [f"{results['dataset']} {results['split']}: {results['num_examples']:,} images"
             f"{f', {describe_tta(results)}' if results['tta'] else ''}  (model: {results['source']})",
             f"accuracy {results['accuracy']:.4f}  loss {results['loss']:.4f}{top5}",
             f"expected calibration error {results['expected_calibration_error']:.4f} "
             f"({results['calibration_method']})", ""]
    width = max(len("class"), *(len(entry["name"]) for entry in results["classes"]))
    lines.append(f"{'class':<{width}}  {'examples':>8}  {'accuracy':>8}  {'precision':>9}  {'recall':>6}  {'f1':>6}")
    for entry in results["classes"]:
        cells = [_cell(entry[key], size) for key, size in (("accuracy", 8), ("precision", 9), ("recall", 6),
                                                           ("f1", 6))]
        lines.append(f"{entry['name']:<{width}}  {entry['examples']:>8,}  {'  '.join(cells)}")
    lines += ["", "accuracy = recall: the share of each class's images classified as that class.", "",
              f"Most confused (true -> predicted, of {results['num_examples']:,} images):"]
    for pair in results["most_confused"]:
        lines.append(f"  {pair['true']:>{width}} -> {pair['predicted']:<{width}}  {pair['count']:>6,}  "
                     f"({pair['share_of_true']:.1%} of {pair['true']})")
    if not results["most_confused"]:
        lines.append("  none: every image was classified correctly.")
    return "\n".join(lines)


def _cell(value: float | None, size: int) -> str:
    return f"{'-' if value is None else f'{value:.3f}':>{size}}"


FLAGS = cli.flag_registry()
flags.DEFINE_string("model_dir", None, "Directory of a finished run of trainer.task (its --model_dir).",
                    flag_values=FLAGS)
flags.DEFINE_string("split", None, "TFDS split to evaluate, e.g. test or 'test[:1000]'. Default: the run's "
                    "--eval_split.", flag_values=FLAGS)
# The options a run also has are declared once, in Config: their help and checks, with evaluate's defaults.
config_lib.define_option_flag("dataset", FLAGS, None, "the run's")
config_lib.define_option_flag("data_dir", FLAGS, None, "the run's --data_dir, else TFDS's own or $TFDS_DATA_DIR")
config_lib.define_option_flag("tta", FLAGS, False, note="A run trained with --tta has its own TTA in the "
                              "model, which is used with or without this flag.")
# Larger than training's: a prediction batch holds no gradients.
config_lib.define_option_flag("batch_size", FLAGS, 256)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag (see --help).")
    if not FLAGS.model_dir:
        raise UsageError("--model_dir is required: the directory of a finished run of trainer.task.")
    config_lib.check_option("batch_size", FLAGS.batch_size)
    run_dir, results = measure_run(FLAGS.model_dir, split=FLAGS.split, dataset=FLAGS.dataset,
                                   data_dir=FLAGS.data_dir, tta=FLAGS.tta, batch_size=FLAGS.batch_size)
    # The report first: results that cannot be written are still on the screen.
    print(format_results(results), flush=True)
    write_results(FLAGS.model_dir, run_dir, results)

