"""trainer.predict on image files of odd sizes and modes: valid top-k rows, folders, formats, and bad files."""

import csv
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import ROOT, run_in_process, run_task
from trainer.results import predict


@pytest.fixture(scope="module")
def trained_run(tiny_run):
    model_dir, metrics = tiny_run
    return model_dir, metrics["class_names"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder tree of images of odd sizes and modes, one corrupt file, and a file that is no image."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    (root / "nested" / "deeper").mkdir(parents=True)
    random = np.random.default_rng(0)
    Image.fromarray(random.integers(0, 256, (47, 61, 3), np.uint8)).save(root / "odd.png")
    Image.fromarray(random.integers(0, 256, (300, 200, 3), np.uint8)).save(root / "nested" / "deeper" / "big.jpg")
    Image.fromarray(random.integers(0, 256, (20, 13), np.uint8)).save(root / "nested" / "grey.png")
    Image.fromarray(random.integers(0, 256, (33, 90, 4), np.uint8)).save(root / "nested" / "alpha.PNG")
    (root / "nested" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (root / "notes.txt").write_text("not an image")
    return root


GOOD = ["odd.png", "nested/deeper/big.jpg", "nested/grey.png", "nested/alpha.PNG"]


def run_predict(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """The command line, in this process: (exit status, stdout, the stderr lines that report errors)."""
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(predict, *argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return exit_info.value.code, captured.out, [line for line in captured.err.splitlines() if line.startswith("error:")]


def test_folders_are_searched_recursively_and_a_corrupt_file_fails_alone(trained_run, photos, capsys):
    model_dir, class_names = trained_run
    status, out, errors = run_predict(capsys, f"--model_dir={model_dir}", str(photos))
    assert status == 1
    assert len(errors) == 1 and errors[0].startswith(f"error: {photos / 'nested' / 'broken.jpg'}: cannot decode")
    header, *rows = out.splitlines()
    assert header.split() == ["file", "top", "1", "top", "2", "top", "3"]
    assert sorted(row.split()[0] for row in rows) == sorted(str(photos / name) for name in GOOD)
    for row in rows:
        cells = row.split()[1:]
        names, probabilities = cells[0::2], [float(value) for value in cells[1::2]]
        assert len(names) == 3 and set(names) <= set(class_names)
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0001


def test_json_rows_hold_whole_sorted_probability_distributions(trained_run, photos, capsys):
    model_dir, class_names = trained_run
    status, out, errors = run_predict(capsys, f"--model_dir={model_dir}", "--output=json", "--top_k=10",
                                      "--batch_size=3", *(str(photos / name) for name in GOOD))
    assert status == 0 and errors == []
    records = json.loads(out)
    assert [record["path"] for record in records] == [str(photos / name) for name in GOOD]
    for record in records:
        probabilities = [prediction["probability"] for prediction in record["predictions"]]
        assert sorted(prediction["class"] for prediction in record["predictions"]) == sorted(class_names)
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


def test_csv_matches_the_export_on_the_area_averaged_image(trained_run, tmp_path, capsys):
    """A 64x96 image shrinks to the model's 32x32 by averaging 2x3 blocks; greyscale repeats into RGB."""
    model_dir, _ = trained_run
    random = np.random.default_rng(1)
    colour = random.integers(0, 256, (64, 96, 3), np.uint8)
    grey = random.integers(0, 256, (64, 96), np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    status, out, _ = run_predict(capsys, f"--model_dir={model_dir}", "--output=csv", "--top_k=2", str(tmp_path))
    assert status == 0
    rows = {row["path"]: row for row in csv.DictReader(io.StringIO(out))}
    exported = tf.saved_model.load(str(model_dir / "export"))
    for name, pixels in (("colour.png", colour), ("grey.png", np.repeat(grey[..., None], 3, axis=-1))):
        shrunk = np.round(pixels.reshape(32, 2, 32, 3, 3).mean(axis=(1, 3))).astype(np.uint8)
        expected = exported.serve(shrunk[None]).numpy()[0]
        row = rows[str(tmp_path / name)]
        for rank in (1, 2):
            assert float(row[f"probability_{rank}"]) == pytest.approx(np.sort(expected)[-rank], abs=2e-3)
        assert row["class_1"] == exported_labels(model_dir)[int(np.argmax(expected))]


def exported_labels(model_dir) -> list[str]:
    return (model_dir / "export" / "assets.extra" / "labels.txt").read_text().split()


@pytest.mark.parametrize("argv, message", [
    (["--top_k=0", "x.png"], "--top_k=0 must be at least 1"),
    (["--top_k=11", "x.png"], "--top_k=11 is more than the model's 10 classes"),
    (["--output=xml", "x.png"], "flag --output=xml: value should be one of <table|csv|json>"),
    ([], "give one or more image files or folders"),
    (["--output_file=/", "x.png"], "--output_file=/ is a folder; give the name of a file to write."),
    (["--output_file=/no/such/folder/out.csv", "x.png"], "--output_file=/no/such/folder/out.csv: /no/such/folder "
                                                          "is not a folder; create it first."),
])
def test_bad_flags_are_one_error_line_and_exit_status_2(trained_run, capsys, argv, message):
    model_dir, _ = trained_run
    status, out, errors = run_predict(capsys, f"--model_dir={model_dir}", *argv)
    assert status == 2 and len(errors) == 1 and message in errors[0] and not out


def test_the_command_names_each_unreadable_path_and_exits_1(trained_run, photos, tmp_path, capsys, caplog):
    model_dir, _ = trained_run
    caplog.set_level(logging.INFO)
    status, out, errors = run_predict(capsys, f"--model_dir={model_dir}", str(photos / "odd.png"),
                                      str(photos / "notes.txt"), str(tmp_path / "missing.png"))
    assert status == 1
    assert errors == [f"error: {tmp_path / 'missing.png'}: no such file or directory",
                      f"error: {photos / 'notes.txt'}: not an image file Pillow can read (PNG, JPEG, GIF, BMP, WebP or "
                      "TIFF expected)"]
    assert [line.split()[0] for line in out.splitlines()] == ["file", str(photos / "odd.png")]
    assert "classified" not in caplog.text  # One batch: no progress to show.


def test_an_eps_file_is_refused_by_name_not_handed_to_ghostscript(trained_run, tmp_path, capsys):
    """Pillow reads an EPS file's header by itself, then needs Ghostscript (absent here) to draw it."""
    model_dir, _ = trained_run
    Image.new("RGB", (8, 8)).save(tmp_path / "drawing.eps", "EPS")
    status, out, errors = run_predict(capsys, f"--model_dir={model_dir}", str(tmp_path / "drawing.eps"))
    assert status == 1 and errors == [f"error: {tmp_path / 'drawing.eps'}: EPS images are not supported; use PNG, "
                                      "JPEG, GIF, BMP, WebP or TIFF"]


def test_more_files_than_a_batch_show_progress_on_stderr(trained_run, photos):
    """Outside a terminal the progress is log lines: the first batch at once, then one when all are done."""
    model_dir, _ = trained_run
    result = run_task(f"--model_dir={model_dir}", "--batch_size=1", "--output=csv",
                      *(str(photos / name) for name in GOOD), module="trainer.predict")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stdout.splitlines()) == 1 + len(GOOD)
    progress_lines = [line.split("] ", 1)[1] for line in result.stderr.splitlines() if "] classified " in line]
    assert len(progress_lines) >= 2, result.stderr[-2000:]  # More only if a batch took over 10 s.
    assert progress_lines[0].startswith("classified 1/4 images  ")
    for line in progress_lines[:-1]:
        assert re.fullmatch(r"classified [1-3]/4 images  [\d,]+ img/s  ETA \d+m\d\ds", line), line
    assert re.fullmatch(r"classified 4 images in \d+\.\ds \([\d,]+ img/s\)\.", progress_lines[-1])


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits_not_clipped(trained_run, tmp_path, capsys):
    model_dir, _ = trained_run
    deep = np.random.default_rng(2).integers(0, 65536, (32, 32), np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    Image.fromarray((deep >> 8).astype(np.uint8)).save(tmp_path / "shallow.png")
    status, out, _ = run_predict(capsys, f"--model_dir={model_dir}", "--output=json", "--top_k=10", str(tmp_path))
    assert status == 0
    deep_row, shallow_row = ({item["class"]: item["probability"] for item in record["predictions"]}
                             for record in json.loads(out))
    assert deep_row == pytest.approx(shallow_row, abs=1e-6)


def test_csv_cells_are_formula_safe_and_names_print_safely_on_a_terminal(trained_run, tmp_path, capsys,
                                                                          monkeypatch):
    """OWASP's CSV-injection advice: a cell starting with =, +, -, @, tab or CR gets a leading apostrophe. Control
    characters (an escape sequence that retitles the terminal, clears it, or moves the cursor) and bidirectional
    controls show as visible escapes in the table, the CSV and the error lines; JSON keeps names exactly."""
    model_dir, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(model_dir, run)
    labels = run / "export" / "assets.extra" / "labels.txt"
    names = labels.read_text().split()
    labels.write_text("\n".join(["=HYPERLINK(1)", "\x1b[31mred", *names[2:]]) + "\n")
    photos = tmp_path / "photos"
    photos.mkdir()
    monkeypatch.chdir(photos)
    hostile = ["=cmd|calc!A0.png", "+1.png", "-2.png", "@SUM(1).png", "\tTAB.png", "\x1b]0;pwned\x07.png",
               "\u202egnp.exe"]
    pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 3), np.uint8)
    for name in hostile:
        Image.fromarray(pixels).save(photos / name, format="PNG")
    (photos / "\x1b[2Jbroken.png").write_bytes(b"not an image")
    status, out, errors = run_predict(capsys, f"--model_dir={run}", "--output=csv", "--top_k=10", "--", *hostile,
                                      "\x1b[2Jbroken.png")
    assert status == 1 and errors == ["error: \\x1b[2Jbroken.png: not an image file Pillow can read (PNG, JPEG, "
                                      "GIF, BMP, WebP or TIFF expected)"]
    rows = list(csv.reader(io.StringIO(out)))[1:]
    assert [row[0] for row in rows] == ["'=cmd|calc!A0.png", "'+1.png", "'-2.png", "'@SUM(1).png", "\\x09TAB.png",
                                        "\\x1b]0;pwned\\x07.png", "\\u202egnp.exe"]
    classes = {cell for row in rows for cell in row[1::2]}
    assert {"'=HYPERLINK(1)", "\\x1b[31mred"} <= classes
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f\u202e]", out.replace("\r\n", "\n"))  # CSV's line ends only.
    status, out, _ = run_predict(capsys, f"--model_dir={run}", "--top_k=10", "--", *hostile)
    assert status == 0 and "\\x1b]0;pwned\\x07.png" in out and "\\x1b[31mred" in out
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f\u202e]", out)
    status, out, _ = run_predict(capsys, f"--model_dir={run}", "--output=json", "--", *hostile)
    assert status == 0 and [record["path"] for record in json.loads(out)] == hostile
    assert "\x1b" not in out  # JSON escapes it itself (\u001b).


MANY = 10_000


def interrupt_after_first_rows(model_dir, photos, folder, *flags: str) -> tuple[int, str, str]:
    """Runs predict on the photos with its stdout and stderr in files in `folder`, sends it SIGINT (Ctrl-C) once it
    has classified its first images; returns (exit status, stdout, stderr)."""
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    stdout, stderr = folder / "stdout", folder / "stderr"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "trainer.predict", f"--model_dir={model_dir}",
                                    "--batch_size=1", *flags, str(photos)], stdout=out, stderr=err,
                                   env=environment, cwd=str(ROOT))
        deadline = time.monotonic() + 120
        while "] classified " not in stderr.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=60)
    return status, stdout.read_text(), stderr.read_text()


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
    """10,000 small PNGs: at one per batch, predict takes about 20 s for them (4 s for 2,000 finished before a starved
    test process signalled it), far more than the moment before the signal."""
    root = tmp_path_factory.mktemp("many") / "many"
    root.mkdir()
    pixels = np.random.default_rng(4).integers(0, 256, (MANY, 8, 8, 3), np.uint8)
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(root / f"{index:05d}.png")
    return root


