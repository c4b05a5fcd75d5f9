"""The networks by name, built from their model_specs entries, and test-time augmentation."""

import importlib

import keras
from keras import layers

from trainer.training import layers as layers_lib
from trainer.training import model_specs
from trainer.training import network as network_lib
from trainer.errors import UsageError
from trainer.errors import one_line


def build_cnn(image_shape, num_classes, image_size, weights, *, dropout) -> network_lib.Network:
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


def build_resnet50(image_shape, num_classes, image_size, weights) -> network_lib.Network:
    """ImageNet ResNet50 without top, frozen and in inference mode, under a small trainable head (the
    notebook's, without dropout)."""
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


def _imported(path: str):
    """The object a model spec names as "module:name"."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def build(name: str, *, image_shape, num_classes: int, image_size: int | None, weights: str,
          **options) -> network_lib.Network:
    """The network `name` (a key of model_specs.SPECS). `options` may hold any run options (say, a Config's
    to_dict()); the builder gets those its spec lists in builder_options."""
    spec = model_specs.SPECS[name]
    missing = [option for option in spec.builder_options if option not in options]
    if missing:
        raise TypeError(f"Building {name} needs {missing}.")
    network = _imported(spec.builder)(tuple(image_shape), num_classes, image_size, weights,
                                      **{option: options[option] for option in spec.builder_options})
    network.stages = spec.fine_tune_stages
    return network


def build_for_run(flags, image_shape, num_classes: int, *, fresh: bool) -> network_lib.Network:
    """The network of a run with these flags (a Config or the dict of its config.json): what the trainer trains
    and the results tools restore a checkpoint into. Only a fresh network loads the initial --weights: a
    checkpoint overwrites them."""
    flags = flags if isinstance(flags, dict) else flags.to_dict()
    spec = model_specs.SPECS[flags["model"]]
    return build(spec.name, image_shape=image_shape, num_classes=num_classes, image_size=flags["image_size"],
                 weights=flags["weights"] if fresh else "none",
                 **{option: flags[option] for option in spec.builder_options})


class TrainingHooks:
    """What a network may add to the training loop (a spec's hooks); these defaults add nothing."""

    def __init__(self, network: network_lib.Network, config, steps_per_epoch: int):
        self.network, self.config, self.steps_per_epoch = network, config, steps_per_epoch

    def gradients(self, gradients: list, variables: list, step) -> list:
        """Inside the compiled step, before clipping and the update: the gradients to apply at global `step`."""
        del variables, step
        return gradients

    def begin_epoch(self, phase, epoch: int) -> None:
        """Before the first step of `epoch` (0-based) of `phase` (a steps.Phase), also on resuming there."""


def training_hooks(name: str, network: network_lib.Network, config, steps_per_epoch: int) -> TrainingHooks:
    """The hooks of network `name`'s spec, or the defaults."""
    hooks = model_specs.SPECS[name].hooks
    return (_imported(hooks) if hooks else TrainingHooks)(network, config, steps_per_epoch)


def unfreeze_top_stages(network: network_lib.Network, num_stages: int) -> None:
    """Makes the top `num_stages` backbone stages trainable; the backbone still runs in inference mode."""
    if network.backbone is None or not network.stages:
        raise ValueError("This network has no backbone to fine-tune.")
    stages = network.stages[len(network.stages) - num_stages:]
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
