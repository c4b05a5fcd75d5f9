"""The networks: each takes float 0-255 pixels, preprocesses inside, and returns float32 logits."""

import collections.abc
import dataclasses

import keras
from keras import layers

from trainer import airbench
from trainer.errors import UsageError
from trainer.errors import one_line

# keras.applications.resnet50.preprocess_input's "caffe" mode: BGR order, ImageNet channel means.
CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)
RESNET50_STAGES = ("conv1", "conv2", "conv3", "conv4", "conv5")


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


@dataclasses.dataclass
class Network:
    """A model plus the pretrained backbone inside it, when it has one.

    `fit_to_data`, when set, is called once before a new run trains, with a sample of training
    images (uint8, [N, H, W, C]); a network uses it to set weights from data statistics.
    """

    model: keras.Model
    backbone: keras.Model | None = None
    fit_to_data: collections.abc.Callable | None = None
    # For networks with a frozen backbone: model(x) == head(features(x)), so the head can be trained
    # on features computed once.
    features: keras.Model | None = None
    head: keras.Model | None = None


def build_cnn(image_shape, num_classes, image_size, dropout, weights) -> Network:
    """The notebook's network: 2 x [Conv 3x3 + MaxPool] (32, 64) -> Dense 128 -> Dropout -> Dense."""
    inputs = keras.Input(shape=image_shape, name="pixels")
    x = ImagePreprocessing(image_size or image_shape[0], "unit", channels=image_shape[-1])(inputs)
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    network = Network(keras.Model(inputs, logits, name="cnn"))
    _load_model_weights(network.model, weights)
    return network


def build_resnet50(image_shape, num_classes, image_size, dropout, weights) -> Network:
    """ImageNet ResNet50 without top, frozen and in inference mode, under a small trainable head."""
    del dropout  # The head follows the notebook, which had no dropout here.
    backbone = _resnet50_backbone(image_size, weights)
    backbone.trainable = False
    pixels = keras.Input(shape=image_shape, name="pixels")
    x = ImagePreprocessing(image_size, "caffe", channels=3)(pixels)
    x = InferenceMode(backbone, name="backbone")(x)
    features = keras.Model(pixels, layers.GlobalAveragePooling2D()(x), name="resnet50_features")
    pooled = keras.Input(shape=features.output.shape[1:], name="features")
    hidden = layers.Dense(128, activation="relu")(pooled)
    head = keras.Model(pooled, layers.Dense(num_classes, dtype="float32", name="logits")(hidden), name="head")
    inputs = keras.Input(shape=image_shape, name="pixels")
    model = keras.Model(inputs, head(features(inputs)), name="resnet50_classifier")
    return Network(model, backbone, features=features, head=head)


def _resnet50_backbone(image_size: int, weights: str) -> keras.Model:
    source = None if weights == "none" else weights
    try:
        return keras.applications.ResNet50(include_top=False, weights=source,
                                           input_shape=(image_size, image_size, 3))
    except Exception as error:  # Keras reports download and file problems with many types.
        if weights == "imagenet":
            raise UsageError(
                f"--weights=imagenet: cannot download the ResNet50 ImageNet weights ({one_line(error)}). "
                "Use --weights=none, or --weights=PATH to a copy of "
                "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5.") from error
        raise UsageError(f"--weights={weights} does not hold ResNet50 (no-top) weights: {one_line(error)}") \
            from error


def _load_model_weights(model: keras.Model, weights: str) -> None:
    if weights == "none":
        return
    try:
        model.load_weights(weights)
    except Exception as error:  # Keras raises ValueError, KeyError or OSError for a wrong file.
        raise UsageError(f"--weights={weights} does not match --model={model.name}: {one_line(error)}") \
            from error



MODEL_BUILDERS = {"cnn": build_cnn, "resnet50": build_resnet50, "airbench": airbench.build_airbench}


def build(name: str, *, image_shape, num_classes: int, image_size: int | None, dropout: float,
          weights: str) -> Network:
    return MODEL_BUILDERS[name](tuple(image_shape), num_classes, image_size, dropout, weights)


def unfreeze_top_stages(network: Network, num_stages: int) -> None:
    """Makes the top `num_stages` ResNet stages trainable; the backbone still runs in inference mode."""
    if network.backbone is None:
        raise ValueError("This network has no backbone to fine-tune.")
    stages = RESNET50_STAGES[len(RESNET50_STAGES) - num_stages:]
    network.backbone.trainable = True
    for layer in network.backbone.layers:
        layer.trainable = layer.name.split("_")[0] in stages


def inference_model(model: keras.Model, image_shape, tta: bool = False, tta_translate: int = 0) -> keras.Model:
    """Wraps a logits model into one that takes raw uint8 images and returns probabilities, with the
    test-time augmentation of `test_time_probabilities` inside."""
    inputs = keras.Input(shape=tuple(image_shape), dtype="uint8", name="images")
    probabilities = test_time_probabilities(model, keras.ops.cast(inputs, "float32"), tta, tta_translate)
    return keras.Model(inputs, probabilities, name=f"{model.name}_inference")


def test_time_probabilities(model: keras.Model, pixels, tta: bool = False, tta_translate: int = 0):
    """Class probabilities (float32) of float 0-255 images, averaged over test-time views.

    With `tta`, over each image and its mirror image. With `tta_translate` too, that pair counts half
    and the other half goes to the pair shifted `tta_translate` pixels up-left and down-right with
    reflect padding (airbench's multi-crop TTA). Probabilities are averaged, not logits, so the result
    stays a distribution whatever the views disagree on.
    """
    def probabilities(views):
        outputs = [keras.ops.softmax(keras.ops.cast(model(view, training=False), "float32")) for view in views]
        return sum(outputs[1:], outputs[0]) / len(outputs)

    if not tta:
        return probabilities([pixels])
    unshifted = probabilities([pixels, keras.ops.flip(pixels, axis=2)])
    if not tta_translate:
        return unshifted
    shift, height, width = tta_translate, pixels.shape[1], pixels.shape[2]
    padded = keras.ops.pad(pixels, [[0, 0], [shift, shift], [shift, shift], [0, 0]], mode="reflect")
    shifted = [padded[:, :height, :width], padded[:, 2 * shift:2 * shift + height, 2 * shift:2 * shift + width]]
    shifted = probabilities([view for image in shifted for view in (image, keras.ops.flip(image, axis=2))])
    return 0.5 * unshifted + 0.5 * shifted
