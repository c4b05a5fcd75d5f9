"""Distributed image-classifier training job: Keras 3 models, tf.distribute, TFDS."""
