"""The trainer's tuning metrics: the file cloudml-hypertune writes, reported each epoch in a Vertex AI trial."""

import json

import pytest

from helpers import make_config
from trainer.training import hypertune
from trainer.training import train


def entries(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_file_is_the_one_cloudml_hypertune_writes(monkeypatch, tmp_path):
    library = pytest.importorskip("hypertune", reason="cloudml-hypertune is not installed (test extras)")
    monkeypatch.setenv("CLOUD_ML_TRIAL_ID", "7")
    for path, report in ((tmp_path / "ours", None), (tmp_path / "theirs", None)):
        monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(path))
        reporter = hypertune.MetricFile() if path.name == "ours" else library.HyperTune()
        report = reporter.report if path.name == "ours" else (
            lambda metric, value, step: reporter.report_hyperparameter_tuning_metric(metric, value, step))
        for step in range(1, 106):  # More than the 100 entries both keep.
            report("eval_accuracy", 0.5 + step / 1000, step)
    ours, theirs = entries(tmp_path / "ours"), entries(tmp_path / "theirs")
    assert len(ours) == len(theirs) == 100
    for mine, reference in zip(ours, theirs):
        assert abs(mine.pop("timestamp") - reference.pop("timestamp")) < 60
        assert mine == reference  # Same keys, same strings: {"eval_accuracy": "0.506", "global_step": "6", ...}
    assert ours[0] == {"eval_accuracy": "0.506", "global_step": "6", "trial": "7", "checkpoint_path": ""}


def test_nothing_is_written_outside_a_trial(monkeypatch, tmp_path):
    for name in ("CLOUD_ML_TRIAL_ID", "CLOUD_ML_HP_METRIC_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert not hypertune.in_trial()


def test_a_trial_reports_each_epochs_eval_metrics(cifar_dir, monkeypatch, tmp_path):
    metric_file = tmp_path / "hypertune" / "output.metrics"
    monkeypatch.setenv("CLOUD_ML_TRIAL_ID", "3")
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(metric_file))
    monkeypatch.setattr(hypertune, "_metric_file", None)
    metrics = train.run(make_config(cifar_dir, tmp_path / "run", epochs=2, steps_per_epoch=4,
                                    train_split="train[:512]", eval_split="test[:128]"))
    reported = entries(metric_file)
    accuracy = [entry for entry in reported if "eval_accuracy" in entry]
    assert [entry["global_step"] for entry in accuracy] == ["4", "8"]
    assert [float(entry["eval_accuracy"]) for entry in accuracy] == pytest.approx(
        [epoch["eval_accuracy"] for epoch in metrics["history"]])
    assert {entry["trial"] for entry in reported} == {"3"} and any("eval_loss" in entry for entry in reported)
