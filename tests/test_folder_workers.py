"""Folder datasets across workers and runs: a chief's refusal stops the other worker too, and the launcher does not
restart them; an interrupted run on a folder resumes to the same weights. (Two workers training on the copy the chief
prepared: tests/test_multiworker.py's Vertex AI cluster test.)"""

import re

import pytest

import image_folders
from helpers import make_config
from test_multiworker import Launch
from test_train import run_stopped_then_rerun
from trainer.training import train


@pytest.fixture(scope="module")
def pictures(cifar_dir):
    return image_folders.cifar_images(cifar_dir, per_class=10)


def folder_run(folder, tmp_path, *extra: str) -> list[str]:
    return [f"--dataset={folder}", f"--data_dir={tmp_path / 'tfds'}", f"--model_dir={tmp_path / 'run'}",
            "--model=cnn", "--epochs=1", "--batch_size=8", "--validation_fraction=0.2", "--precision=float32",
            "--early_stopping_patience=0", *extra]


def test_a_folder_the_chief_refuses_stops_the_other_worker_with_the_same_line_and_no_restart(tmp_path, pictures):
    folder = tmp_path / "pets"
    image_folders.make_class_folder(folder, {name: images[:4] for name, images in pictures.items()})
    for picture in (folder / "ship").iterdir():  # Listed as images; found unreadable only when decoded.
        picture.write_bytes(b"not a picture")
    launch = Launch("--workers=2", "--restarts=2", "--", *folder_run(folder, tmp_path, "--validation_fraction=0.25"))
    assert launch.finish() == 2, launch.text()[-5000:]
    # A usage error is not retried: its restarts would fail the same way.
    assert len(launch.matches(r"Started worker 0 \(pid")) == 1, launch.text()[-5000:]
    refusals = {match.group(1): match.group(2) for match in
                re.finditer(r"\[worker (\d)\] error: (.*)", launch.text())}
    assert set(refusals) == {"0", "1"} and len(set(refusals.values())) == 1, refusals
    assert "class 'ship' has no readable image" in refusals["0"]


def test_a_run_on_a_folder_stopped_after_an_epoch_and_rerun_ends_on_the_same_weights(tmp_path, pictures,
                                                                                     monkeypatch):
    folder = tmp_path / "pets"
    image_folders.make_class_folder(folder, pictures)
    common = dict(dataset=str(folder), model="cnn", batch_size=8, epochs=2, train_split="train",
                  eval_split="validation", validation_fraction=0.2, optimizer="sgd", learning_rate=0.05, seed=1)
    straight = train.run(make_config(str(tmp_path / "tfds"), tmp_path / "straight", **common))
    resumed = run_stopped_then_rerun(monkeypatch, make_config(str(tmp_path / "tfds"), tmp_path / "stopped", **common),
                                     train.Trainer, "end_epoch", lambda phase, epoch, *rest: epoch == 0)
    assert resumed["epochs_completed"] == straight["epochs_completed"] == 2
    assert resumed["weights_fingerprint"] == straight["weights_fingerprint"]
