"""airbench: patch whitening, its layers' training behaviour, shapes and precision, and a run through the trainer."""

import keras
import numpy as np
import tensorflow as tf

from helpers import make_config
from trainer.training import airbench
from trainer.training import data
from trainer.training import distribution
from trainer.training import train


def build(image_shape=(32, 32, 3), weights="none"):
    return airbench.build_airbench(image_shape, 10, None, weights)


def correlated_images(count=200, size=16, seed=0):
    """Smooth, colour-correlated float images in [0, 1]: neighbouring pixels and channels are far from independent."""
    noise = np.random.default_rng(seed).normal(size=(count, size + 2, size + 2, 3))
    smooth = sum(noise[:, row:row + size, column:column + size] for row in range(3) for column in range(3))
    mixed = smooth @ np.array([[1.0, 0.8, 0.6], [0.0, 0.6, 0.5], [0.0, 0.0, 0.4]])
    return (0.5 + 0.05 * mixed).astype("float32")


def patch_covariance(outputs):
    flat = outputs.reshape(-1, outputs.shape[-1]).astype("float64")
    return flat.T @ flat / len(flat)


def test_fitted_whitening_decorrelates_patches_to_unit_variance():
    images = correlated_images()
    layer = airbench.PatchWhitening()
    directions = 3 * airbench.PATCH_SIZE ** 2
    # Unfitted, the layer's filters are the identity basis: its outputs are the patches' pixels, strongly correlated.
    before = patch_covariance(layer(images).numpy()[..., :directions])
    correlation = before / np.sqrt(np.outer(np.diag(before), np.diag(before)))
    assert np.abs(correlation - np.eye(directions)).max() > 0.5
    layer.fit(images)
    outputs = layer(images).numpy()
    covariance = patch_covariance(outputs[..., :directions])
    np.testing.assert_allclose(covariance - np.diag(np.diag(covariance)), 0.0, atol=1e-4)
    # Each variance is eigenvalue / (eigenvalue + epsilon): 1 for real directions, a little less for weak ones.
    assert np.all(np.diag(covariance) <= 1.0 + 1e-4) and np.all(np.diag(covariance) > 0.9)
    # The second half of the filters are the negated first half, so the GELU after it sees both signs.
    np.testing.assert_allclose(outputs[..., directions:], -outputs[..., :directions], atol=1e-4)
    np.testing.assert_allclose(layer.mean.numpy(), images.mean(axis=(0, 1, 2)), rtol=1e-5)


def test_network_builds_for_colour_and_greyscale_images():
    for shape in ((32, 32, 3), (28, 28, 1)):
        network = build(shape)
        assert network.fit_to_data is not None
        pixels = np.random.default_rng(0).uniform(0, 255, (4, *shape)).astype("float32")
        network.fit_to_data(pixels.astype("uint8"))
        logits = network.model(pixels, training=False)
        assert logits.shape == (4, 10) and np.all(np.isfinite(logits.numpy()))
        kernel = network.model.get_layer("whitening").kernel
        assert tuple(kernel.shape) == (2, 2, shape[-1], 8 * shape[-1]) and not kernel.trainable


def test_logits_are_float32_under_mixed_bfloat16():
    with distribution.dtype_policy("mixed_bfloat16"):
        model = build().model
        logits = model(np.zeros((2, 32, 32, 3), np.float32), training=True)
        assert model.get_layer("block2_conv1").compute_dtype == "bfloat16"
    assert logits.dtype == "float32"


def test_batch_norm_bias_learns_boost_times_faster():
    layer = airbench.BoostedBiasBatchNorm()
    inputs = tf.constant(np.random.default_rng(0).normal(size=(8, 4, 4, 5)), tf.float32)
    upstream = tf.constant(np.random.default_rng(1).normal(size=(8, 4, 4, 5)), tf.float32)
    # Training mode throughout: batch statistics, so only the bias can change the output.
    before = layer(inputs, training=True).numpy()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(inputs, training=True) * upstream)
    gradient = tape.gradient(loss, layer.trainable_variables)
    learning_rate = 0.01
    keras.optimizers.SGD(learning_rate).apply_gradients(zip(gradient, layer.trainable_variables))
    moved = layer(inputs, training=True).numpy() - before
    # d loss / d bias is the upstream gradient summed over every position of the channel.
    expected = -airbench.BIAS_LEARNING_RATE_BOOST * learning_rate * upstream.numpy().sum(axis=(0, 1, 2))
    np.testing.assert_allclose(moved, np.broadcast_to(expected, moved.shape), rtol=1e-4, atol=1e-5)
    assert [variable.name for variable in layer.trainable_variables] == ["beta"]  # Spared by weight decay.


def test_convolutions_start_by_passing_their_input_through():
    convolution = keras.layers.Conv2D(12, 3, padding="same", use_bias=False, kernel_initializer=airbench.PartialDirac())
    inputs = np.random.default_rng(0).normal(size=(2, 6, 6, 5)).astype("float32")
    outputs = convolution(inputs).numpy()
    np.testing.assert_allclose(outputs[..., :5], inputs, atol=1e-6)
    assert np.abs(outputs[..., 5:]).max() > 0.1


def test_weights_file_skips_refitting(tmp_path):
    source = build()
    source.fit_to_data(np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    path = str(tmp_path / "airbench.weights.h5")
    source.model.save_weights(path)
    loaded = build(weights=path)
    assert loaded.fit_to_data is None
    np.testing.assert_array_equal(loaded.model.get_layer("whitening").kernel.numpy(),
                                  source.model.get_layer("whitening").kernel.numpy())


def test_trains_through_the_trainer_with_whitening_fitted_to_the_training_split_and_its_bias_stopped(
        cifar_dir, tmp_path):
    # Lookahead off: it would pull the frozen bias toward its slow copy, as it does in airbench94.
    config = make_config(cifar_dir, tmp_path, model="airbench", train_split="train[:128]", eval_split="test[:64]",
                         batch_size=64, steps_per_loop=2, epochs=3, optimizer="sgd", momentum=0.85, learning_rate=0.1,
                         weight_decay=0.005, decay_biases=True, whiten_bias_epochs=1, label_smoothing=0.2,
                         translate=2, brightness=0.0)
    metrics = train.run(config)
    assert metrics["epochs_completed"] == 3 and np.isfinite(metrics["history"][0]["train_loss"])
    whitening = {}
    for step in (2, 4, 6):  # The checkpoints after epochs 1, 2 and 3.
        restored = build()
        tf.train.Checkpoint(model=restored.model).read(str(tmp_path / "checkpoints" / f"ckpt-{step}")).expect_partial()
        whitening[step] = restored.model.get_layer("whitening")
    reference = airbench.PatchWhitening()
    sample = data.sample_images(data.load_builder("cifar10", cifar_dir), "train[:128]", train.DATA_FIT_SAMPLE)
    reference.fit(sample.astype("float32") / 255.0)
    # Fitted before training on exactly the training split's images, and frozen during it.
    np.testing.assert_allclose(whitening[6].kernel.numpy(), reference.kernel.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(whitening[6].mean.numpy(), reference.mean.numpy(), rtol=1e-5)
    # Its bias learns in the first epoch only (--whiten_bias_epochs=1).
    assert np.abs(whitening[2].bias.numpy()).max() > 0
    np.testing.assert_array_equal(whitening[4].bias.numpy(), whitening[2].bias.numpy())
    np.testing.assert_array_equal(whitening[6].bias.numpy(), whitening[2].bias.numpy())
