"""Optimizers, learning-rate schedules, gradient clipping and the moving average of the weights."""

import math

import keras
import tensorflow as tf

# Step decay divides the rate by 10 at these fractions of the phase (BiT's HyperRule).
STEP_DECAY_AT = (0.3, 0.6, 0.9)
# One-cycle rises for this share of the phase when no warmup is given.
ONE_CYCLE_RISE = 0.2


@keras.saving.register_keras_serializable(package="trainer")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from zero to `peak`, then constant, cosine, step or linear ("onecycle") decay."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, decay: str = "constant",
                 start_fraction: float = 0.0, end_fraction: float = 0.0):
        if decay == "onecycle" and warmup_steps == 0:
            warmup_steps = int(ONE_CYCLE_RISE * total_steps)
        self.peak, self.warmup_steps, self.total_steps, self.decay = peak, warmup_steps, total_steps, decay
        self.start_fraction, self.end_fraction = start_fraction, end_fraction

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        peak = tf.constant(self.peak, tf.float32)
        decay_steps = tf.maximum(float(self.total_steps - self.warmup_steps), 1.0)
        progress = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        if self.decay == "cosine":
            after_warmup = peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
        elif self.decay == "step":
            drops = tf.add_n([tf.cast(progress >= boundary, tf.float32) for boundary in STEP_DECAY_AT])
            after_warmup = peak * tf.pow(0.1, drops)
        elif self.decay == "onecycle":
            after_warmup = peak * (1.0 - (1.0 - self.end_fraction) * progress)
        else:
            after_warmup = peak
        if self.start_fraction:
            # airbench94's warmup: a line from start_fraction * peak at step 0 to the peak at warmup_steps.
            share = step / tf.maximum(float(self.warmup_steps), 1.0)
            warming = peak * (self.start_fraction + (1.0 - self.start_fraction) * share)
        else:
            warming = peak * (step + 1.0) / tf.maximum(float(self.warmup_steps), 1.0)
        return tf.where(step < self.warmup_steps, warming, after_warmup)

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "decay": self.decay, "start_fraction": self.start_fraction, "end_fraction": self.end_fraction}


def create_optimizer(name: str, schedule, *, momentum: float, weight_decay: float,
                     precision: str, decay_biases: bool = False) -> keras.optimizers.Optimizer:
    """The optimizer for one training phase; float16 gets dynamic loss scaling.

    Weight decay is decoupled (scaled by the learning rate, not added to the loss) and spares
    biases and BatchNorm scales and offsets, unless `decay_biases`: airbench94 decays its BatchNorm
    offsets at the kernels' rate (per step, the same fraction; the offsets' 64x learning rate is not
    applied to their decay). Only the whitening bias stays spared: airbench94 decays it too, but only
    while it trains, and ours keeps no decay off once it is frozen (see --whiten_bias_epochs).
    """
    if name == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=momentum, nesterov=True,
                                         weight_decay=weight_decay or None)
    elif name == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
    else:
        optimizer = keras.optimizers.Adam(schedule, weight_decay=weight_decay or None)
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias"] if decay_biases else ["bias", "gamma", "beta"])
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return float(keras.ops.convert_to_numpy(inner.learning_rate))


def clip_by_global_norm(gradients: list, clip_norm: float, optimizer: keras.optimizers.Optimizer) -> list:
    """Clips the global batch's gradient, in replica context, to `clip_norm`.

    Keras optimizers clip each replica's partial gradient before summing across replicas, which
    is not the global norm. So: sum across replicas here, clip, and hand each replica 1/N of the
    result, which the optimizer's own cross-replica sum turns back into the clipped gradient.
    Loss-scaled gradients are unscaled for the norm and scaled back for the optimizer.
    """
    context = tf.distribute.get_replica_context()
    scale = getattr(optimizer, "dynamic_scale", None)
    scale = tf.cast(scale, tf.float32) if scale is not None else tf.constant(1.0)
    present = [index for index, gradient in enumerate(gradients) if gradient is not None]
    summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [gradients[index] / scale for index in present])
    clipped, _ = tf.clip_by_global_norm(summed, clip_norm)
    result = list(gradients)
    for index, gradient in zip(present, clipped):
        result[index] = gradient * scale / context.num_replicas_in_sync
    return result