@pytest.mark.parametrize("kind", ["json", "csv"])
def test_ctrl_c_keeps_the_old_output_file_and_the_partial_results_beside_it(trained_run, many_photos, tmp_path,
                                                                           kind):
    model_dir, _ = trained_run
    output = tmp_path / f"predictions.{kind}"
    output.write_text("the results of an earlier run\n")
    status, _, log = interrupt_after_first_rows(model_dir, many_photos, tmp_path, f"--output={kind}",
                                                f"--output_file={output}")
    assert status == 130 and "Traceback" not in log, log[-2000:]
    assert output.read_text() == "the results of an earlier run\n"
    partial = output.with_name(output.name + ".partial")
    if kind == "json":
        record = json.loads(partial.read_text())
        assert record["partial"] is True
        paths = [row["path"] for row in record["predictions"]]
    else:
        header, *rows = list(csv.reader(io.StringIO(partial.read_text())))
        assert header[0] == "path"
        paths = [row[0] for row in rows]
    count = len(paths)
    assert 0 < count < MANY and paths == [str(many_photos / f"{index:05d}.png") for index in range(count)]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors == [f"error: interrupted after classifying {count:,} of {MANY:,} files; their results are in "
                      f"{partial}; {output} is left as it was."]
    if kind == "json":
        assert record["note"] == (f"interrupted after classifying {count:,} of {MANY:,} files: these are their "
                                  "results only.")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["stdout", "stderr", output.name,
                                                                       partial.name])


