"""trainer.predict on image files of odd sizes and modes: valid top-k rows, folders, formats, and bad files."""

import csv
import io
import json
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from helpers import run_in_process, run_task
from trainer import predict


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
])
def test_bad_flags_are_one_error_line_and_exit_status_2(trained_run, capsys, argv, message):
    model_dir, _ = trained_run
    status, out, errors = run_predict(capsys, f"--model_dir={model_dir}", *argv)
    assert status == 2 and len(errors) == 1 and message in errors[0] and not out


def test_the_command_names_each_unreadable_path_and_exits_1(trained_run, photos, tmp_path):
    model_dir, _ = trained_run
    result = run_task(f"--model_dir={model_dir}", str(photos / "odd.png"), str(photos / "notes.txt"),
                      str(tmp_path / "missing.png"), module="trainer.predict")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert errors == [f"error: {tmp_path / 'missing.png'}: no such file or directory",
                      f"error: {photos / 'notes.txt'}: not an image file Pillow can read (PNG or JPEG expected)"]
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["file", str(photos / "odd.png")]
    assert "classified" not in result.stderr  # One batch: no progress to show.


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