class WeightAverage:
    """Exponential moving average of a model's floating-point weights (BatchNorm statistics included).

    Evaluation, best-weight snapshots and the export use the average instead of the raw weights.
    The decay ramps up as (1 + n) / (10 + n) over the first updates, so early weights fade fast.
    """

    def __init__(self, weights: list, decay: float):
        self.decay = decay
        self.weights = [weight for weight in weights if weight.dtype in ("float16", "bfloat16", "float32", "float64")]
        self.averages = [tf.Variable(weight.value, trainable=False) for weight in self.weights]
        self._raw = [tf.Variable(weight.value, trainable=False) for weight in self.weights]
        self.updates = tf.Variable(0, dtype=tf.int64, trainable=False)

    def update(self, strategy: tf.distribute.Strategy) -> None:
        """Folds the current weights in; call in cross-replica context after each step."""
        count = tf.cast(self.updates.assign_add(1), tf.float32)
        decay = tf.minimum(self.decay, (1.0 + count) / (10.0 + count))
        for average, weight in zip(self.averages, self.weights):
            strategy.extended.update(average, lambda mean, value: mean.assign(mean * decay + value * (1.0 - decay)),
                                     args=(weight.value,), group=False)

    def swap_in(self) -> None:
        """Puts the averages into the model, keeping the raw weights aside."""
        for raw, average, weight in zip(self._raw, self.averages, self.weights):
            raw.assign(weight.value)
            weight.assign(average)

    def swap_out(self) -> None:
        for raw, weight in zip(self._raw, self.weights):
            weight.assign(raw)

    def reset_to_current(self) -> None:
        for average, weight in zip(self.averages, self.weights):
            average.assign(weight.value)

    def checkpoint_objects(self) -> dict:
        return {"averages": self.averages, "updates": self.updates}


class Lookahead:
    """Lookahead as hlb-CIFAR10 and airbench use it: slow weights that the training weights return to.

    Every `every` steps the slow weights move toward the current ones by 1 - decay, and training
    continues from the slow weights. The decay ramps up as progress^3 to `decay ** every` over a phase,
    so early training is untouched and late training is smoothed; the phase ends on the slow weights.
    BatchNorm statistics are included, as in airbench.
    """

    def __init__(self, weights: list, every: int, decay: float):
        self.every, self.decay = every, decay
        self.weights = [weight for weight in weights if weight.dtype in ("float16", "bfloat16", "float32", "float64")]
        self.slow = [tf.Variable(weight.value, trainable=False) for weight in self.weights]

    def update(self, strategy: tf.distribute.Strategy, steps_done, phase_steps: int) -> None:
        """Call in cross-replica context after each step, with the phase's count of steps done."""
        steps_done = tf.cast(steps_done, tf.int64)

        def pull():
            progress = tf.cast(steps_done, tf.float32) / float(max(phase_steps, 1))
            self._merge(strategy, self.decay ** self.every * tf.minimum(progress, 1.0) ** 3)

        tf.cond(steps_done % self.every == 0, pull, lambda: None)

    def finish(self, strategy: tf.distribute.Strategy) -> None:
        """Ends a phase on the slow weights (airbench's final update, with decay 1)."""
        self._merge(strategy, tf.constant(1.0))

    def _merge(self, strategy: tf.distribute.Strategy, decay: tf.Tensor) -> None:
        for slow, weight in zip(self.slow, self.weights):
            strategy.extended.update(slow, lambda mean, value: mean.assign(mean * decay + value * (1.0 - decay)),
                                     args=(weight.value,), group=False)
            strategy.extended.update(weight.value, lambda variable, value: variable.assign(value),
                                     args=(slow,), group=False)
