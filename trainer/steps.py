"""A run's model, optimizers and metrics under one strategy, and its compiled, distributed training and evaluation
steps."""

import contextlib
import dataclasses
import functools
import hashlib

import keras
import numpy as np
import tensorflow as tf

from trainer import augment
from trainer import data
from trainer import distribution
from trainer import feature_cache
from trainer import models
from trainer import network as network_lib
from trainer import optimization
from trainer.config import Config
from trainer.errors import TrainingError
from trainer.errors import UsageError


@dataclasses.dataclass
class Phase:
    """A stretch of epochs with its own trainable variables and optimizer."""

    name: str
    first_epoch: int
    end_epoch: int
    variables: list
    optimizer: keras.optimizers.Optimizer
    set_trainable: callable
    # Trains the head on features computed once (trainer.feature_cache) instead of on pixels.
    cached: bool = False


class Steps:
    """Owns the model, optimizers, metrics and compiled step loops of one run under one strategy."""

    def __init__(self, config: Config, strategy: tf.distribute.Strategy, network: network_lib.Network,
                 inputs: data.Inputs, precision: str):
        self.config, self.strategy, self.network, self.inputs = config, strategy, network, inputs
        self.info, self.model, self.precision = inputs.info, network.model, precision
        self.num_replicas = strategy.num_replicas_in_sync
        self.steps_per_epoch = inputs.steps_per_epoch
        self.eval_steps = data.evaluation_steps(self.info.num_eval_examples, config.batch_size)
        self.augment_config = augment.AugmentConfig.from_config(config)
        self.jit_compile = distribution.resolve_jit_compile(config.jit_compile, strategy)
        self.train_loss_fn = keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing, reduction=None)
        self.eval_loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)
        with strategy.scope():
            self.train_loss = keras.metrics.Mean("train_loss")
            self.train_accuracy = keras.metrics.SparseCategoricalAccuracy("train_accuracy")
            self.eval_loss = keras.metrics.Mean("eval_loss")
            self.eval_accuracy = keras.metrics.SparseCategoricalAccuracy("eval_accuracy")
            # Counts of (true, predicted) pairs; each replica counts its own examples, reads sum them.
            self.eval_confusion = tf.Variable(
                tf.zeros([self.info.num_classes] * 2), trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ, aggregation=tf.VariableAggregation.SUM)
            self.phases = self._build_phases()
            self.average = (optimization.WeightAverage(self.model.weights, config.ema_decay)
                            if config.ema_decay else None)
            self.lookahead = (optimization.Lookahead(self.model.weights, config.lookahead_steps, config.lookahead_decay)
                              if config.lookahead_steps else None)
        self._eval_dataset = strategy.distribute_datasets_from_function(inputs.evaluation)
        self._train_loops, self._eval_loops = {}, {}

    # Phases and weights.

    def _build_phases(self) -> list[Phase]:
        config, phases = self.config, []

        def freeze_backbone():
            if self.network.backbone is not None:
                self.network.backbone.trainable = False

        def unfreeze_top():
            models.unfreeze_top_stages(self.network, config.fine_tune_stages)

        plans = [("train", 0, config.epochs, config.learning_rate, freeze_backbone)]
        if config.fine_tune_epochs:
            plans.append(("fine_tune", config.epochs, config.total_epochs, config.fine_tune_learning_rate,
                          unfreeze_top))
        for name, first_epoch, end_epoch, learning_rate, set_trainable in plans:
            set_trainable()
            variables = list(self.model.trainable_variables)
            schedule = optimization.WarmupSchedule(
                learning_rate, warmup_steps=int(config.warmup_epochs * self.steps_per_epoch),
                total_steps=(end_epoch - first_epoch) * self.steps_per_epoch, decay=config.lr_schedule,
                start_fraction=config.lr_start_fraction, end_fraction=config.lr_end_fraction)
            optimizer = optimization.create_optimizer(
                config.optimizer, schedule, momentum=config.momentum, weight_decay=config.weight_decay,
                precision=self.precision, decay_biases=config.decay_biases)
            optimizer.build(variables)
            cached = config.cache_features and name == "train" and self.network.features is not None
            phases.append(Phase(name, first_epoch, end_epoch, variables, optimizer, set_trainable, cached))
        return phases

    def phase_of(self, epoch: int) -> Phase:
        return next(phase for phase in self.phases if phase.first_epoch <= epoch < phase.end_epoch)

    def end_phase(self) -> None:
        """After a phase's last step: Lookahead ends the phase on its slow weights."""
        if self.lookahead is not None:
            self.lookahead.finish(self.strategy)

    def checkpoint_objects(self) -> dict:
        """What a checkpoint must hold of these steps (the training loop adds its own state)."""
        metric_variables = [variable for metric in (self.train_loss, self.train_accuracy)
                            for variable in metric.variables]
        objects = {"model": self.model, "optimizers": [phase.optimizer for phase in self.phases],
                   "train_metrics": metric_variables}
        # The model's checkpoint holds its weights only. Its random layers' seed states (Dropout's)
        # must come back too, or a resumed run draws other dropout masks than the run it continues.
        weight_ids = {id(weight) for weight in self.model.weights}
        random_states = [variable for variable in self.model.variables if id(variable) not in weight_ids]
        if random_states:
            objects["random_states"] = random_states
        if self.average is not None:
            objects["weight_average"] = self.average.checkpoint_objects()
        if self.lookahead is not None:
            objects["lookahead"] = self.lookahead.slow
        return objects

    @contextlib.contextmanager
    def evaluation_weights(self):
        """The weights evaluation, best-weight snapshots and the export use: the average, if kept."""
        if self.average is None:
            yield
            return
        self.average.swap_in()
        try:
            yield
        finally:
            self.average.swap_out()

    def set_weights(self, values: list) -> None:
        """Puts `values` into the model's weights (and restarts the average from them, so evaluation sees them)."""
        for value, weight in zip(values, self.model.weights):
            weight.assign(value)
        if self.average is not None:
            self.average.reset_to_current()

    def weights_fingerprint(self) -> str:
        """A hash of every model weight: equal on all workers when they hold identical models."""
        digest = hashlib.sha256()
        for weight in self.model.weights:
            digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight.value)).tobytes())
        return digest.hexdigest()[:16]

    # Training.

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
        return self.model(images, training=True), targets

    def train_step(self, phase: Phase, forward, images, labels, indices, step) -> tf.Tensor:
        """One replica's training step: forward pass, loss, gradients, update, metrics. Returns its share of the
        global batch's mean loss (the replicas' shares sum to it)."""
        optimizer, variables = phase.optimizer, phase.variables
        with tf.GradientTape() as tape:
            logits, targets = forward(images, labels, indices, step)
            per_example_loss = self.train_loss_fn(targets, logits)
            loss = tf.nn.compute_average_loss(per_example_loss, global_batch_size=self.config.batch_size)
            scaled_loss = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, variables)
        if self.config.whiten_bias_epochs:
            gradients = self._freeze_whitening_bias(gradients, variables, step)
        if self.config.clip_grad_norm:
            gradients = optimization.clip_by_global_norm(gradients, self.config.clip_grad_norm, optimizer)
        optimizer.apply_gradients(zip(gradients, variables))
        self.train_loss.update_state(per_example_loss)
        # With mixed targets, accuracy counts the label that dominates the mix.
        self.train_accuracy.update_state(tf.argmax(targets, axis=-1), logits)
        return loss

    def _freeze_whitening_bias(self, gradients: list, variables: list, step) -> list:
        """airbench94 trains the whitening bias in its first --whiten_bias_epochs epochs only: no gradient after."""
        frozen = step // self.steps_per_epoch >= self.config.whiten_bias_epochs
        bias = self.model.get_layer("whitening").bias
        return [tf.where(frozen, tf.zeros_like(gradient), gradient) if variable is bias else gradient
                for gradient, variable in zip(gradients, variables)]

    def stop_whitening_bias(self, phase: Phase) -> None:
        """Zeroes the frozen whitening bias's momentum: with a zero gradient it would still drift on it, where
        airbench94 skips the bias altogether (it is spared from weight decay too)."""
        optimizer = getattr(phase.optimizer, "inner_optimizer", phase.optimizer)
        bias = self.model.get_layer("whitening").bias
        for slot in optimizer.variables:
            if slot.path.endswith(f"{bias.path.replace('/', '_')}_momentum"):
                slot.assign(tf.zeros_like(slot))

    def _phase_forward(self, phase: Phase):
        if not phase.cached:
            return self._forward
        views = max(self.config.augment_views, 1)
        table = feature_cache.feature_table(self.network, self.inputs, views, self.config.seed, self.augment_config,
                                            self.strategy)
        return feature_cache.cached_forward(self.network, table, views=views, steps_per_epoch=self.steps_per_epoch,
                                            seed=self.config.seed, num_classes=self.info.num_classes)

    def _make_train_loop(self, phase: Phase):
        average, lookahead, optimizer = self.average, self.lookahead, phase.optimizer
        phase_steps = (phase.end_epoch - phase.first_epoch) * self.steps_per_epoch
        replica_step = functools.partial(self.train_step, phase, self._phase_forward(phase))
        # Without XLA the step is traced inline into the loop; with it, it is its own compiled cluster.
        compiled_step = tf.function(replica_step, jit_compile=True) if self.jit_compile else replica_step

        @tf.function
        def train_loop(iterator, num_steps, first_step):
            losses = tf.TensorArray(tf.float32, size=num_steps)
            for index in tf.range(num_steps):
                images, labels, indices = next(iterator)
                step = first_step + tf.cast(index, tf.int64)
                replica_losses = self.strategy.run(compiled_step, args=(images, labels, indices, step))
                losses = losses.write(index, self.strategy.reduce(tf.distribute.ReduceOp.SUM, replica_losses, None))
                if lookahead is not None:
                    lookahead.update(self.strategy, optimizer.iterations, phase_steps)
                if average is not None:
                    average.update(self.strategy)
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

    def reset_train_metrics(self) -> None:
        for metric in (self.train_loss, self.train_accuracy):
            metric.reset_state()

    def train_metrics(self) -> dict:
        """The training loss and accuracy since the last reset (the epoch so far)."""
        return {"train_loss": float(self.train_loss.result()), "train_accuracy": float(self.train_accuracy.result())}

    def augmented_sample(self, count: int = 16) -> np.ndarray:
        """The split's first images as step 0's augmentation shows them to the network (uint8)."""
        images = self.inputs.training_sample(count)
        count = len(images)
        labels = tf.range(count, dtype=tf.int32) % self.info.num_classes  # Only mixing reads them.
        images, _ = self._augmented(images, labels, tf.range(count, dtype=tf.int64), tf.constant(0, tf.int64))
        return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8).numpy()

    # Evaluation.

    def _make_eval_loop(self, tta_translate: int):
        model, tta = self.model, self.config.tta

        def replica_step(images, labels):
            probabilities = models.test_time_probabilities(model, tf.cast(images, tf.float32), tta, tta_translate)
            weights = tf.cast(labels != data.PADDING_LABEL, tf.float32)
            labels = tf.maximum(labels, 0)
            self.eval_loss.update_state(self.eval_loss_fn(labels, probabilities), sample_weight=weights)
            self.eval_accuracy.update_state(labels, probabilities, sample_weight=weights)
            self.eval_confusion.assign_add(tf.math.confusion_matrix(
                labels, tf.argmax(probabilities, axis=-1), self.info.num_classes, weights=weights, dtype=tf.float32))

        compiled_step = tf.function(replica_step, jit_compile=True) if self.jit_compile else replica_step

        @tf.function
        def eval_loop(iterator, num_steps):
            for _ in tf.range(num_steps):
                images, labels = next(iterator)
                self.strategy.run(compiled_step, args=(images, labels))

        return eval_loop

    def evaluate(self, final: bool = False) -> dict:
        """Loss and accuracy on the evaluation split, with the evaluation weights.

        Only the final evaluation adds --tta_translate's shifted views: they triple the cost of an
        evaluation, which every epoch would pay.
        """
        tta_translate = self.config.tta_translate if final else 0
        if tta_translate not in self._eval_loops:
            self._eval_loops[tta_translate] = self._make_eval_loop(tta_translate)
        for metric in (self.eval_loss, self.eval_accuracy):
            metric.reset_state()
        self.eval_confusion.assign(tf.zeros_like(self.eval_confusion))
        with self.evaluation_weights():
            self._eval_loops[tta_translate](iter(self._eval_dataset), tf.constant(self.eval_steps))
        return {"eval_loss": float(self.eval_loss.result()), "eval_accuracy": float(self.eval_accuracy.result())}

    def confusion_matrix(self) -> np.ndarray:
        """Counts of (true class, predicted class) from the last evaluation."""
        return np.rint(self.eval_confusion.numpy()).astype(np.int64)


def check_batch_size(batch_size: int, num_replicas: int) -> None:
    if batch_size % num_replicas:
        raise UsageError(f"--batch_size={batch_size} does not split evenly over {num_replicas} replicas; "
                         f"use a multiple of {num_replicas}.")
