"""The networks: architecture, preprocessing inside the model, weights files, fine-tuning, precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.training import distribution
from trainer.training import layers
from trainer.training import models
from trainer.errors import UsageError


def build(name="cnn", **overrides):
    arguments = dict(image_shape=(32, 32, 3), num_classes=10, image_size=None, dropout=0.5, weights="none")
    arguments.update(overrides)
    return models.build(name, **arguments)


def test_cnn_is_the_notebooks_architecture():
    model = build("cnn").model
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["InputLayer", "ImagePreprocessing", "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D",
                     "Flatten", "Dense", "Dropout", "Dense"]
    convolutions = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [(layer.filters, layer.kernel_size) for layer in convolutions] == [(32, (3, 3)), (64, (3, 3))]
    assert model.output.shape == (None, 10)


def test_cnn_sees_pixels_scaled_to_unit_range():
    preprocessing = build("cnn").model.get_layer(index=1)
    out = preprocessing(np.full((1, 32, 32, 3), 255.0, np.float32))
    np.testing.assert_allclose(out.numpy(), 1.0)


def test_resnet50_preprocessing_matches_keras_caffe_preprocess_input():
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    layer = layers.ImagePreprocessing(32, "caffe")
    expected = keras.applications.resnet50.preprocess_input(images.copy())
    np.testing.assert_allclose(layer(images).numpy(), expected, rtol=1e-5, atol=1e-4)


def test_preprocessing_resizes_on_the_device_and_makes_greyscale_rgb():
    layer = layers.ImagePreprocessing(64, "caffe", channels=3)
    assert layer(np.zeros((1, 16, 16, 1), np.float32)).shape == (1, 64, 64, 3)


def test_resnet50_head_on_a_frozen_backbone_in_inference_mode():
    network = build("resnet50", image_size=32)
    assert network.backbone is not None and not network.backbone.trainable
    head = [variable.path for variable in network.model.trainable_variables]
    assert len(head) == 4  # Dense 128 and Dense 10, kernels and biases.
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    batch_norm = network.backbone.get_layer("conv1_bn")
    before = batch_norm.moving_mean.numpy().copy()
    network.model(images, training=True)
    np.testing.assert_array_equal(batch_norm.moving_mean.numpy(), before)


def test_unfreezing_top_stages_keeps_batchnorm_statistics_fixed():
    network = build("resnet50", image_size=32)
    counts = {}
    for stages in (1, 2, 5):
        models.unfreeze_top_stages(network, stages)
        counts[stages] = len(network.model.trainable_variables)
    assert 4 < counts[1] < counts[2] < counts[5]
    assert counts[5] == 4 + len(network.backbone.trainable_weights)
    batch_norm = network.backbone.get_layer("conv5_block3_3_bn")
    before = batch_norm.moving_variance.numpy().copy()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(network.model(np.ones((2, 32, 32, 3), np.float32) * 100, training=True))
    gradients = tape.gradient(loss, network.model.trainable_variables)
    assert all(gradient is not None for gradient in gradients)
    np.testing.assert_array_equal(batch_norm.moving_variance.numpy(), before)


def test_resnet50_loads_a_backbone_weights_file(tmp_path):
    keras.utils.set_random_seed(1)
    source = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = str(tmp_path / "resnet50_notop.weights.h5")
    source.save_weights(path)
    keras.utils.set_random_seed(2)
    network = build("resnet50", image_size=32, weights=path)
    for loaded, saved in zip(network.backbone.weights, source.weights):
        np.testing.assert_array_equal(loaded.numpy(), saved.numpy())


def test_a_weights_file_of_another_model_is_a_usage_error(tmp_path):
    path = str(tmp_path / "cnn.weights.h5")
    build("cnn").model.save_weights(path)
    with pytest.raises(UsageError, match="does not hold ResNet50"):
        build("resnet50", image_size=32, weights=path)
    with pytest.raises(UsageError, match="does not match --model=cnn"):
        build("cnn", image_shape=(16, 16, 1), weights=path)


def test_cnn_reloads_its_own_weights_file(tmp_path):
    path = str(tmp_path / "cnn.weights.h5")
    original = build("cnn").model
    original.save_weights(path)
    reloaded = build("cnn", weights=path).model
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(reloaded(images).numpy(), original(images).numpy(), rtol=1e-6)


def test_mixed_bfloat16_computes_in_bfloat16_but_returns_float32_logits():
    with distribution.dtype_policy("mixed_bfloat16"):
        model = build("cnn").model
    convolution = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert convolution.compute_dtype == "bfloat16" and convolution.kernel.dtype == "float32"
    assert model.get_layer(index=1).compute_dtype == "float32"
    logits = model(np.zeros((2, 32, 32, 3), np.float32))
    assert logits.dtype == tf.float32


def test_inference_model_takes_uint8_and_returns_probabilities():
    inference = models.inference_model(build("cnn").model, (32, 32, 3))
    probabilities = inference(np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)).numpy()
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
