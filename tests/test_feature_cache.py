"""Frozen-backbone feature caching: the head trains on cached features exactly as it would on pixels."""

import numpy as np
import pytest
import tensorflow as tf

import image_folders
from helpers import make_config
from trainer.training import augment
from trainer.training import train
from trainer.errors import UsageError

COMMON = dict(model="resnet50", weights="none", image_size=32, batch_size=32, train_split="train[:128]",
              eval_split="test[:32]", epochs=2, augment_views=2, random_flip=True, translate=2, brightness=0.1,
              optimizer="sgd", learning_rate=0.05, momentum=0.0, seed=1)


def head_after_two_epochs(cifar_dir, model_dir, **overrides):
    config = make_config(cifar_dir, model_dir, **{**COMMON, **overrides})
    steps = train.build_steps(config, tf.distribute.get_strategy(), "float32")
    phase = steps.phases[0]
    start = [weight.numpy().copy() for weight in steps.network.head.weights]
    steps.train(phase, steps.training_iterator(phase), 2 * steps.steps_per_epoch)
    return start, [weight.numpy() for weight in steps.network.head.weights]


def test_cached_features_train_the_same_head_as_pixels_through_the_frozen_backbone(cifar_dir, tmp_path):
    start, uncached = head_after_two_epochs(cifar_dir, tmp_path / "pixels", cache_features=False)
    _, cached = head_after_two_epochs(cifar_dir, tmp_path / "cached", cache_features=True)
    for before, expected, actual in zip(start, uncached, cached):
        moved = np.abs(expected - before).max()
        assert np.abs(actual - expected).max() < 1e-3 * moved + 1e-6, (np.abs(actual - expected).max(), moved)
    assert max(np.abs(expected - before).max() for before, expected in zip(start, uncached)) > 1e-3


def test_cached_features_train_the_same_head_on_a_folder_dataset(cifar_dir, tmp_path):
    # A folder's examples are named by their index in its prepared split, as CIFAR-10's are.
    root = tmp_path / "folder"
    image_folders.make_class_folder(root, image_folders.cifar_images(cifar_dir, per_class=12))
    folder = dict(dataset=str(root), train_split="train", eval_split="validation", validation_fraction=0.25,
                  batch_size=9)
    prepared = str(tmp_path / "prepared")  # The run's --data_dir.
    start, uncached = head_after_two_epochs(prepared, tmp_path / "pixels", cache_features=False, **folder)
    _, cached = head_after_two_epochs(prepared, tmp_path / "cached", cache_features=True, **folder)
    for before, expected, actual in zip(start, uncached, cached):
        moved = np.abs(expected - before).max()
        assert np.abs(actual - expected).max() < 1e-3 * moved + 1e-6, (np.abs(actual - expected).max(), moved)
    assert max(np.abs(expected - before).max() for before, expected in zip(start, uncached)) > 1e-3


def test_each_example_keeps_its_views_and_switches_between_them_across_epochs():
    indices = tf.range(1000, dtype=tf.int64)
    epochs = [augment.chosen_views(indices, tf.constant(epoch * 10, tf.int64), 10, 2, seed=0).numpy()
              for epoch in range(4)]
    assert all(set(np.unique(views)) == {0, 1} for views in epochs)
    assert 0.3 < np.mean(epochs[0] != epochs[1]) < 0.7
    first = augment.view_uniforms(indices, tf.zeros_like(indices), seed=0).numpy()
    np.testing.assert_array_equal(first, augment.view_uniforms(indices, tf.zeros_like(indices), seed=0).numpy())
    assert not np.allclose(first, augment.view_uniforms(indices, tf.ones_like(indices), seed=0).numpy())


def test_feature_cache_refuses_what_it_cannot_reproduce():
    with pytest.raises(UsageError, match="--augment_views=N"):
        make_config("unused", "unused", **{**COMMON, "augment_views": 0}, cache_features=True)
    with pytest.raises(UsageError, match="mixup"):
        make_config("unused", "unused", **COMMON, cache_features=True, mixup=0.2)
    with pytest.raises(UsageError, match="no"):
        make_config("unused", "unused", cache_features=True)
