"""Distributed image-classifier training job: Keras 3 models, tf.distribute, TFDS."""

import os

# TensorFlow turns its oneDNN CPU kernels on only for CPUs with AVX-512/AMX-class features. On the
# AVX2 CPUs measured here they train the cnn 1.3x faster (benchmarks/run.py), and TensorFlow
# reads this only at import, so set it before anything imports TensorFlow. Export 0 to opt out.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
