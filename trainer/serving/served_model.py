"""The model a prediction server serves: a finished run's export, what the page shows about it, and its answers."""

import dataclasses
import json
import os
import time

from absl import logging
import numpy as np
import tensorflow as tf

from trainer.training import gcs
from trainer.results import runs
from trainer.serving import serve_settings
from trainer.training import storage
from trainer.errors import UsageError

EXPORT_DIR = "export"
MODEL_NAME = serve_settings.MODEL_NAME


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """A loaded run: uint8 images [N, H, W, C] in, probabilities [N, classes] out, and what is known about it."""

    name: str
    classifier: runs.Classifier
    description: dict

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.classifier.image_shape

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classifier.class_names

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.classifier.probabilities(images)

    def prediction(self, probabilities: np.ndarray, top_k: int) -> dict:
        """One instance's answer: its top-k classes, most probable first, and every class's probability."""
        ranked = np.argsort(-probabilities, kind="stable")[:top_k]
        return {"top_k": [{"class": self.class_names[index], "probability": round(float(probabilities[index]), 6)}
                          for index in ranked],
                "probabilities": {name: round(float(value), 6) for name, value in zip(self.class_names, probabilities)}}


def check_model_dir(model_dir: str) -> None:
    """Refuses a local model_dir that cannot be served, before the server opens its port. A gs:// one is checked
    when it is downloaded, by `load`."""
    if gcs.is_gcs(model_dir):
        return
    runs.local_run_dir(model_dir)  # Says so when it is not a directory.
    _check_export(model_dir, model_dir)


def _check_export(run_dir: str, model_dir: str) -> str:
    export_dir = os.path.join(run_dir, EXPORT_DIR)
    if not os.path.isdir(export_dir):
        raise UsageError(f"--model_dir={model_dir} has no {EXPORT_DIR}/ folder; give the --model_dir of a finished "
                         "run of trainer.task (it exports the model when training ends).")
    if not os.access(export_dir, os.R_OK | os.X_OK):
        raise UsageError(f"--model_dir={model_dir}: {export_dir} is not readable by this user.")
    if not tf.saved_model.contains_saved_model(export_dir):
        raise UsageError(f"--model_dir={model_dir}: {export_dir} holds no SavedModel (saved_model.pb); the run may "
                         "not have finished.")
    return export_dir


def load(model_dir: str, name: str | None, warm_up_batch_sizes: tuple[int, ...] = (1,)) -> ServedModel:
    """Loads the run's export (downloading a gs:// run first) and runs it once per batch size, so that no request
    pays for building the computation of its batch size.

    Without a name it is served under its network's name from the run's flags (cnn, airbench, resnet50).
    """
    start = time.perf_counter()
    run_dir = runs.local_run_dir(model_dir)
    _check_export(run_dir, model_dir)
    classifier = runs.load_classifier(run_dir)
    name = name or serve_settings.check_model_name(str(runs.read_run_config(run_dir).get("model") or "model"))
    model = ServedModel(name, classifier, describe(run_dir, model_dir, name, classifier))
    for batch_size in warm_up_batch_sizes:
        model.probabilities(np.zeros((batch_size, *classifier.image_shape), np.uint8))
    logging.info("Loaded %s from %s in %.1fs (%s).", name, classifier.source, time.perf_counter() - start,
                 summary(model.description))
    return model


def describe(run_dir: str, model_dir: str, name: str, classifier: runs.Classifier) -> dict:
    """What the page and the metadata route show: the network, its recipe, its test accuracy, its classes."""
    metrics_path = os.path.join(run_dir, "metrics.json")
    metrics = _checked_fields(metrics_path, storage.read_json(metrics_path) or {}, METRICS_FIELDS)
    config_path = os.path.join(run_dir, storage.CONFIG_FILE)
    config = _checked_fields(config_path, runs.read_run_config(run_dir), CONFIG_FIELDS) or \
        _checked_fields(f"{metrics_path} (its flags)", metrics.get("flags") or {}, CONFIG_FIELDS)
    return {"name": name, "model_dir": model_dir, "network": config.get("model"), "recipe": config.get("recipe"),
            "dataset": metrics.get("dataset") or config.get("dataset"),
            "test_accuracy": metrics.get("test_accuracy"), "test_split": metrics.get("eval_split"),
            "epochs": metrics.get("epochs_completed"), "num_parameters": metrics.get("num_parameters"),
            "tta": bool(config.get("tta")), "image_shape": list(classifier.image_shape),
            "classes": list(classifier.class_names)}


# What the page and the metadata show from the run's files, and the JSON type each may have (null: unknown).
METRICS_FIELDS = {"test_accuracy": float, "eval_split": str, "epochs_completed": int, "num_parameters": int,
                  "dataset": str, "flags": dict}
CONFIG_FIELDS = {"model": str, "recipe": str, "dataset": str, "tta": bool}
TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "an object", bool: "true or false"}


def _checked_fields(path: str, values: dict, types: dict) -> dict:
    """`values` once each field it holds has its type: a file edited by hand or by another program is refused
    naming the file, instead of failing later in the middle of formatting it."""
    for field, expected in types.items():
        value = values.get(field)
        if value is not None and not _has_type(value, expected):
            raise UsageError(f"{path} is damaged: its {field!r} is {json.dumps(value)[:60]}, not "
                             f"{TYPE_NAMES[expected]}.")
    return values


def _has_type(value, expected: type) -> bool:
    if isinstance(value, bool):  # JSON's true and false are not numbers, though Python's bool is an int.
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def summary(description: dict) -> str:
    accuracy = description["test_accuracy"]
    parts = [f"network {description['network'] or 'unknown'}", f"recipe {description['recipe'] or 'none'}",
             f"{len(description['classes'])} classes",
             f"test accuracy {accuracy:.4f}" if accuracy is not None else "no test accuracy recorded"]
    return ", ".join(parts)
