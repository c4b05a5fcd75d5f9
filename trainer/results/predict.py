"""Classifies image files with a finished run's model: the top-k classes and their probabilities per file."""

import csv
import json
import os
import signal
import sys
import tempfile

from absl import flags
import numpy as np
from PIL import Image

from trainer import cli
from trainer.training import progress
from trainer.results import runs
from trainer import image_files
from trainer.training import storage
from trainer.display_text import printable
from trainer.display_text import utf8
from trainer.image_files import IMAGE_EXTENSIONS
from trainer.image_files import ImageTooLarge
from trainer.image_files import load_image
from trainer.errors import UsageError
from trainer.errors import one_line

USAGE = """Classifies image files (PNG, JPEG, GIF, BMP, WebP or TIFF; any size, colour or greyscale) with a
finished run's model and prints the top-k classes with their probabilities per file. Folders are searched recursively.

    python -m trainer.predict --model_dir=DIR PATH... [--top_k=3] [--output=table|csv|json] [--output_file=FILE]

Exit status: 0 when every file was classified, 1 when some could not be read (each named on stderr),
2 for bad flags, 130 when interrupted (Ctrl-C): --output_file then keeps its old contents and what was
classified goes to FILE.partial.
"""
OUTPUTS = ("table", "csv", "json")
# A spreadsheet reads a cell starting with these as a formula (CSV injection); OWASP's advice is a leading apostrophe.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
PARTIAL_SUFFIX = ".partial"

FLAGS = cli.flag_registry()
flags.DEFINE_string("model_dir", None, "Directory of a finished run of trainer.task (its --model_dir).",
                    flag_values=FLAGS)
flags.DEFINE_integer("top_k", 3, "How many of the most probable classes to show per image.", flag_values=FLAGS)
flags.DEFINE_enum("output", "table", OUTPUTS, "Output format on stdout.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "Images per prediction batch.", flag_values=FLAGS)
flags.DEFINE_string("output_file", None, "Write the output to this file instead of stdout. It is replaced only by "
                    "complete results; when interrupted, it keeps its old contents and what was classified goes to "
                    "FILE.partial.", flag_values=FLAGS)


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


def spreadsheet_safe(cell: str) -> str:
    """A CSV cell no spreadsheet runs as a formula: one starting with =, +, -, @, tab or CR gets an apostrophe."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


class _Output:
    """Writes one row per classified file in the chosen format: JSON keeps names exactly (it escapes control
    characters itself); the table and CSV show them escaped (`printable`), CSV also formula-safe."""

    def __init__(self, kind: str, top_k: int, paths: list[str], class_names, stream=None):
        self.kind, self.top_k, self.stream = kind, top_k, stream or sys.stdout
        self.records, self.count = [], 0
        self.path_width = max(len("file"), *(len(printable(path)) for path in paths))
        self.class_width = max(len(printable(name)) for name in class_names)
        if kind == "csv":
            self.csv = csv.writer(self.stream)
            self.csv.writerow(["path"] + [f"{field}_{rank}" for rank in range(1, top_k + 1)
                                          for field in ("class", "probability")])
        elif kind == "table":
            columns = [f"{f'top {rank}':<{self.class_width + 7}}" for rank in range(1, top_k + 1)]
            print(f"{'file':<{self.path_width}}  {'  '.join(columns).rstrip()}", file=self.stream)

    def row(self, path: str, predictions: list[tuple[str, float]]) -> None:
        if self.kind == "json":
            self.records.append({"path": utf8(path), "predictions": [
                {"class": name, "probability": round(probability, 6)} for name, probability in predictions]})
        elif self.kind == "csv":
            self.csv.writerow([spreadsheet_safe(printable(path))] + [
                value for name, probability in predictions
                for value in (spreadsheet_safe(printable(name)), f"{probability:.6f}")])
        else:
            cells = [f"{printable(name):<{self.class_width}} {probability:.4f}" for name, probability in predictions]
            print(f"{printable(path):<{self.path_width}}  {'  '.join(cells)}", file=self.stream)
        self.count += 1
        self.stream.flush()

    def close(self, partial_note: str | None = None) -> None:
        """Ends the output; JSON cut short is an object that says so, never a list that passes for all files."""
        if self.kind == "json":
            records = self.records if partial_note is None else {
                "partial": True, "note": partial_note, "predictions": self.records}
            json.dump(records, self.stream, indent=2)
            self.stream.write("\n")
        self.stream.flush()


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
                print(f"error: {printable(path)}: {printable(failures[-1][1])}", file=sys.stderr)
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
    if isinstance(error, (ImageTooLarge, image_files.UnsupportedFormat)):
        return str(error)
    if isinstance(error, Image.UnidentifiedImageError):
        return f"not an image file Pillow can read ({image_files.SUPPORTED_FORMATS_TEXT} expected)"
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
    if FLAGS.output_file:
        check_output_file(FLAGS.output_file)
    files, failures = find_images(paths)
    for path, reason in failures:
        print(f"error: {printable(path)}: {printable(reason)}", file=sys.stderr)
    if files:
        stream = open_output_file(FLAGS.output_file) if FLAGS.output_file else sys.stdout
        output = _Output(FLAGS.output, FLAGS.top_k, files, classifier.class_names, stream)
        try:
            failures += predict_files(classifier, files, top_k=FLAGS.top_k, batch_size=FLAGS.batch_size,
                                      output=output)
            output.close()
            if FLAGS.output_file:
                stream.close()
                storage.publish(stream.name, FLAGS.output_file)
        except KeyboardInterrupt:
            finish_interrupted(output, len(files), FLAGS.output_file)
        except BaseException:
            if FLAGS.output_file:
                _discard(stream)
            raise
    return 1 if failures else 0


def check_output_file(path: str) -> None:
    if os.path.isdir(path):
        raise UsageError(f"--output_file={path} is a folder; give the name of a file to write.")
    if not os.path.isdir(os.path.dirname(path) or "."):
        raise UsageError(f"--output_file={path}: {os.path.dirname(path)} is not a folder; create it first.")


def open_output_file(path: str):
    """A temporary file beside --output_file for the rows, so that the file itself is replaced only at the end."""
    try:
        return tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path) or ".", prefix=".tmp-", delete=False,
                                           newline="", encoding="utf-8")
    except OSError as error:
        raise UsageError(f"--output_file={path} cannot be written ({error.strerror}); give a file in a folder "
                         "you can write to.") from error


def finish_interrupted(output: _Output, total: int, output_file: str | None) -> None:
    """Keeps what was classified before Ctrl-C, marked as partial, and exits with status 130 in one line.

    --output_file keeps its old contents: the partial rows go to FILE.partial, so the file itself only ever
    holds complete results.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # A second Ctrl-C must not cut the partial results short.
    note = f"interrupted after classifying {output.count:,} of {total:,} files"
    output.close(partial_note=f"{note}: these are their results only.")
    if not output_file:
        where = "the output above holds those only"
    elif output.count:
        output.stream.close()
        storage.publish(output.stream.name, output_file + PARTIAL_SUFFIX)
        where = f"their results are in {output_file + PARTIAL_SUFFIX}; {output_file} is left as it was"
    else:
        _discard(output.stream)
        where = f"{output_file} is left as it was"
    print(f"error: {note}; {where}.", file=sys.stderr)
    sys.exit(cli.INTERRUPTED_EXIT_CODE)


def _discard(stream) -> None:
    stream.close()
    try:
        os.remove(stream.name)
    except OSError:
        pass

