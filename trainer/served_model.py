"""The model a prediction server serves: a finished run's export, what the page shows about it, and its answers."""

import dataclasses
import os
import re
import time

from absl import logging
import numpy as np
import tensorflow as tf

from trainer import gcs
from trainer import runs
from trainer import storage
from trainer.errors import UsageError

EXPORT_DIR = "export"
# Model names go into URL paths (/v1/models/NAME:predict), so they keep to characters that need no escaping.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


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


def check_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name):
        raise UsageError(f"--model_name={name!r} is not valid: use 1 to 63 letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit (it goes into the URL /v1/models/NAME:predict).")
    return name


def load(model_dir: str, name: str | None, warm_up_batch_sizes: tuple[int, ...] = (1,)) -> ServedModel:
    """Loads the run's export (downloading a gs:// run first) and runs it once per batch size, so that no request
    pays for building the computation of its batch size.

    Without a name it is served under its network's name from the run's flags (cnn, airbench, resnet50).
    """
    start = time.perf_counter()
    run_dir = runs.local_run_dir(model_dir)
    _check_export(run_dir, model_dir)
    classifier = runs.load_classifier(run_dir)
    name = name or check_name(str(runs.read_run_config(run_dir).get("model") or "model"))
    model = ServedModel(name, classifier, describe(run_dir, model_dir, name, classifier))
    for batch_size in warm_up_batch_sizes:
        model.probabilities(np.zeros((batch_size, *classifier.image_shape), np.uint8))
    logging.info("Loaded %s from %s in %.1fs (%s).", name, classifier.source, time.perf_counter() - start,
                 summary(model.description))
    return model


def describe(run_dir: str, model_dir: str, name: str, classifier: runs.Classifier) -> dict:
    """What the page and the metadata route show: the network, its recipe, its test accuracy, its classes."""
    metrics = storage.read_json(os.path.join(run_dir, "metrics.json")) or {}
    config = runs.read_run_config(run_dir) or metrics.get("flags", {})
    return {"name": name, "model_dir": model_dir, "network": config.get("model"), "recipe": config.get("recipe"),
            "dataset": metrics.get("dataset") or config.get("dataset"),
            "test_accuracy": metrics.get("test_accuracy"), "test_split": metrics.get("eval_split"),
            "epochs": metrics.get("epochs_completed"), "num_parameters": metrics.get("num_parameters"),
            "tta": bool(config.get("tta")), "image_shape": list(classifier.image_shape),
            "classes": list(classifier.class_names)}


def summary(description: dict) -> str:
    accuracy = description["test_accuracy"]
    parts = [f"network {description['network'] or 'unknown'}", f"recipe {description['recipe'] or 'none'}",
             f"{len(description['classes'])} classes",
             f"test accuracy {accuracy:.4f}" if accuracy is not None else "no test accuracy recorded"]
    return ", ".join(parts)
