"""The compiled, distributed training loop: augmentation on the device, the gradient step, and --steps_per_loop
steps per tf.function call."""

import functools

import keras
import numpy as np
import tensorflow as tf

from trainer.training import augment
from trainer.training import class_weights
from trainer.training import data
from trainer.training import distribution
from trainer.training import feature_cache
from trainer.training import models
from trainer.training import optimization
from trainer.errors import TrainingError
from trainer.training.model_state import ModelState
from trainer.training.model_state import Phase


class TrainingLoop:
    """Trains a ModelState on its inputs, one compiled loop per phase; the network's hooks join its step."""

    def __init__(self, state: ModelState, inputs: data.Inputs, hooks: models.TrainingHooks):
        self.state, self.inputs, self.hooks = state, inputs, hooks
        self.config, self.strategy, self.info = state.config, state.strategy, inputs.info
        self.steps_per_epoch = state.steps_per_epoch
        self.augment_config = augment.AugmentConfig.from_config(state.config)
        self.jit_compile = distribution.resolve_jit_compile(state.config.jit_compile, state.strategy)
        self.train_loss_fn = keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=state.config.label_smoothing, reduction=None)
        self.class_weights = class_weights.resolve(
            state.config.class_weight, self.info.class_names,
            lambda: data.class_counts(inputs.builder, inputs.train_split, self.info.num_classes))
        self._train_loops = {}

    def weighted_loss(self, targets, logits) -> tf.Tensor:
        """Each example's float32 loss, times its class's --class_weight; a mixed example's weight mixes its
        classes' as its target does. compute_average_loss then divides the sum by the global batch, as unweighted."""
        per_example_loss = self.train_loss_fn(targets, logits)
        if self.class_weights is None:
            return per_example_loss
        weights = tf.reduce_sum(tf.cast(targets, tf.float32) * tf.constant(self.class_weights), axis=-1)
        return tf.cast(per_example_loss, tf.float32) * weights

    @property
    def class_weights_record(self) -> dict | None:
        """--class_weight and the weight it resolved to for each class, for metrics.json; None without it."""
        return class_weights.record(self.config.class_weight, self.info.class_names, self.class_weights)

    def training_iterator(self, phase: Phase, start_epoch: int | None = None, start_step: int = 0):
        """Distributed training batches from (start_epoch, start_step), by default the phase's start, to its end."""
        start_epoch = phase.first_epoch if start_epoch is None else start_epoch
        dataset = self.strategy.distribute_datasets_from_function(
            lambda context: self.inputs.training(context, start_epoch, phase.end_epoch, start_step))
        return iter(dataset)

    def _augmented(self, images, labels, indices, step):
        """The batch as the step's on-device augmentation (and mixing) shows it: (images, soft targets)."""
        config, augment_config = self.config, self.augment_config
        images, targets = tf.cast(images, tf.float32), tf.one_hot(labels, self.info.num_classes)
        seed = augment.step_seed(config.seed, step)
        if augment_config.enabled and config.augment_views:
            images = augment.augment_views(images, indices, step, self.steps_per_epoch, config.augment_views,
                                           config.seed, augment_config)
        elif augment_config.enabled:
            images = augment.augment(images, seed, augment_config, indices, step // self.steps_per_epoch, config.seed)
        if augment_config.mixes:
            images, targets = augment.mix(images, targets, tf.random.experimental.stateless_fold_in(seed, 1),
                                          augment_config.mixup, augment_config.cutmix)
        return images, targets

    def _forward(self, images, labels, indices, step):
        """Augmented, possibly mixed images through the whole model: (logits, soft targets)."""
        images, targets = self._augmented(images, labels, indices, step)
        return self.state.model(images, training=True), targets

    def train_step(self, phase: Phase, forward, images, labels, indices, step) -> tf.Tensor:
        """One replica's training step: forward pass, loss, gradients, update, metrics. Returns its share of the
        global batch's mean loss (the replicas' shares sum to it)."""
        optimizer, variables = phase.optimizer, phase.variables
        with tf.GradientTape() as tape:
            logits, targets = forward(images, labels, indices, step)
            per_example_loss = self.weighted_loss(targets, logits)
            loss = tf.nn.compute_average_loss(per_example_loss, global_batch_size=self.config.batch_size)
            scaled_loss = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, variables)
        gradients = self.hooks.gradients(gradients, variables, step)
        if self.config.clip_grad_norm:
            gradients = optimization.clip_by_global_norm(gradients, self.config.clip_grad_norm, optimizer)
        optimizer.apply_gradients(zip(gradients, variables))
        self.state.train_loss.update_state(per_example_loss)
        # With mixed targets, accuracy counts the label that dominates the mix.
        self.state.train_accuracy.update_state(tf.argmax(targets, axis=-1), logits)
        return loss

    def _phase_forward(self, phase: Phase):
        if not phase.cached:
            return self._forward
        views, network = max(self.config.augment_views, 1), self.state.network
        table = feature_cache.feature_table(network, self.inputs, views, self.config.seed, self.augment_config,
                                            self.strategy)
        return feature_cache.cached_forward(network, table, views=views, steps_per_epoch=self.steps_per_epoch,
                                            seed=self.config.seed, num_classes=self.info.num_classes)

    def _make_train_loop(self, phase: Phase):
        average, lookahead, optimizer = self.state.average, self.state.lookahead, phase.optimizer
        phase_steps = (phase.end_epoch - phase.first_epoch) * self.steps_per_epoch
        replica_step = functools.partial(self.train_step, phase, self._phase_forward(phase))
        # Without XLA the step is traced inline into the loop; with it, it is its own compiled cluster.
        compiled_step = (tf.function(replica_step, jit_compile=True, autograph=False) if self.jit_compile
                         else replica_step)

        # No autograph, here or in anything the step calls: the loop is written out, and the rest has no Python
        # control flow over tensors. Converting this code cost every process about 2 s of CPU before it trained.
        @tf.function(autograph=False)
        def train_loop(iterator, num_steps, first_step):
            def one_step(index, losses):
                images, labels, indices = next(iterator)
                step = first_step + tf.cast(index, tf.int64)
                replica_losses = self.strategy.run(compiled_step, args=(images, labels, indices, step))
                losses = losses.write(index, self.strategy.reduce(tf.distribute.ReduceOp.SUM, replica_losses, None))
                if lookahead is not None:
                    lookahead.update(self.strategy, optimizer.iterations, phase_steps)
                if average is not None:
                    average.update(self.strategy)
                return index + 1, losses

            _, losses = tf.while_loop(lambda index, _: index < num_steps, one_step,
                                      (tf.constant(0), tf.TensorArray(tf.float32, size=num_steps)))
            return losses.stack()

        return train_loop

    def compiled(self, phase: Phase) -> bool:
        """Whether `phase`'s loop has run before, so a call to it costs no tracing or compilation."""
        return phase.name in self._train_loops

    def train(self, phase: Phase, iterator, num_steps: int, first_step: int = 0) -> np.ndarray:
        """Runs `num_steps` steps from global step `first_step`; returns their losses. A non-finite loss stops
        training and names the step."""
        if phase.name not in self._train_loops:
            self._train_loops[phase.name] = self._make_train_loop(phase)
        losses = self._train_loops[phase.name](iterator, tf.constant(num_steps),
                                               tf.constant(first_step, tf.int64)).numpy()
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            step = first_step + int(bad[0]) + 1
            raise TrainingError(
                f"The loss became {losses[bad[0]]} at step {step} (epoch {(step - 1) // self.steps_per_epoch + 1}); "
                "training stopped and the last good checkpoint was kept. Try a lower --learning_rate or "
                "--precision=float32.")
        return losses

    def augmented_sample(self, count: int = 16) -> np.ndarray:
        """The split's first images as step 0's augmentation shows them to the network (uint8)."""
        images = self.inputs.training_sample(count)
        count = len(images)
        labels = tf.range(count, dtype=tf.int32) % self.info.num_classes  # Only mixing reads them.
        images, _ = self._augmented(images, labels, tf.range(count, dtype=tf.int64), tf.constant(0, tf.int64))
        return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8).numpy()