def test_ctrl_c_with_json_on_stdout_prints_the_partial_results_marked_so(trained_run, many_photos, tmp_path):
    model_dir, _ = trained_run
    status, out, err = interrupt_after_first_rows(model_dir, many_photos, tmp_path, "--output=json")
    assert status == 130 and "Traceback" not in err, err[-2000:]
    record = json.loads(out)
    count = len(record["predictions"])
    assert record["partial"] is True and 0 < count < MANY
    assert record["note"] == f"interrupted after classifying {count:,} of {MANY:,} files: these are their results only."
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: interrupted after classifying {count:,} of {MANY:,} files; the output above holds those only."]


def test_output_file_is_replaced_by_the_complete_results(trained_run, photos, tmp_path, capsys):
    model_dir, _ = trained_run
    output = tmp_path / "predictions.csv"
    output.write_text("old\n")
    status, out, errors = run_predict(capsys, f"--model_dir={model_dir}", "--output=csv", f"--output_file={output}",
                                      *(str(photos / name) for name in GOOD))
    assert status == 0 and errors == [] and out == ""
    rows = list(csv.DictReader(io.StringIO(output.read_text())))
    assert [row["path"] for row in rows] == [str(photos / name) for name in GOOD]
    assert [path.name for path in tmp_path.iterdir()] == ["predictions.csv"]
