"""The exported model: a SavedModel that takes raw uint8 images and returns class probabilities."""

import os
import shutil

from absl import logging
import keras
import tensorflow as tf

from trainer import models

LABELS_FILE = os.path.join("assets.extra", "labels.txt")


def export_model(model: keras.Model, image_shape, class_names, directory: str, tta: bool = False,
                 tta_translate: int = 0) -> None:
    """Writes the SavedModel next to `directory` and swaps it in, so a crash leaves the old one intact.

    It reloads with plain TensorFlow: `tf.saved_model.load(directory).serve(uint8_images)`.
    """
    staging = f"{directory}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    inference = models.inference_model(model, image_shape, tta=tta, tta_translate=tta_translate)
    archive = keras.export.ExportArchive()
    archive.track(inference)
    archive.add_endpoint("serve", inference.call,
                         input_signature=[tf.TensorSpec((None, *image_shape), tf.uint8, name="images")])
    archive.write_out(staging, verbose=False)
    os.makedirs(os.path.join(staging, os.path.dirname(LABELS_FILE)), exist_ok=True)
    with open(os.path.join(staging, LABELS_FILE), "w") as file:
        file.write("\n".join(class_names) + "\n")
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.replace(staging, directory)
    logging.info("Exported the model to %s.", directory)
