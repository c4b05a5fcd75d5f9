"""Keras layers the networks share: preprocessing inside the model, and a sub-model held in inference mode."""

import keras
from keras import layers

# keras.applications.resnet50.preprocess_input's "caffe" mode: BGR order, ImageNet channel means.
CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="trainer")
class ImagePreprocessing(layers.Layer):
    """Resizes 0-255 images to the network's input size and normalises them as its weights expect.

    It runs in float32 whatever the mixed-precision policy, so pixel statistics keep full precision.
    """

    def __init__(self, image_size: int, style: str, channels: int = 3, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        if style not in ("unit", "caffe"):
            raise ValueError(f"Unknown preprocessing style {style!r}.")
        self.image_size, self.style, self.channels = image_size, style, channels

    def call(self, images):
        images = keras.ops.cast(images, "float32")
        if images.shape[-1] == 1 and self.channels == 3:
            images = keras.ops.repeat(images, 3, axis=-1)
        if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            images = keras.ops.image.resize(images, (self.image_size, self.image_size), interpolation="bilinear")
        if self.style == "unit":
            return images / 255.0
        return images[..., ::-1] - keras.ops.convert_to_tensor(CAFFE_BGR_MEANS, "float32")

    def get_config(self):
        return {**super().get_config(), "image_size": self.image_size, "style": self.style,
                "channels": self.channels}


@keras.saving.register_keras_serializable(package="trainer")
class InferenceMode(layers.Layer):
    """Runs a sub-model in inference mode, so its BatchNorm layers keep their moving statistics.

    `backbone(x, training=False)` in a functional graph is not enough in Keras 3: an outer call with
    training=True overrides it (keras-team/keras#20285), and unfrozen BatchNorm layers would then
    normalise with batch statistics and update their moving averages. Calling it from here does hold.
    """

    def __init__(self, inner: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, inputs):
        return self.inner(inputs, training=False)

    def compute_output_shape(self, input_shape):
        return self.inner.compute_output_shape(input_shape)
