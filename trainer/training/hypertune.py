"""The eval metrics of each epoch, written where Vertex AI hyperparameter tuning reads them (cloudml-hypertune's file).

Vertex AI sets $CLOUD_ML_TRIAL_ID in every trial of a HyperparameterTuningJob and reads the trial's metric from
the file the cloudml-hypertune library writes: JSON lines of {metric id: value, "global_step", "trial", "timestamp",
"checkpoint_path"}, all values strings but the timestamp, the newest 100 kept. Writing that file here keeps the
library out of the image; tests/test_hypertune.py checks that both write the same thing.
"""

import json
import os
import time

DEFAULT_METRIC_FILE = "/tmp/hypertune/output.metrics"
KEPT_ENTRIES = 100  # What cloudml-hypertune keeps; older entries are dropped.
# The metrics a trial reports each epoch: the metric ids `python -m launch.vertex tune --metric` accepts.
METRICS = ("eval_accuracy", "eval_loss")


def in_trial() -> bool:
    """Whether this process is a hyperparameter tuning trial (or was pointed at a metric file explicitly)."""
    return bool(os.environ.get("CLOUD_ML_TRIAL_ID") or os.environ.get("CLOUD_ML_HP_METRIC_FILE"))


class MetricFile:
    """Appends reports to the metric file, keeping its newest KEPT_ENTRIES lines."""

    def __init__(self, path: str | None = None, trial_id: str | None = None):
        self.path = path or os.environ.get("CLOUD_ML_HP_METRIC_FILE") or DEFAULT_METRIC_FILE
        self.trial_id = trial_id if trial_id is not None else os.environ.get("CLOUD_ML_TRIAL_ID", "0")
        self.entries: list[dict] = []

    def report(self, metric_id: str, value: float, global_step: int) -> None:
        self.entries = [*self.entries, {
            "timestamp": time.time(), "trial": str(self.trial_id), metric_id: str(float(value)),
            "global_step": str(int(global_step)), "checkpoint_path": ""}][-KEPT_ENTRIES:]
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        # The service may read the file at any moment: it sees the old file or the new one, never half of one.
        temporary = f"{self.path}.tmp-{os.getpid()}"
        with open(temporary, "w") as file:
            file.writelines(json.dumps(entry, sort_keys=True) + "\n" for entry in self.entries)
        os.replace(temporary, self.path)


_metric_file: MetricFile | None = None


def report_epoch(metrics: dict, global_step: int) -> None:
    """Reports an epoch's eval metrics when this process is a tuning trial; nothing otherwise."""
    global _metric_file
    if not in_trial():
        return
    if _metric_file is None:
        _metric_file = MetricFile()
    for metric_id in METRICS:
        if metric_id in metrics:
            _metric_file.report(metric_id, metrics[metric_id], global_step)
