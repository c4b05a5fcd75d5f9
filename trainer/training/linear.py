"""The example network: one Dense layer on the pixels, the template for adding a model (see model_specs.py)."""

import keras
from keras import layers

from trainer.training import layers as layers_lib
from trainer.training import network as network_lib


def build_linear(image_shape, num_classes, image_size, weights) -> network_lib.Network:
    """Pixels scaled to [0, 1] -> Flatten -> Dense: a linear classifier, float32 logits."""
    inputs = keras.Input(shape=image_shape, name="pixels")
    x = layers_lib.ImagePreprocessing(image_size or image_shape[0], "unit", channels=image_shape[-1])(inputs)
    x = layers.Flatten()(x)
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    network = network_lib.Network(keras.Model(inputs, logits, name="linear"))
    network_lib.load_model_weights(network.model, weights)
    return network
