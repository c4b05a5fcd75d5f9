"""Finished runs as the results tools read them: the run directory (local or gs://), its flags, its model."""

import dataclasses
import logging as python_logging
import os
from typing import Callable

import numpy as np
import tensorflow as tf

from trainer.training import checkpoint_schema
from trainer.training import checkpoints
from trainer.training import data
from trainer.training import distribution
from trainer.training import early_stopping
from trainer.training import gcs
from trainer.training import models
from trainer.training import optimization
from trainer.training import storage
from trainer.errors import UsageError
from trainer.errors import one_line


def local_run_dir(model_dir: str) -> str:
    """The run directory as a local path; a gs:// run is downloaded first (its export, flags, metrics and
    latest checkpoint). Every read of a run directory by the results tools goes through here."""
    if gcs.is_gcs(model_dir):
        return storage.local_copy(model_dir)
    if not os.path.isdir(model_dir):
        raise UsageError(f"{model_dir} is not a directory; give the --model_dir of a run of trainer.task.")
    return model_dir


def save_back(model_dir: str) -> None:
    """Uploads what a tool wrote into a downloaded gs:// run (evaluation.json, ...) back to the bucket."""
    if gcs.is_gcs(model_dir):
        storage.upload_copy(model_dir)


def read_run_config(run_dir: str) -> dict:
    """The flags the run started with (config.json), or {} for a directory that has none."""
    return storage.read_json(os.path.join(run_dir, storage.CONFIG_FILE)) or {}


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A finished run's model: uint8 images [N, H, W, C] in, class probabilities [N, classes] out."""

    probabilities: Callable[[tf.Tensor], np.ndarray]
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    source: str


def load_classifier(run_dir: str, data_dir: str | None = None) -> Classifier:
    """The run's exported model or, when it has no export, the model in its latest checkpoint."""
    export_dir = os.path.join(run_dir, "export")
    if tf.saved_model.contains_saved_model(export_dir):
        return _exported_classifier(export_dir)
    return _checkpoint_classifier(run_dir, data_dir)


def _exported_classifier(export_dir: str) -> Classifier:
    labels_path = os.path.join(export_dir, "assets.extra", "labels.txt")
    try:
        loaded = tf.saved_model.load(export_dir)
        (spec,) = loaded.serve.input_signature
        with open(labels_path) as file:
            class_names = tuple(line.strip() for line in file if line.strip())
    except (OSError, ValueError, AttributeError, tf.errors.OpError) as error:
        raise UsageError(f"{export_dir} is not an export of trainer.task ({one_line(error, 200)}).") from error
    check_class_names(class_names, _output_count(loaded), labels_path)
    return Classifier(lambda images: loaded.serve(images).numpy(), tuple(spec.shape[1:]), class_names, export_dir)


def check_class_names(class_names: tuple[str, ...], num_outputs: int | None, labels_path: str) -> None:
    """Refuses labels that do not name the model's outputs one to one: too few would fail every prediction of the
    last classes, too many would silently name the wrong ones."""
    if num_outputs is not None and len(class_names) != num_outputs:
        raise UsageError(f"{labels_path} names {len(class_names)} classes but the model has {num_outputs} outputs; "
                         "the run's export is damaged or mixed up with another (export it again, or write one class "
                         "name a line, in the model's order).")


def _output_count(loaded) -> int | None:
    """The number of classes the exported model scores, from its `serve` signature (None when it does not say)."""
    outputs = [function.structured_outputs for function in loaded.serve.concrete_functions]
    if outputs and isinstance(outputs[0], tf.TensorSpec) and outputs[0].shape.rank == 2:
        return outputs[0].shape[-1]
    return None


def _checkpoint_classifier(run_dir: str, data_dir: str | None) -> Classifier:
    """Rebuilds the network from config.json and restores its weights as the run ended with them."""
    checkpoint_path = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    config = read_run_config(run_dir)
    if checkpoint_path is None or not config:
        raise UsageError(f"{run_dir} holds neither an export/ nor checkpoints/ with config.json; give the "
                         "--model_dir of a run of trainer.task.")
    builder = data.load_builder(config["dataset"], data_dir or config["data_dir"], **data.folder_options(config))
    info = data.dataset_info(builder, config["train_split"], config["eval_split"])
    with distribution.dtype_policy(_run_precision(run_dir, config)):
        network = models.build_for_run(config, info.image_shape, info.num_classes, fresh=False)
    model = network.model
    best_weights = early_stopping.best_weight_variables(model)
    average = optimization.WeightAverage(model.weights, config["ema_decay"]) if config.get("ema_decay") else None
    state = checkpoints.TrainingState()
    # The optimizers are not needed; every model weight is, and the state says which weights the run ended on.
    objects = checkpoint_schema.checkpoint_objects(model, training_state=state, best_weights=best_weights,
                                                   weight_average=average)
    try:
        checkpoint_schema.checkpoint_for(objects, checkpoint_path).restore(
            checkpoint_path).expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError) as error:
        # A half-restored checkpoint logs every value it left behind when collected; the error says it all.
        python_logging.getLogger("tensorflow").setLevel(python_logging.ERROR)
        raise UsageError(f"{checkpoint_path} does not fit the network rebuilt from {run_dir}/config.json "
                         f"({one_line(error, 200)}).") from error
    # A run with early stopping ends on its best epoch's weights (saved beside the model), as its export does.
    # Without it, a run with a weight average evaluates and exports the average.
    if config["early_stopping_patience"] and int(state.best_epoch.numpy()) > 0:
        for weight, best in zip(model.weights, best_weights):
            weight.assign(best)
    elif average is not None:
        average.swap_in()
    inference = tf.function(models.inference_model(
        model, info.image_shape, tta=config.get("tta", False), tta_translate=config.get("tta_translate", 0)),
        autograph=False)
    return Classifier(lambda images: inference(images, training=False).numpy(), info.image_shape,
                      info.class_names, checkpoint_path)


def _run_precision(run_dir: str, config: dict) -> str:
    """The dtype policy the run trained with, so the rebuilt network computes as its export does."""
    metrics = storage.read_json(os.path.join(run_dir, "metrics.json")) or {}
    precision = metrics.get("precision") or config.get("precision", "float32")
    return "float32" if precision == "auto" else precision
