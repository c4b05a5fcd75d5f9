"""Run directories: created before training, left as they were found when a run cannot start, and never a folder
of the user's that is not a run."""

import errno
import os
import tempfile

import pytest

from helpers import fails_in_process
from trainer.training import storage
from trainer import task
from trainer.errors import UsageError


def test_a_failed_write_check_removes_every_directory_it_created(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(UsageError, match="is not writable"):
        storage.prepare_model_dir(storage.RunPaths.under(str(tmp_path / "new" / "run")))
    assert list(tmp_path.iterdir()) == []


def test_a_directory_that_cannot_be_made_takes_back_the_ones_made_before_it(tmp_path):
    (tmp_path / "a-file").write_text("keep me")
    paths = storage.RunPaths(model_dir=str(tmp_path / "new" / "run"), log_dir=str(tmp_path / "new" / "logs"),
                             checkpoint_dir=str(tmp_path / "a-file" / "checkpoints"), export_dir="unused")
    with pytest.raises(UsageError, match="is not writable"):
        storage.prepare_model_dir(paths)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]
    assert (tmp_path / "a-file").read_text() == "keep me"


def test_only_created_and_still_empty_directories_are_removed(tmp_path):
    (tmp_path / "mine").mkdir()
    created = storage.prepare_model_dir(storage.RunPaths.under(str(tmp_path / "mine" / "deep" / "run")))
    (tmp_path / "mine" / "deep" / "run" / "checkpoints" / "ckpt-1.index").write_text("saved")
    storage.remove_if_empty(created)
    assert (tmp_path / "mine" / "deep" / "run" / "checkpoints" / "ckpt-1.index").exists()
    assert not (tmp_path / "mine" / "deep" / "run" / "logs").exists()
    storage.remove_if_empty(created)  # Idempotent; never touches what it did not create.
    assert (tmp_path / "mine").is_dir()


def a_folder_of_the_users(directory):
    """The issue's folder that is not a run: an export/ with a file of the user's, and a metrics.json."""
    (directory / "export").mkdir(parents=True)
    (directory / "export" / "mine.txt").write_text("x\n")
    (directory / "metrics.json").write_text("{}")
    return {path: path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def test_training_over_a_folder_that_is_not_a_run_is_refused_before_anything_is_written(capsys, cifar_dir, tmp_path):
    before = a_folder_of_the_users(tmp_path / "d")
    line = fails_in_process(capsys, task, f"--data_dir={cifar_dir}", f"--model_dir={tmp_path / 'd'}", "--model=cnn")
    assert "holds files but no run of this trainer" in line and "export/" in line and "metrics.json" in line
    after = {path: path.read_bytes() for path in (tmp_path / "d").rglob("*") if path.is_file()}
    assert after == before and sorted(path.name for path in (tmp_path / "d").iterdir()) == ["export", "metrics.json"]


def test_a_run_of_ours_an_empty_folder_and_its_own_leftovers_are_accepted(tmp_path):
    run = storage.RunPaths.under(str(tmp_path / "missing"))
    storage.check_model_dir_is_a_run(run.model_dir, run, None)
    run = storage.RunPaths.under(str(tmp_path / "leftovers"))
    storage.prepare_model_dir(run)  # Empty checkpoints/ and logs/, as a run that failed early leaves them.
    (tmp_path / "leftovers" / ".run.lock").write_text("")
    storage.check_model_dir_is_a_run(run.model_dir, run, None)
    (tmp_path / "leftovers" / "history.png").write_text("")
    with pytest.raises(UsageError, match="history.png"):
        storage.check_model_dir_is_a_run(run.model_dir, run, None)
    (tmp_path / "leftovers" / "config.json").write_text("{}")
    storage.check_model_dir_is_a_run(run.model_dir, run, None)


def test_a_gs_folder_that_is_not_a_run_is_refused_before_anything_is_written(capsys, cifar_dir, gcs_bucket):
    from google.cloud import storage as cloud_storage

    from helpers import bucket_files

    bucket = cloud_storage.Client().bucket(gcs_bucket)
    bucket.blob("not-a-run/export/mine.txt").upload_from_string("x\n")
    bucket.blob("not-a-run/metrics.json").upload_from_string("{}")
    line = fails_in_process(capsys, task, f"--data_dir={cifar_dir}", f"--model_dir=gs://{gcs_bucket}/not-a-run")
    assert "holds files but no run of this trainer" in line and "export/" in line
    assert bucket_files(gcs_bucket, "not-a-run") == ["export/mine.txt", "metrics.json"]
    assert bucket.blob("not-a-run/metrics.json").download_as_bytes() == b"{}"


def test_a_gs_run_that_a_starting_chief_is_probing_is_accepted_and_a_foreign_file_beside_the_probes_is_not(
        gcs_bucket):
    """Another worker of the job checks the folder while the chief's write checks sit in checkpoints/ and logs/ for
    a moment (a multi-worker run refused its own new folder this way)."""
    from google.cloud import storage as cloud_storage

    bucket = cloud_storage.Client().bucket(gcs_bucket)
    bucket.blob("starting/checkpoints/.write-check-1").upload_from_string(b"")
    bucket.blob("starting/logs/.write-check-2").upload_from_string(b"")
    model_dir = f"gs://{gcs_bucket}/starting"
    paths, mirror = storage.open_run(model_dir, 1, retry_seconds=10)
    storage.check_model_dir_is_a_run(model_dir, paths, mirror)
    bucket.blob("starting/checkpoints/notes.txt").upload_from_string(b"mine")
    with pytest.raises(UsageError, match=r"holds files but no run of this trainer .*: checkpoints/\."):
        storage.check_model_dir_is_a_run(model_dir, paths, mirror)


@pytest.mark.parametrize("environment, argv, expected", [
    ({}, ["--model_dir=gs://"], "--model_dir=gs://: the bucket name is missing"),
    ({"AIP_MODEL_DIR": "gs://"}, [], "$AIP_MODEL_DIR=gs://: the bucket name is missing"),
    ({"AIP_MODEL_DIR": "gs://b/run", "AIP_CHECKPOINT_DIR": "gs:///checkpoints"}, [],
     "$AIP_CHECKPOINT_DIR=gs:///checkpoints: the bucket name is missing"),
])
def test_a_gs_location_without_a_bucket_says_so(capsys, monkeypatch, environment, argv, expected):
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    assert expected in fails_in_process(capsys, task, "--model=cnn", *argv)
