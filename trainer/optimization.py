"""Optimizers and learning-rate schedules."""

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="trainer")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from zero to `peak`, then constant or cosine decay to zero at `total_steps`."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, decay: str = "constant"):
        self.peak, self.warmup_steps, self.total_steps, self.decay = peak, warmup_steps, total_steps, decay

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        peak = tf.constant(self.peak, tf.float32)
        warmup = tf.maximum(float(self.warmup_steps), 1.0)
        decay_steps = tf.maximum(float(self.total_steps - self.warmup_steps), 1.0)
        progress = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        if self.decay == "cosine":
            after_warmup = peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
        else:
            after_warmup = peak
        warming = peak * (step + 1.0) / warmup
        return tf.where(step < self.warmup_steps, warming, after_warmup)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "decay": self.decay}


def create_optimizer(name: str, schedule, *, momentum: float, weight_decay: float,
                     precision: str) -> keras.optimizers.Optimizer:
    """The optimizer for one training phase; float16 gets dynamic loss scaling."""
    if name == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=momentum, nesterov=True,
                                         weight_decay=weight_decay or None)
    elif name == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
    else:
        optimizer = keras.optimizers.Adam(schedule)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(keras.ops.convert_to_numpy(inner.learning_rate))
