"""trainer.evaluate on a tiny trained run: metrics.json's accuracy, the checkpoint-only path, flip TTA,
calibration, its outputs."""

import io
import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from helpers import make_config, run_in_process, run_with_read_only, single_error_line
from trainer.results import evaluate
from trainer.training import train


@pytest.fixture(scope="module")
def trained_run(tiny_run):
    return tiny_run


def run_evaluate(capsys, *argv: str) -> tuple[int, str, str]:
    """The command line, in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(evaluate, *argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def export_predictions(model_dir, cifar_dir: str, split: str, flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels computed straight from TFDS and the SavedModel, as a user of the export would."""
    exported = tf.saved_model.load(str(model_dir / "export"))
    images, labels = map(np.stack, zip(*tfds.as_numpy(tfds.load("cifar10", split=split, data_dir=cifar_dir,
                                                                 as_supervised=True, shuffle_files=False))))
    probabilities = exported.serve(images).numpy()
    if flip:
        probabilities = (probabilities + exported.serve(images[:, :, ::-1]).numpy()) / 2
    return probabilities, labels


def test_command_line_reports_the_runs_test_accuracy_and_writes_its_files(trained_run, capsys):
    model_dir, metrics = trained_run
    status, out, _ = run_evaluate(capsys, f"--model_dir={model_dir}")
    assert status == 0
    results = json.loads((model_dir / "evaluation.json").read_text())
    assert results["split"] == metrics["eval_split"] == "test[:256]" and results["num_examples"] == 256
    assert results["accuracy"] == metrics["test_accuracy"]
    assert results["loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)
    assert results["accuracy"] <= results["top5_accuracy"] <= 1
    assert f"accuracy {metrics['test_accuracy']:.4f}  loss {metrics['test_loss']:.4f}" in out
    header, *table_rows = [line.split() for line in out.split("\n\n")[1].splitlines()]
    assert header == ["class", "examples", "accuracy", "precision", "recall", "f1"]
    assert [row[0] for row in table_rows] == metrics["class_names"]
    assert sum(int(row[1]) for row in table_rows) == 256
    confused = out.split("\n\n")[-1].splitlines()[1:]
    assert len(confused) == len(results["most_confused"]) == 10
    first = results["most_confused"][0]
    assert confused[0].split()[:4] == [first["true"], "->", first["predicted"], str(first["count"])]
    with Image.open(model_dir / "confusion_matrix.png") as image:
        assert image.format == "PNG" and min(image.size) >= 500
        image.verify()


def test_confusion_matrix_and_per_class_metrics_match_the_exports_predictions(trained_run, cifar_dir):
    model_dir, _ = trained_run
    results = evaluate.evaluate_run(str(model_dir))
    probabilities, labels = export_predictions(model_dir, cifar_dir, "test[:256]")
    predictions = probabilities.argmax(axis=1)
    confusion = np.array(results["confusion_matrix"])
    expected = np.zeros((10, 10), int)
    np.add.at(expected, (labels, predictions), 1)
    np.testing.assert_array_equal(confusion, expected)  # Rows are true classes, columns predictions.
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    assert results["top5_accuracy"] == pytest.approx(np.mean((top5 == labels[:, None]).any(axis=1)))
    for index, entry in enumerate(results["classes"]):
        assert entry["examples"] == np.sum(labels == index)
        assert entry["recall"] == entry["accuracy"] == pytest.approx(np.mean(predictions[labels == index] == index))
        if np.any(predictions == index):
            assert entry["precision"] == pytest.approx(np.mean(labels[predictions == index] == index))
        else:
            assert entry["precision"] is None
    off_diagonal = sorted((expected - np.diag(np.diag(expected))).ravel(), reverse=True)[:10]
    assert [pair["count"] for pair in results["most_confused"]] == [count for count in off_diagonal if count]
    for pair in results["most_confused"]:
        true, predicted = (results["class_names"].index(pair[key]) for key in ("true", "predicted"))
        assert true != predicted and expected[true, predicted] == pair["count"]


def test_expected_calibration_error_matches_a_hand_computed_case():
    # Top-1 confidences 0.95 and 0.95 (both right), 0.55 (wrong) and 0.5 (right): bin (14/15, 1] holds two at
    # accuracy 1 (gap 0.05 each), (8/15, 9/15] one at accuracy 0 (gap 0.55), (7/15, 8/15] one at accuracy 1 (gap 0.5).
    probabilities = np.array([[0.95, 0.05, 0.0], [0.05, 0.95, 0.0], [0.55, 0.45, 0.0], [0.2, 0.5, 0.3]])
    labels = np.array([0, 1, 1, 1])
    results = evaluate.calibration(probabilities, labels)
    assert results["expected_calibration_error"] == pytest.approx((2 * 0.05 + 0.55 + 0.5) / 4)
    assert results["calibration_method"] == "15 equal-width bins of the top-1 confidence"
    filled = {index: entry for index, entry in enumerate(results["reliability"]) if entry["examples"]}
    assert sorted(filled) == [7, 8, 14]
    assert (filled[14]["examples"], filled[14]["accuracy"], filled[14]["confidence"]) == (2, 1.0, pytest.approx(0.95))
    assert (filled[8]["accuracy"], filled[7]["accuracy"]) == (0.0, 1.0)
    # A confidence on a bin's upper edge belongs to that bin; a perfectly calibrated bin adds nothing.
    edge = evaluate.calibration(np.array([[2 / 3, 1 / 3], [2 / 3, 1 / 3], [2 / 3, 1 / 3]]), np.array([0, 0, 1]))
    assert edge["reliability"][9]["examples"] == 3 and edge["expected_calibration_error"] == pytest.approx(0)


def test_calibration_is_reported_drawn_and_in_tensorboard(trained_run, capsys):
    model_dir, metrics = trained_run
    status, out, _ = run_evaluate(capsys, f"--model_dir={model_dir}")
    assert status == 0
    results = json.loads((model_dir / "evaluation.json").read_text())
    probabilities, labels = export_predictions(model_dir, cifar_dir=metrics["flags"]["data_dir"], split="test[:256]")
    expected = evaluate.calibration(probabilities, labels)["expected_calibration_error"]
    assert results["expected_calibration_error"] == pytest.approx(expected, abs=1e-5)
    assert sum(entry["examples"] for entry in results["reliability"]) == 256 and len(results["reliability"]) == 15
    assert (f"expected calibration error {results['expected_calibration_error']:.4f} (15 equal-width bins of the "
            "top-1 confidence)") in out
    with Image.open(model_dir / "reliability_diagram.png") as image:
        assert image.format == "PNG" and min(image.size) >= 500
        image.verify()
    images = [(event.step, tf.make_ndarray(value.tensor))
              for path in (model_dir / "logs" / "evaluation").iterdir()
              for event in tf.compat.v1.train.summary_iterator(str(path)) for value in event.summary.value
              if value.tag == "reliability_diagram/test_256"]
    assert images, "no reliability diagram in logs/evaluation"
    step, (width, height, png) = images[-1]  # The image plugin's tensor: width, height, encoded images.
    assert step == metrics["checkpoint_step"]
    with Image.open(io.BytesIO(png)) as logged, Image.open(model_dir / "reliability_diagram.png") as drawn:
        assert (int(width), int(height)) == drawn.size
        np.testing.assert_array_equal(np.asarray(logged), np.asarray(drawn))  # Re-encoded, the same pixels.


def test_checkpoint_only_run_gives_the_same_results_as_its_export(tiny_shapes_dir, tmp_path):
    # Without flips (which would swap left and right) tiny_shapes is learnt perfectly within an epoch or two;
    # later epochs cannot beat that accuracy but keep lowering the loss, so the run ends on its best epoch's
    # weights, which the last checkpoint keeps beside the last epoch's.
    metrics = train.run(make_config(tiny_shapes_dir, tmp_path / "run", dataset="tiny_shapes", train_split="train",
                                    eval_split="test", batch_size=32, epochs=3, early_stopping_patience=3,
                                    learning_rate=0.003, random_flip=False, brightness=0.0))
    assert metrics["best_epoch"] < metrics["epochs_completed"], metrics["history"]
    assert metrics["history"][-1]["eval_loss"] < metrics["test_loss"] / 2, metrics["history"]
    shutil.rmtree(tmp_path / "run" / "export")
    results = evaluate.evaluate_run(str(tmp_path / "run"))
    assert results["source"].endswith("ckpt-21")  # 7 steps per epoch.
    assert results["accuracy"] == metrics["test_accuracy"]
    assert results["loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)
    assert results["top5_accuracy"] is None  # Three classes.


def test_flip_tta_averages_each_image_with_its_mirror(trained_run, cifar_dir):
    model_dir, metrics = trained_run
    results = evaluate.evaluate_run(str(model_dir), tta=True)
    probabilities, labels = export_predictions(model_dir, cifar_dir, "test[:256]", flip=True)
    assert results["tta"] is True
    assert results["accuracy"] == pytest.approx(np.mean(probabilities.argmax(axis=1) == labels))
    expected_loss = np.mean(-np.log(probabilities[np.arange(len(labels)), labels]))
    assert results["loss"] == pytest.approx(expected_loss, rel=1e-4)
    # Mirrored CIFAR images are different inputs, so averaging them must move the loss.
    assert results["loss"] != pytest.approx(metrics["test_loss"], rel=1e-4)
    recorded = json.loads((model_dir / "evaluation.json").read_text())
    assert (recorded["tta"], recorded["tta_by"], recorded["tta_translate"]) == (True, "evaluate", 0)


def test_a_run_trained_with_tta_is_not_flipped_again(translate_tta_run, capsys):
    """Its export averages flipped and shifted views itself; flipping its input as well would average other views
    (the mirrored shifts), so --tta must leave the run's own test metrics unchanged."""
    model_dir, metrics = translate_tta_run
    status, out, _ = run_evaluate(capsys, f"--model_dir={model_dir}", "--tta")
    assert status == 0
    results = json.loads((model_dir / "evaluation.json").read_text())
    assert (results["tta"], results["tta_by"], results["tta_translate"]) == (True, "model", 1)
    assert results["accuracy"] == metrics["test_accuracy"]
    # Flipping again moves this barely trained model's loss by about 5e-5 of itself; rounding, by 1e-7.
    assert results["loss"] == pytest.approx(metrics["test_loss"], rel=1e-5)
    assert out.splitlines()[0].startswith("cifar10 test[:256]: 256 images, flip + 1-pixel shifts TTA in the model  ")
    without_flag = evaluate.evaluate_run(str(model_dir))
    assert (without_flag["tta"], without_flag["tta_by"]) == (True, "model")
    assert without_flag["loss"] == results["loss"]


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]


def test_flip_tta_on_a_run_trained_without_flips_warns_in_one_line(trained_run, tmp_path, caplog):
    model_dir, _ = trained_run
    unflipped = tmp_path / "unflipped"
    shutil.copytree(model_dir, unflipped)
    config = json.loads((unflipped / "config.json").read_text())
    (unflipped / "config.json").write_text(json.dumps({**config, "random_flip": False}))
    evaluate.evaluate_run(str(model_dir), tta=True)
    evaluate.evaluate_run(str(unflipped))
    assert warnings_of(caplog) == []  # Flips seen in training, or no flips asked for.
    results = evaluate.evaluate_run(str(unflipped), tta=True)
    (warning,) = warnings_of(caplog)
    assert "\n" not in warning and warning.startswith("--tta: the run trained with --random_flip=false")
    assert (results["tta"], results["tta_by"]) == (True, "evaluate")  # Asked for, so still applied.


def test_split_and_dataset_flags_override_the_runs_own(trained_run):
    model_dir, metrics = trained_run
    results = evaluate.evaluate_run(str(model_dir), split="train[:300]")
    assert results["split"] == "train[:300]" and results["num_examples"] == 300
    assert results["dataset"] == metrics["dataset"] == "cifar10"


@pytest.mark.parametrize("argv, message", [
    (["--split=bogus"], "--split=bogus is not a split of cifar10"),
    (["--batch_size=0"], "--batch_size=0 must be a positive integer"),
    (["--model_dir=gs://no-such-bucket/run"], "error: gs://no-such-bucket/run: "),
    (["--model_dir=/no/such/run"], "/no/such/run is not a directory"),
    (["--epochs=3"], "Unknown command line flag 'epochs'"),
    ([], "--model_dir is required"),
])
def test_bad_input_is_one_error_line_and_exit_status_2(trained_run, capsys, argv, message):
    model_dir, _ = trained_run
    if not any(argument.startswith("--model_dir") for argument in argv) and argv:
        argv = [f"--model_dir={model_dir}", *argv]
    status, out, err = run_evaluate(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and not out


def test_a_run_of_another_dataset_is_refused(trained_run, tiny_shapes_dir, capsys):
    model_dir, _ = trained_run
    status, _, err = run_evaluate(capsys, f"--model_dir={model_dir}", "--dataset=tiny_shapes",
                                  f"--data_dir={tiny_shapes_dir}", "--split=test")
    assert status == 2 and "--dataset=tiny_shapes has 3 classes of (16, 16, 1) images" in err


def test_a_directory_without_a_model_is_refused(tmp_path, capsys):
    status, _, err = run_evaluate(capsys, f"--model_dir={tmp_path}", "--dataset=cifar10", "--split=test")
    assert status == 2 and "holds neither an export/ nor checkpoints/" in err


def files_in(folder) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_results_that_cannot_be_written_are_printed_then_one_line(trained_run, tmp_path, capsys):
    """evaluation.json a folder (which stops root too): the report is on stdout, one line names the file,
    exit status 1, and the run is left as it was, with no temporary file."""
    model_dir, metrics = trained_run
    run = tmp_path / "run"
    shutil.copytree(model_dir, run, ignore=shutil.ignore_patterns("evaluation.json", "confusion_matrix.png",
                                                                 "reliability_diagram.png", "evaluation"))
    (run / "evaluation.json").mkdir()
    before = files_in(run)
    status, out, err = run_evaluate(capsys, f"--model_dir={run}")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 1 and "Traceback" not in err
    assert errors == [f"error: the results could not be written to {run / 'evaluation.json'} (Is a directory); "
                      "the report above is complete."]
    assert f"accuracy {metrics['test_accuracy']:.4f}  loss {metrics['test_loss']:.4f}" in out
    assert "Most confused" in out
    assert files_in(run) == before and list((run / "evaluation.json").iterdir()) == []


def test_a_read_only_run_is_evaluated_and_says_where_results_could_not_go(trained_run, tmp_path):
    model_dir, metrics = trained_run
    run = tmp_path / "run"
    shutil.copytree(model_dir, run)
    before = files_in(run)
    result = run_with_read_only(run, f"--model_dir={run}", module="trainer.evaluate")
    assert result.returncode == 1, result.stderr[-2000:]
    assert single_error_line(result) == (f"error: the results could not be written to {run / 'evaluation.json'} "
                                         "(Read-only file system); the report above is complete.")
    assert f"accuracy {metrics['test_accuracy']:.4f}  loss {metrics['test_loss']:.4f}" in result.stdout
    assert files_in(run) == before
