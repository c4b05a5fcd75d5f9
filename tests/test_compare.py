"""trainer.compare on two tiny runs: the Markdown table, the charts it links, curves from TensorBoard, gs:// runs,
bad input."""

import json
import pathlib
import re
import shutil

import pytest
import tensorflow as tf
from PIL import Image

from helpers import make_config, run_in_process, run_with_read_only, single_error_line
from trainer.results import compare
from trainer.training import progress
from trainer.training import train


@pytest.fixture(scope="module")
def two_runs(cifar_dir, tmp_path_factory):
    """Two runs that differ in epochs and dropout: {name: (directory, metrics)}; "long" logs twice per epoch."""
    root = tmp_path_factory.mktemp("compare")
    runs = {}
    for name, overrides in (("long", dict(epochs=2, steps_per_loop=2)), ("short", dict(epochs=1, dropout=0.2))):
        runs[name] = root / name, train.run(make_config(cifar_dir, root / name, steps_per_epoch=4, **overrides))
    return runs


def run_compare(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """The command line, in this process: (exit status, stdout, the stderr lines that report errors)."""
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(compare, *argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return exit_info.value.code, captured.out, [line for line in captured.err.splitlines() if line.startswith("error:")]


def table_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The results table as {run: {column: cell}}."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    return {row["run"]: row for row in rows}


def logged_wall_seconds(directory) -> float:
    """Seconds from the first to the last summary the run logged in logs/train and logs/eval, read straight from
    the event files."""
    wall_times = [event.wall_time for log in ("train", "eval")
                  for path in pathlib.Path(directory, "logs", log).glob("events.out.tfevents.*")
                  for event in tf.compat.v1.train.summary_iterator(str(path)) if event.HasField("summary")]
    return max(wall_times) - min(wall_times)


def test_report_tables_both_runs_and_links_the_charts(two_runs, tmp_path, capsys):
    output = tmp_path / "report"
    status, out, errors = run_compare(capsys, *(str(directory) for directory, _ in two_runs.values()),
                                      f"--output={output}")
    assert status == 0 and errors == []
    markdown = (output / "README.md").read_text()
    rows = table_rows(markdown.split("\n## ")[0])
    assert set(rows) == {"long", "short"}
    for name, (_, metrics) in two_runs.items():
        assert rows[name]["test accuracy"].strip("*") == f"{metrics['test_accuracy']:.4f}"
        assert rows[name]["test loss"] == f"{metrics['test_loss']:.4f}"
        assert rows[name]["epochs"] == str(metrics["epochs_completed"])
        assert rows[name]["model"] == "cnn" and rows[name]["parameters"] == f"{metrics['num_parameters']:,}"
        assert rows[name]["train time"] == progress.format_duration(metrics["train_seconds"])
        assert rows[name]["train img/s"] == f"{metrics['train_images_per_second']:,.0f}"
        wall_seconds = logged_wall_seconds(two_runs[name][0])
        assert wall_seconds >= metrics["train_seconds"] > 0  # The logs span the whole run, training included.
        assert rows[name]["wall time"] == progress.format_duration(wall_seconds)
    assert table_rows(out) == rows  # The same table on stdout.
    charts = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    assert set(charts) == {"accuracy.png", "loss.png", "train_loss_steps.png"}
    for chart in charts:
        with Image.open(output / chart) as image:
            assert image.format == "PNG" and min(image.size) >= 400
            image.verify()
    differing = re.findall(r"^\| `--(\w+)` \| `([^`]*)` \| `([^`]*)` \|$", markdown, re.MULTILINE)
    assert ("epochs", "2", "1") in differing and ("dropout", "0.5", "0.2") in differing
    assert not any(name in ("model_dir", "data_dir") for name, *_ in differing)


def test_epoch_curves_come_from_the_tensorboard_logs_and_metrics_when_logs_are_gone(two_runs, tmp_path):
    directory, metrics = two_runs["long"]
    run = compare.read_run(str(directory), "long")
    for curve in compare.EPOCH_TAGS:
        expected = [(entry["epoch"], entry[curve]) for entry in metrics["history"]]
        assert run.epoch_curves[curve] == [(epoch, pytest.approx(value, rel=1e-6)) for epoch, value in expected]
    # A training-loss point per loop of 2 steps, 4 steps making an epoch.
    assert [epoch for epoch, _ in run.step_losses] == [0.5, 1.0, 1.5, 2.0]
    assert run.wall_seconds == pytest.approx(logged_wall_seconds(directory), abs=1e-3)
    shutil.copytree(directory, tmp_path / "long", ignore=shutil.ignore_patterns("logs"))
    without_logs = compare.read_run(str(tmp_path / "long"), "long")
    assert without_logs.epoch_curves["eval_accuracy"] == [(entry["epoch"], entry["eval_accuracy"])
                                                         for entry in metrics["history"]]
    assert without_logs.step_losses == [] and without_logs.wall_seconds is None


def test_a_directory_without_metrics_is_one_error_line(two_runs, tmp_path, capsys):
    directory, _ = two_runs["long"]
    status, out, errors = run_compare(capsys, str(directory), str(tmp_path), f"--output={tmp_path / 'report'}")
    assert status == 2 and errors == [f"error: {tmp_path} has no metrics.json; give the --model_dir of a finished "
                                      "run of trainer.task."]
    assert not out and not (tmp_path / "report").exists()
    status, _, errors = run_compare(capsys, str(directory))
    assert status == 2 and errors == ["error: --output is required: the directory to write the report into."]


def test_a_recipe_column_appears_when_a_run_has_one(two_runs, tmp_path):
    directory, metrics = two_runs["short"]
    shutil.copytree(directory, tmp_path / "recipe")
    (tmp_path / "recipe" / "metrics.json").write_text(json.dumps({**metrics, "flags": {**metrics["flags"],
                                                                                        "recipe": "notebook"}}))
    runs = [compare.read_run(str(two_runs["long"][0]), "long"), compare.read_run(str(tmp_path / "recipe"), "recipe")]
    rows = table_rows("\n".join(compare.results_table(runs)))
    assert rows["recipe"]["recipe"] == "notebook" and rows["long"]["recipe"] == "-"
    assert "recipe" not in table_rows("\n".join(compare.results_table(runs[:1])))["long"]


def upload_run(directory, bucket: str, prefix: str) -> str:
    """Copies a local run into the Cloud Storage emulator, as a job with a gs:// --model_dir leaves it."""
    from google.cloud import storage

    client_bucket = storage.Client().bucket(bucket)
    for path in pathlib.Path(directory).rglob("*"):
        if path.is_file():
            client_bucket.blob(f"{prefix}/{path.relative_to(directory).as_posix()}").upload_from_filename(str(path))
    return f"gs://{bucket}/{prefix}"


def test_gs_runs_are_compared_from_their_tensorboard_logs(two_runs, gcs_bucket, tmp_path, capsys):
    """The same report from the bucket as from the local runs: the wall times and the per-step loss chart come
    from the TensorBoard logs, which the download for evaluate and predict leaves out."""
    local = [str(directory) for directory, _ in two_runs.values()]
    remote = [upload_run(directory, gcs_bucket, f"compare/{name}") for name, directory in zip(two_runs, local)]
    reports = {}
    for label, directories in (("local", local), ("gcs", remote)):
        status, out, errors = run_compare(capsys, *directories, f"--output={tmp_path / label}")
        assert status == 0 and errors == []
        reports[label] = out, (tmp_path / label / "README.md").read_text()
    assert table_rows(reports["gcs"][0]) == table_rows(reports["local"][0])
    assert all(row["wall time"] != "-" for row in table_rows(reports["gcs"][0]).values())
    charts = [re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown) for _, markdown in reports.values()]
    assert charts[0] == charts[1] and "train_loss_steps.png" in charts[1]


def files_in(folder) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in pathlib.Path(folder).rglob("*")
            if path.is_file()}


