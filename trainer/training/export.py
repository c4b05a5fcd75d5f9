"""The exported model: a SavedModel that takes raw uint8 images, or encoded image files, and returns class
probabilities."""

import os
import shutil

from absl import logging
import keras
import tensorflow as tf

from trainer.training import graph_images
from trainer.training import models

LABELS_FILE = os.path.join("assets.extra", "labels.txt")
# The signature TF Serving and Vertex AI's prebuilt TensorFlow containers call when a request names none.
IMAGE_BYTES_SIGNATURE = "serving_default"


def export_model(model: keras.Model, image_shape, class_names, directory: str, tta: bool = False,
                 tta_translate: int = 0) -> None:
    """Writes the SavedModel next to `directory` and swaps it in, so a crash leaves the old one intact.

    It reloads with plain TensorFlow: `tf.saved_model.load(directory).serve(uint8_images)`. Its default
    signature takes the image files themselves: `image_bytes`, a batch of PNG/JPEG/GIF/BMP file contents.
    """
    staging = f"{directory}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    inference = models.inference_model(model, image_shape, tta=tta, tta_translate=tta_translate)
    exported = tf.Module()
    # The weights as TensorFlow variables (Keras 3 wraps them), tracked so the SavedModel holds them.
    exported.weights = [variable.value for variable in inference.variables]
    # Traced without autograph, as the training loop is: no Python control flow over tensors to convert.
    exported.serve = tf.function(lambda images: inference(images, training=False), autograph=False,
                                 input_signature=[tf.TensorSpec((None, *image_shape), tf.uint8, name="images")])
    exported.classify_image_bytes = image_bytes_function(inference, tuple(image_shape), class_names)
    # Saved directly rather than through keras.export.ExportArchive, which traced every function twice (once to list
    # it, once more inside the save): half of a small run's export time, and tens of seconds for ResNet50.
    tf.saved_model.save(exported, staging, signatures={"serve": exported.serve,
                                                       IMAGE_BYTES_SIGNATURE: exported.classify_image_bytes})
    os.makedirs(os.path.join(staging, os.path.dirname(LABELS_FILE)), exist_ok=True)
    with open(os.path.join(staging, LABELS_FILE), "w") as file:
        file.write("\n".join(class_names) + "\n")
    if os.path.exists(directory):
        shutil.rmtree(directory)
    os.replace(staging, directory)
    logging.info("Exported the model to %s.", directory)


def image_bytes_function(inference: keras.Model, image_shape: tuple[int, int, int], class_names):
    """A traced function from encoded image files to {"scores": probabilities, "classes": their class names}.

    The outputs are TensorFlow's classification outputs, so TF Serving answers {"predictions": [{"scores": [...],
    "classes": [...]}]}; the class names make the answer readable without labels.txt.
    """
    labels = tf.constant(list(class_names))

    # graph_images writes its branches as tf.cond: converting it cost 0.8 s of every export.
    @tf.function(input_signature=[tf.TensorSpec((None,), tf.string, name="image_bytes")], autograph=False)
    def classify_image_bytes(image_bytes):
        images = tf.map_fn(lambda data: graph_images.decode_image(data, image_shape), image_bytes,
                           fn_output_signature=tf.TensorSpec(image_shape, tf.uint8))
        scores = inference(images, training=False)
        return {"scores": scores, "classes": tf.tile(labels[None], [tf.shape(scores)[0], 1])}

    return classify_image_bytes
