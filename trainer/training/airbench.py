"""airbench94 (Keller Jordan, arXiv:2404.00498) in Keras: a patch-whitened 3-block CNN that trains to 94% fast."""

import keras
from keras import layers
import numpy as np
import tensorflow as tf

from trainer.training import layers as layers_lib
from trainer.training import models
from trainer.training import network as network_lib

# airbench94's network; its blocks run at 31, 15 and 7 pixels for 32x32 inputs.
BLOCK_WIDTHS = (64, 256, 256)
PATCH_SIZE = 2
# Added to the patch covariance's eigenvalues, so near-constant directions are not blown up into noise.
WHITENING_EPSILON = 5e-4
# airbench's BatchNorm: PyTorch momentum 0.4 (Keras counts the other way), a negligible epsilon.
BATCH_NORM_MOMENTUM = 0.6
BATCH_NORM_EPSILON = 1e-12
# airbench trains BatchNorm biases with 64x the learning rate of the other weights. The trainer has one
# rate for all, so the bias is stored divided by 8 and multiplied back: SGD then moves it 8^2 = 64x faster.
BIAS_LEARNING_RATE_BOOST = 64.0
# The logits are the linear head's output times 1/9: small logits early, which large-batch SGD needs.
LOGIT_SCALE = 1 / 9


@keras.saving.register_keras_serializable(package="trainer")
class PatchWhitening(layers.Layer):
    """A frozen 2x2 convolution that whitens image patches; only its bias trains.

    `fit` sets the per-channel normalisation and the filters from a sample: the eigenvectors of the
    covariance of all 2x2 patches, scaled by 1/sqrt(eigenvalue), each also negated, so the next
    GELU sees both signs of every decorrelated unit-variance direction. Until fitted it is the
    identity basis on pixels normalised as mean 0.5, std 0.25. Runs in float32 whatever the policy:
    the filters of weak directions are large, and bfloat16 would round the fine detail they carry away.
    """

    def __init__(self, patch_size: int = PATCH_SIZE, epsilon: float = WHITENING_EPSILON, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.patch_size, self.epsilon = patch_size, epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        directions = channels * self.patch_size ** 2
        self.mean = self.add_weight(shape=(channels,), initializer=keras.initializers.Constant(0.5),
                                    trainable=False, name="mean")
        self.std = self.add_weight(shape=(channels,), initializer=keras.initializers.Constant(0.25),
                                   trainable=False, name="std")
        self.kernel = self.add_weight(shape=(self.patch_size, self.patch_size, channels, 2 * directions),
                                      initializer=lambda shape, dtype=None: self._signed_filters(
                                          np.eye(directions), np.ones(directions)),
                                      trainable=False, name="kernel")
        self.bias = self.add_weight(shape=(2 * directions,), initializer="zeros", name="bias")

    def _signed_filters(self, eigenvectors: np.ndarray, eigenvalues: np.ndarray) -> np.ndarray:
        """The kernel whose filters are the eigenvectors (columns) scaled to unit output variance, then negated."""
        channels = eigenvectors.shape[0] // self.patch_size ** 2
        filters = (eigenvectors / np.sqrt(eigenvalues + self.epsilon)).reshape(
            self.patch_size, self.patch_size, channels, -1)
        return np.concatenate([filters, -filters], axis=-1).astype("float32")

    def normalize(self, images):
        return (images - self.mean) / self.std

    def call(self, images):
        whitened = keras.ops.conv(self.normalize(keras.ops.cast(images, "float32")), self.kernel, padding="valid")
        return whitened + self.bias

    def fit(self, images: np.ndarray) -> None:
        """Fits the normalisation and the filters to float images [N, H, W, C] (as the layer receives them)."""
        images = np.asarray(images, np.float32)
        if not self.built:
            self.build(images.shape)
        self.mean.assign(images.mean(axis=(0, 1, 2), dtype=np.float64))
        self.std.assign(images.std(axis=(0, 1, 2), dtype=np.float64))
        normalized = keras.ops.convert_to_numpy(self.normalize(images))
        patches = np.lib.stride_tricks.sliding_window_view(normalized, (self.patch_size, self.patch_size), (1, 2))
        # [N, H', W', C, p, p] -> rows laid out as (p, p, C), the order of a Keras kernel's first three axes.
        patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, normalized.shape[-1] * self.patch_size ** 2)
        # Uncentred, as airbench: the normalised pixels already have mean about zero.
        covariance = (patches.T @ patches).astype(np.float64) / len(patches)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        # Strongest direction first, as airbench orders its filters.
        eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
        self.kernel.assign(self._signed_filters(eigenvectors, eigenvalues))

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="trainer")
class BoostedBiasBatchNorm(layers.BatchNormalization):
    """airbench's BatchNorm: no learned scale, and a learned bias that trains 64x faster than other weights.

    The bias is kept as `bias / sqrt(boost)` and multiplied back in the forward pass: a gradient step
    on the stored value then changes the bias by `boost` times the learning rate's effect (momentum
    and the schedule are linear, so this is exactly a per-variable learning rate). It is named
    "beta", so the trainer's decoupled weight decay spares it.
    """

    def __init__(self, boost: float = BIAS_LEARNING_RATE_BOOST, **kwargs):
        kwargs.setdefault("momentum", BATCH_NORM_MOMENTUM)
        kwargs.setdefault("epsilon", BATCH_NORM_EPSILON)
        super().__init__(center=False, scale=False, **kwargs)
        self.boost = boost

    def build(self, input_shape):
        super().build(input_shape)
        self.stored_bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="beta",
                                           autocast=False)

    def call(self, inputs, training=None, mask=None):
        normalized = super().call(inputs, training=training, mask=mask)
        bias = keras.ops.cast(self.stored_bias * np.sqrt(self.boost), normalized.dtype)
        return normalized + bias

    def get_config(self):
        config = super().get_config()
        for key in ("center", "scale"):
            config.pop(key, None)
        return {**config, "boost": self.boost}


