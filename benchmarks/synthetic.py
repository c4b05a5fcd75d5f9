"""Synthetic training input for throughput benchmarks: one batch, already in memory, over and over."""

import numpy as np
import tensorflow as tf


def synthetic_iterator(steps):
    """A distributed iterator over the same random batch for a steps.Steps: the input pipeline costs nothing, so
    images/s against it is the step's own speed."""
    def batches(context):
        per_replica = context.get_per_replica_batch_size(steps.config.batch_size)
        random = np.random.default_rng(0)
        images = random.integers(0, 256, (per_replica, *steps.info.image_shape), dtype=np.uint8)
        labels = random.integers(0, steps.info.num_classes, (per_replica,), dtype=np.int32)
        return tf.data.Dataset.from_tensors((images, labels, np.arange(per_replica, dtype=np.int64))).repeat()
    return iter(steps.strategy.distribute_datasets_from_function(batches))