def test_a_readme_compare_did_not_write_is_refused_and_kept(two_runs, tmp_path, capsys):
    """--output=. in a repository must not replace its README.md: compare replaces only its own reports."""
    runs = [str(directory) for directory, _ in two_runs.values()]
    output = tmp_path / "project"
    output.mkdir()
    (output / "README.md").write_text("# My project\n")
    (output / "notes.txt").write_text("mine")
    before = files_in(output)
    status, out, errors = run_compare(capsys, *runs, f"--output={output}")
    assert status == 2 and errors == [f"error: --output={output} already holds README.md, which trainer.compare did "
                                      "not write and will not replace; give a new folder, or the folder of an "
                                      "earlier report of compare."]
    assert not out and files_in(output) == before and sorted(path.name for path in output.iterdir()) == [
        "README.md", "notes.txt"]
    (output / "README.md").unlink()
    (output / "loss.png").write_bytes(b"my chart")  # A chart of the user's counts as theirs too.
    status, _, errors = run_compare(capsys, *runs, f"--output={output}")
    assert status == 2 and "already holds loss.png" in errors[0] and (output / "loss.png").read_bytes() == b"my chart"
    status, _, errors = run_compare(capsys, *runs, f"--output={output / 'notes.txt'}")
    assert status == 2 and errors == [f"error: --output={output / 'notes.txt'} is a file; give a folder for the "
                                      "report (new, or an earlier report's)."]


