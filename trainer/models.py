"""The networks: each takes float 0-255 pixels, preprocesses inside, and returns float32 logits."""

import keras
from keras import layers

from trainer import airbench
from trainer import layers as layers_lib
from trainer import network as network_lib
from trainer.errors import UsageError
from trainer.errors import one_line

RESNET50_STAGES = ("conv1", "conv2", "conv3", "conv4", "conv5")


def build_cnn(image_shape, num_classes, image_size, dropout, weights) -> network_lib.Network:
    """The notebook's network: 2 x [Conv 3x3 + MaxPool] (32, 64) -> Dense 128 -> Dropout -> Dense."""
    inputs = keras.Input(shape=image_shape, name="pixels")
    x = layers_lib.ImagePreprocessing(image_size or image_shape[0], "unit", channels=image_shape[-1])(inputs)
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    logits = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    network = network_lib.Network(keras.Model(inputs, logits, name="cnn"))
    network_lib.load_model_weights(network.model, weights)
    return network


def build_resnet50(image_shape, num_classes, image_size, dropout, weights) -> network_lib.Network:
    """ImageNet ResNet50 without top, frozen and in inference mode, under a small trainable head."""
    del dropout  # The head follows the notebook, which had no dropout here.
    backbone = _resnet50_backbone(image_size, weights)
    backbone.trainable = False
    pixels = keras.Input(shape=image_shape, name="pixels")
    x = layers_lib.ImagePreprocessing(image_size, "caffe", channels=3)(pixels)
    x = layers_lib.InferenceMode(backbone, name="backbone")(x)
    features = keras.Model(pixels, layers.GlobalAveragePooling2D()(x), name="resnet50_features")
    pooled = keras.Input(shape=features.output.shape[1:], name="features")
    hidden = layers.Dense(128, activation="relu")(pooled)
    head = keras.Model(pooled, layers.Dense(num_classes, dtype="float32", name="logits")(hidden), name="head")
    inputs = keras.Input(shape=image_shape, name="pixels")
    model = keras.Model(inputs, head(features(inputs)), name="resnet50_classifier")
    return network_lib.Network(model, backbone, features=features, head=head)


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


MODEL_BUILDERS = {"cnn": build_cnn, "resnet50": build_resnet50, "airbench": airbench.build_airbench}


def build(name: str, *, image_shape, num_classes: int, image_size: int | None, dropout: float,
          weights: str) -> network_lib.Network:
    return MODEL_BUILDERS[name](tuple(image_shape), num_classes, image_size, dropout, weights)


def unfreeze_top_stages(network: network_lib.Network, num_stages: int) -> None:
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