@keras.saving.register_keras_serializable(package="trainer")
class PartialDirac(keras.initializers.Initializer):
    """PyTorch's default convolution init, with the first `in_channels` filters set to the identity.

    airbench initialises its 3x3 convolutions so, at the start, each block passes its input through
    (plus new random features); the uniform bound 1/sqrt(fan_in) is PyTorch's default.
    """

    def __init__(self, seed=None):
        self.seed = seed

    def __call__(self, shape, dtype=None):
        height, width, in_channels, out_channels = shape
        random = keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform", seed=self.seed)(shape, dtype)
        identity = min(in_channels, out_channels)
        dirac = np.zeros(shape, "float32")
        dirac[height // 2, width // 2, np.arange(identity), np.arange(identity)] = 1.0
        keep_random = np.arange(out_channels) >= identity
        return keras.ops.where(keep_random, random, keras.ops.convert_to_tensor(dirac, dtype))

    def get_config(self):
        return {"seed": self.seed}


def _conv(width: int, name: str) -> layers.Conv2D:
    return layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_initializer=PartialDirac(), name=name)


def _block(x, width: int, index: int):
    """conv -> pool -> BN -> GELU -> conv -> BN -> GELU: pooling before the first BN halves its work."""
    x = _conv(width, f"block{index}_conv1")(x)
    x = layers.MaxPooling2D(name=f"block{index}_pool")(x)
    x = BoostedBiasBatchNorm(name=f"block{index}_bn1")(x)
    x = layers.Activation("gelu", name=f"block{index}_gelu1")(x)
    x = _conv(width, f"block{index}_conv2")(x)
    x = BoostedBiasBatchNorm(name=f"block{index}_bn2")(x)
    return layers.Activation("gelu", name=f"block{index}_gelu2")(x)


def build_airbench(image_shape, num_classes, image_size, weights):
    """airbench94: patch whitening -> 3 conv blocks (64, 256, 256) -> global max-pool -> linear / 9.

    Returns a network.Network; without a weights file, its `fit_to_data` fits the whitening layer to the
    training images before a new run. No dropout: flips, translation and label smoothing regularise it.
    """
    inputs = keras.Input(shape=image_shape, name="pixels")
    preprocessing = layers_lib.ImagePreprocessing(image_size or image_shape[0], "unit", channels=image_shape[-1])
    whitening = PatchWhitening(name="whitening")
    x = layers.Activation("gelu", name="whitening_gelu")(whitening(preprocessing(inputs)))
    for index, width in enumerate(BLOCK_WIDTHS, start=1):
        x = _block(x, width, index)
    # With 32x32 inputs the last map is 3x3; airbench max-pools it whole, as this does for any size.
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    head = layers.Dense(num_classes, use_bias=False, dtype="float32", name="head",
                        kernel_initializer=keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"))(x)
    logits = layers.Rescaling(LOGIT_SCALE, dtype="float32", name="logits")(head)
    model = keras.Model(inputs, logits, name="airbench")
    if weights != "none":
        network_lib.load_model_weights(model, weights)
        return network_lib.Network(model)

    def fit_to_data(images: np.ndarray) -> None:
        whitening.fit(keras.ops.convert_to_numpy(preprocessing(images.astype("float32"))))

    return network_lib.Network(model, fit_to_data=fit_to_data)


class WhiteningBiasWindow(models.TrainingHooks):
    """airbench94 trains the whitening bias in its first --whiten_bias_epochs epochs only (0: throughout)."""

    def gradients(self, gradients: list, variables: list, step) -> list:
        """No gradient for the bias from epoch --whiten_bias_epochs on."""
        if not self.config.whiten_bias_epochs:
            return gradients
        frozen = step // self.steps_per_epoch >= self.config.whiten_bias_epochs
        bias = self.network.model.get_layer("whitening").bias
        return [tf.where(frozen, tf.zeros_like(gradient), gradient) if variable is bias else gradient
                for gradient, variable in zip(gradients, variables)]

    def begin_epoch(self, phase, epoch: int) -> None:
        """Zeroes the frozen bias's momentum: with a zero gradient it would still drift on it, where airbench94
        skips the bias altogether (it is spared from weight decay too)."""
        if not self.config.whiten_bias_epochs or epoch != self.config.whiten_bias_epochs:
            return
        optimizer = getattr(phase.optimizer, "inner_optimizer", phase.optimizer)
        bias = self.network.model.get_layer("whitening").bias
        for slot in optimizer.variables:
            if slot.path.endswith(f"{bias.path.replace('/', '_')}_momentum"):
                slot.assign(tf.zeros_like(slot))
