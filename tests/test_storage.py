"""Run directories: created before training, and left as they were found when a run cannot start."""

import errno
import os
import tempfile

import pytest

from trainer import storage
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
