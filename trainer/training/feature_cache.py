"""Frozen-backbone feature caching: the backbone's features computed once per augmentation view, and the head
trained on them instead of on pixels (--cache_features)."""

import time

from absl import logging
import numpy as np
import tensorflow as tf

from trainer.training import augment
from trainer.training import data
from trainer.training import network as network_lib
from trainer.training import progress

# Images per feature-extraction batch: large enough to keep the backbone busy, small enough for any host.
EXTRACTION_BATCH = 256


def feature_table(network: network_lib.Network, inputs: data.Inputs, views: int, seed: int,
                  augment_config: augment.AugmentConfig, strategy: tf.distribute.Strategy) -> tf.Variable:
    """The frozen feature extractor's output for every training example and augmentation view: [N, views, D]."""
    count, dimension = inputs.num_train_examples, network.features.output.shape[-1]
    table = np.zeros((count, views, dimension), np.float32)

    @tf.function(autograph=False)  # Branches on Python values only.
    def extract(images, indices, view):
        images = tf.cast(images, tf.float32)
        if augment_config.enabled:
            uniforms = augment.view_uniforms(indices, tf.fill(tf.shape(indices), view), seed)
            images = augment.transform(images, uniforms, augment_config)
        return tf.cast(network.features(images, training=False), tf.float32)

    began, done = time.monotonic(), 0
    for view in range(views):
        for images, _, indices in inputs.indexed_training_examples().batch(EXTRACTION_BATCH).prefetch(data.AUTOTUNE):
            table[indices.numpy(), view] = extract(images, indices, tf.constant(view, tf.int64)).numpy()
            done += len(indices)
            rate = done / (time.monotonic() - began)
            logging.log_every_n_seconds(logging.INFO, "Caching backbone features: %d/%d (%.0f img/s, ETA %s)",
                                        30, done, count * views, rate,
                                        progress.format_duration((count * views - done) / rate))
    logging.info("Cached %d views of %d examples' features in %.1fs.", views, count, time.monotonic() - began)
    with strategy.scope():
        return tf.Variable(table, trainable=False)


def cached_forward(network: network_lib.Network, table: tf.Variable, *, views: int, steps_per_epoch: int, seed: int,
                   num_classes: int):
    """A training forward pass that runs the head on the cached features of the view each example uses this
    epoch; it ignores the pixels. Returns (logits, one-hot targets), like the pixel forward pass."""

    def forward(images, labels, indices, step):
        del images
        chosen = augment.chosen_views(indices, step, steps_per_epoch, views, seed)
        features = tf.gather_nd(table, tf.stack([indices, chosen], axis=-1))
        return network.head(features, training=True), tf.one_hot(labels, num_classes)

    return forward