def test_an_earlier_report_of_compare_is_replaced(two_runs, tmp_path, capsys):
    runs = [str(directory) for directory, _ in two_runs.values()]
    output = tmp_path / "report"
    assert run_compare(capsys, *runs, f"--output={output}")[0] == 0
    assert (output / "README.md").read_text().startswith(compare.REPORT_MARKER + "\n# Comparison of 2 runs\n")
    status, out, errors = run_compare(capsys, runs[1], f"--output={output}")
    assert status == 0 and errors == [] and "# Comparison of 1 runs" in (output / "README.md").read_text()
    # A report written before the marker existed starts with its title.
    (output / "README.md").write_text("# Comparison of 2 runs\n\nold\n")
    assert run_compare(capsys, *runs, f"--output={output}")[0] == 0
    assert not [path for path in output.iterdir() if path.name.startswith(".tmp-")]


def test_a_report_that_cannot_be_written_is_one_line_after_the_table(two_runs, tmp_path, capsys):
    """The table is printed first; a write failure then names the folder, exit status 1, files left as they were."""
    runs = [str(directory) for directory, _ in two_runs.values()]
    output = tmp_path / "report"
    assert run_compare(capsys, *runs, f"--output={output}")[0] == 0
    (output / "loss.png").unlink()
    (output / "loss.png").mkdir()  # Where a chart must go, a folder: fails for root too.
    before = files_in(output)
    status, out, errors = run_compare(capsys, *runs, f"--output={output}")
    assert status == 1 and errors == [f"error: the report could not be written to {output} ({output / 'loss.png'}: "
                                      "Is a directory); the table above is its summary."]
    assert set(table_rows(out)) == {"long", "short"}
    after = files_in(output)
    assert after.keys() == before.keys() and after["README.md"] == before["README.md"]  # No temporary file left.


@pytest.mark.parametrize("how, reason", [("mount", "Read-only file system"), ("permissions", "Permission denied")])
def test_an_unwritable_output_folder_is_one_line_after_the_table(two_runs, tmp_path, how, reason):
    runs = [str(directory) for directory, _ in two_runs.values()]
    output = tmp_path / "read-only"
    output.mkdir()
    result = run_with_read_only(output, *runs, f"--output={output}", module="trainer.compare", how=how)
    assert result.returncode == 1, result.stderr[-2000:]
    assert single_error_line(result) == (f"error: the report could not be written to {output} ({reason}); the "
                                         "table above is its summary.")
    assert set(table_rows(result.stdout)) == {"long", "short"} and list(output.iterdir()) == []


@pytest.mark.parametrize("change, problem", [
    ({"flags": "oops"}, '"flags" is a string'),
    ({"test_accuracy": None}, '"test_accuracy" is null'),
    ({"epochs_completed": "2"}, '"epochs_completed" is a string'),
    ({"history": [{"epoch": 1}]}, '"history" has entries without a number for each of epoch, train_accuracy'),
])
def test_a_metrics_json_with_wrong_types_is_one_line_naming_it(two_runs, tmp_path, capsys, change, problem):
    directory, metrics = two_runs["short"]
    damaged = tmp_path / "damaged"
    shutil.copytree(directory, damaged, ignore=shutil.ignore_patterns("logs"))
    (damaged / "metrics.json").write_text(json.dumps({**metrics, **change}))
    status, out, errors = run_compare(capsys, str(two_runs["long"][0]), str(damaged), f"--output={tmp_path / 'r'}")
    assert status == 2 and len(errors) == 1 and not out and not (tmp_path / "r").exists()
    assert errors[0].startswith(f"error: {damaged / 'metrics.json'} is not a metrics.json of trainer.task, or it "
                                f"is damaged: {problem}")
