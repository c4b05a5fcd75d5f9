"""Classifies image files with a finished run's model: the top-k classes and their probabilities per file."""

import csv
import json
import os
import sys

from absl import flags
import numpy as np
from PIL import Image

from trainer import cli
from trainer import progress
from trainer import runs
# Moved to image_files, which folder datasets share; still importable from here.
from trainer.image_files import IMAGE_EXTENSIONS
from trainer.image_files import MAX_PIXELS  # noqa: F401
from trainer.image_files import ImageTooLarge
from trainer.image_files import load_image
from trainer.image_files import printable
from trainer.errors import UsageError
from trainer.errors import one_line

USAGE = """Classifies image files (PNG or JPEG, any size, colour or greyscale) with a finished run's model and
prints the top-k classes with their probabilities per file. Folders are searched recursively.

    python -m trainer.predict --model_dir=DIR PATH... [--top_k=3] [--output=table|csv|json]

Exit status: 0 when every file was classified, 1 when some could not be read (each named on stderr),
2 for bad flags.
"""
OUTPUTS = ("table", "csv", "json")
FLAGS = cli.flag_registry()
flags.DEFINE_string("model_dir", None, "Directory of a finished run of trainer.task (its --model_dir).",
                    flag_values=FLAGS)
flags.DEFINE_integer("top_k", 3, "How many of the most probable classes to show per image.", flag_values=FLAGS)
flags.DEFINE_enum("output", "table", OUTPUTS, "Output format on stdout.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Images per prediction batch.", flag_values=FLAGS)


def find_images(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files the paths name, folders searched recursively; and (path, reason) for paths that fail."""
    files, failures = [], []
    for path in paths:
        if os.path.isdir(path):
            # Regular files only: opening a FIFO or a device named *.png would wait forever.
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names
                           if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, name)))
            if not found:
                failures.append((path, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder"))
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)  # Named explicitly, so tried whatever its extension.
        elif os.path.exists(path):
            failures.append((path, "not a regular file"))
        else:
            failures.append((path, "no such file or directory"))
    return list(dict.fromkeys(files)), failures


class _Output:
    """Writes one row per classified file in the chosen format."""

    def __init__(self, kind: str, top_k: int, paths: list[str], class_names, stream=None):
        self.kind, self.top_k, self.stream = kind, top_k, stream or sys.stdout
        self.records = []
        self.path_width = max(len("file"), *(len(printable(path)) for path in paths))
        self.class_width = max(len(name) for name in class_names)
        if kind == "csv":
            self.csv = csv.writer(self.stream)
            self.csv.writerow(["path"] + [f"{field}_{rank}" for rank in range(1, top_k + 1)
                                          for field in ("class", "probability")])
        elif kind == "table":
            columns = [f"{f'top {rank}':<{self.class_width + 7}}" for rank in range(1, top_k + 1)]
            print(f"{'file':<{self.path_width}}  {'  '.join(columns).rstrip()}", file=self.stream)

    def row(self, path: str, predictions: list[tuple[str, float]]) -> None:
        path = printable(path)
        if self.kind == "json":
            self.records.append({"path": path, "predictions": [
                {"class": name, "probability": round(probability, 6)} for name, probability in predictions]})
        elif self.kind == "csv":
            self.csv.writerow([path] + [value for name, probability in predictions
                                        for value in (name, f"{probability:.6f}")])
        else:
            cells = [f"{name:<{self.class_width}} {probability:.4f}" for name, probability in predictions]
            print(f"{path:<{self.path_width}}  {'  '.join(cells)}", file=self.stream)
        self.stream.flush()

    def close(self) -> None:
        if self.kind == "json":
            json.dump(self.records, self.stream, indent=2)
            self.stream.write("\n")


def predict_files(classifier: runs.Classifier, files: list[str], *, top_k: int, batch_size: int,
                  output: _Output) -> list[tuple[str, str]]:
    """Classifies the files batch by batch and writes their rows; returns (path, reason) for unreadable ones."""
    failures = []
    meter = progress.ImageProgress(len(files), "classified") if len(files) > batch_size else None
    for start in range(0, len(files), batch_size):
        batch_paths, images = [], []
        for path in files[start:start + batch_size]:
            try:
                images.append(load_image(path, classifier.image_shape))
                batch_paths.append(path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                failures.append((path, _reason(error)))
                print(f"error: {printable(path)}: {failures[-1][1]}", file=sys.stderr)
        if images:
            probabilities = classifier.probabilities(np.stack(images))
            for path, row in zip(batch_paths, probabilities):
                best = np.argsort(-row, kind="stable")[:top_k]
                output.row(path, [(classifier.class_names[index], float(row[index])) for index in best])
        if meter:
            meter.update(len(files[start:start + batch_size]))
    if meter:
        meter.close()
    return failures


def _reason(error: Exception) -> str:
    if isinstance(error, ImageTooLarge):
        return str(error)
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image file Pillow can read (PNG or JPEG expected)"
    return f"cannot decode the image ({one_line(error, 200)})"


def main(argv: list[str]) -> int:
    paths = argv[1:]
    if not paths:
        raise UsageError("give one or more image files or folders to classify, e.g. "
                         "python -m trainer.predict --model_dir=runs/cnn photos/")
    if not FLAGS.model_dir:
        raise UsageError("--model_dir is required: the directory of a finished run of trainer.task.")
    if FLAGS.top_k < 1:
        raise UsageError(f"--top_k={FLAGS.top_k} must be at least 1.")
    if FLAGS.batch_size < 1:
        raise UsageError(f"--batch_size={FLAGS.batch_size} must be a positive integer.")
    classifier = runs.load_classifier(runs.local_run_dir(FLAGS.model_dir))
    if FLAGS.top_k > len(classifier.class_names):
        raise UsageError(f"--top_k={FLAGS.top_k} is more than the model's {len(classifier.class_names)} classes.")
    files, failures = find_images(paths)
    for path, reason in failures:
        print(f"error: {printable(path)}: {reason}", file=sys.stderr)
    if files:
        output = _Output(FLAGS.output, FLAGS.top_k, files, classifier.class_names)
        failures += predict_files(classifier, files, top_k=FLAGS.top_k, batch_size=FLAGS.batch_size, output=output)
        output.close()
    return 1 if failures else 0


if __name__ == "__main__":
    cli.start(main, FLAGS, USAGE)
