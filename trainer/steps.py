"""Model, optimizers and metrics of a run, and its compiled, distributed training and evaluation steps."""

import contextlib
import dataclasses
import hashlib
import json
import math
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import augment
from trainer import data
from trainer import distribution
from trainer import models
from trainer import optimization
from trainer import progress
from trainer.config import Config
from trainer.errors import TrainingError
from trainer.errors import UsageError


class TrainingState(tf.Module):
    """Progress that must survive a restart; saved in every checkpoint."""

    def __init__(self):
        super().__init__(name="training_state")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.train_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.best_value = tf.Variable(math.nan, dtype=tf.float64, trainable=False)
        self.best_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False)
        self.epochs_without_improvement = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.history_json = tf.Variable("[]", dtype=tf.string, trainable=False)

    @property
    def history(self) -> list[dict]:
        return json.loads(self.history_json.numpy().decode())

    def append_history(self, entry: dict) -> None:
        self.history_json.assign(json.dumps(self.history + [entry]))


@dataclasses.dataclass
class Phase:
    """A stretch of epochs with its own trainable variables, optimizer and compiled step."""

    name: str
    first_epoch: int
    end_epoch: int
    variables: list
    optimizer: keras.optimizers.Optimizer
    set_trainable: callable
    # Trains the head on features computed once (see Trainer._feature_table) instead of on pixels.
    cached: bool = False
    train_loop: callable = None


class Trainer:
    """Owns the model, optimizers, metrics and compiled functions of one run under one strategy."""

    def __init__(self, config: Config, strategy: tf.distribute.Strategy, network: models.Network,
                 info: data.DatasetInfo, builder, precision: str):
        self.config, self.strategy, self.network, self.info = config, strategy, network, info
        self.model = network.model
        self.precision = precision
        self.num_replicas = strategy.num_replicas_in_sync
        self.steps_per_epoch = data.training_steps_per_epoch(
            info.num_train_examples, config.batch_size, config.steps_per_epoch)
        self.eval_steps = data.evaluation_steps(info.num_eval_examples, config.batch_size)
        self.augment_config = augment.AugmentConfig(config.random_flip, config.alternating_flip, config.brightness,
                                                    config.translate, config.mixup, config.cutmix)
        self.jit_compile = distribution.resolve_jit_compile(config.jit_compile, strategy)
        self._train_examples = builder, config.train_split
        self._eval_examples = builder, config.eval_split
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
                tf.zeros([info.num_classes] * 2), trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM)
            self.phases = self._build_phases()
            # The best epoch's weights live in variables saved with every checkpoint, so every
            # worker can restore them without reading another worker's files.
            self.best_weights = [tf.Variable(weight.value, trainable=False) for weight in self.model.weights]
            self.average = (optimization.WeightAverage(self.model.weights, config.ema_decay)
                            if config.ema_decay else None)
            self.lookahead = (optimization.Lookahead(self.model.weights, config.lookahead_steps, config.lookahead_decay)
                              if config.lookahead_steps else None)
        self.state = TrainingState()
        self._eval_dataset = strategy.distribute_datasets_from_function(self._evaluation_batches)
        self._eval_loops = {}

    # Phases and optimizers.

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
                total_steps=(end_epoch - first_epoch) * self.steps_per_epoch, decay=config.lr_schedule)
            optimizer = optimization.create_optimizer(
                config.optimizer, schedule, momentum=config.momentum, weight_decay=config.weight_decay,
                precision=self.precision)
            optimizer.build(variables)
            cached = config.cache_features and name == "train" and self.network.features is not None
            phases.append(Phase(name, first_epoch, end_epoch, variables, optimizer, set_trainable, cached))
        return phases

    def phase_of(self, epoch: int) -> Phase:
        return next(phase for phase in self.phases if phase.first_epoch <= epoch < phase.end_epoch)

    def checkpoint_objects(self) -> dict:
        metric_variables = [variable for metric in (self.train_loss, self.train_accuracy)
                            for variable in metric.variables]
        objects = {"model": self.model, "optimizers": [phase.optimizer for phase in self.phases],
                   "state": self.state, "train_metrics": metric_variables, "best_weights": self.best_weights}
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

    def weights_fingerprint(self) -> str:
        """A hash of every model weight: equal on all workers when they hold identical models."""
        digest = hashlib.sha256()
        for weight in self.model.weights:
            digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight.value)).tobytes())
        return digest.hexdigest()[:16]

    def remember_best_weights(self) -> None:
        with self.evaluation_weights():
            for best, weight in zip(self.best_weights, self.model.weights):
                best.assign(weight.value)

    def restore_best_weights(self) -> None:
        """Puts the best evaluation weights into the model (and the average, so evaluation sees them)."""
        for best, weight in zip(self.best_weights, self.model.weights):
            weight.assign(best)
        if self.average is not None:
            self.average.reset_to_current()

    # Input.

    def _training_batches(self, input_context, start_epoch, end_epoch, start_step):
        builder, split = self._train_examples
        return data.training_batches(
            data.decoded_examples(builder, split, with_index=True), num_examples=self.info.num_train_examples,
            input_context=input_context, global_batch_size=self.config.batch_size,
            steps_per_epoch=self.steps_per_epoch, start_epoch=start_epoch, end_epoch=end_epoch,
            start_step=start_step, seed=self.config.seed)

    def _evaluation_batches(self, input_context):
        builder, split = self._eval_examples
        return data.evaluation_batches(
            data.decoded_examples(builder, split), num_examples=self.info.num_eval_examples,
            input_context=input_context, global_batch_size=self.config.batch_size,
            image_shape=self.info.image_shape)

    def training_iterator(self, phase: Phase):
        start_epoch, start_step = int(self.state.epoch.numpy()), int(self.state.step_in_epoch.numpy())
        dataset = self.strategy.distribute_datasets_from_function(
            lambda context: self._training_batches(context, start_epoch, phase.end_epoch, start_step))
        return iter(dataset)

    # Compiled steps.

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

    def _cached_forward(self, table: tf.Variable):
        """The head on the cached features of the view each example uses this epoch."""
        views = max(self.config.augment_views, 1)

        def forward(images, labels, indices, step):
            del images
            chosen = augment.chosen_views(indices, step, self.steps_per_epoch, views, self.config.seed)
            features = tf.gather_nd(table, tf.stack([indices, chosen], axis=-1))
            return self.network.head(features, training=True), tf.one_hot(labels, self.info.num_classes)

        return forward

    def _feature_table(self) -> tf.Variable:
        """The frozen feature extractor's output for every training example and augmentation view."""
        config, views = self.config, max(self.config.augment_views, 1)
        builder, split = self._train_examples
        count = self.info.num_train_examples
        dimension = self.network.features.output.shape[-1]
        table = np.zeros((count, views, dimension), np.float32)

        @tf.function
        def extract(images, indices, view):
            images = tf.cast(images, tf.float32)
            if self.augment_config.enabled:
                uniforms = augment.view_uniforms(indices, tf.fill(tf.shape(indices), view), config.seed)
                images = augment.transform(images, uniforms, self.augment_config)
            return tf.cast(self.network.features(images, training=False), tf.float32)

        began, done = time.monotonic(), 0
        for view in range(views):
            batches = data.decoded_examples(builder, split, with_index=True).batch(256).prefetch(data.AUTOTUNE)
            for images, _, indices in batches:
                table[indices.numpy(), view] = extract(images, indices, tf.constant(view, tf.int64)).numpy()
                done += len(indices)
                rate = done / (time.monotonic() - began)
                logging.log_every_n_seconds(logging.INFO, "Caching backbone features: %d/%d (%.0f img/s, ETA %s)",
                                            30, done, count * views, rate,
                                            progress.format_duration((count * views - done) / rate))
        logging.info("Cached %d views of %d examples' features in %.1fs.", views, count, time.monotonic() - began)
        with self.strategy.scope():
            return tf.Variable(table, trainable=False)

    def _make_train_loop(self, phase: Phase):
        optimizer, variables = phase.optimizer, phase.variables
        batch_size, clip_norm, average, lookahead = (self.config.batch_size, self.config.clip_grad_norm,
                                                     self.average, self.lookahead)
        phase_steps = (phase.end_epoch - phase.first_epoch) * self.steps_per_epoch
        forward = self._cached_forward(self._feature_table()) if phase.cached else self._forward

        def replica_step(images, labels, indices, step):
            with tf.GradientTape() as tape:
                logits, targets = forward(images, labels, indices, step)
                per_example_loss = self.train_loss_fn(targets, logits)
                loss = tf.nn.compute_average_loss(per_example_loss, global_batch_size=batch_size)
                scaled_loss = optimizer.scale_loss(loss)
            gradients = tape.gradient(scaled_loss, variables)
            if clip_norm:
                gradients = optimization.clip_by_global_norm(gradients, clip_norm, optimizer)
            optimizer.apply_gradients(zip(gradients, variables))
            self.train_loss.update_state(per_example_loss)
            # With mixed targets, accuracy counts the label that dominates the mix.
            self.train_accuracy.update_state(tf.argmax(targets, axis=-1), logits)
            return loss

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

    def augmented_sample(self, count: int = 16) -> np.ndarray:
        """The split's first images as step 0's augmentation shows them to the network (uint8)."""
        builder, split = self._train_examples
        images = data.sample_images(builder, split, count)
        count = len(images)
        labels = tf.range(count, dtype=tf.int32) % self.info.num_classes  # Only mixing reads them.
        images, _ = self._augmented(images, labels, tf.range(count, dtype=tf.int64), tf.constant(0, tf.int64))
        return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8).numpy()

    def train_steps(self, phase: Phase, iterator, num_steps: int) -> np.ndarray:
        """Runs `num_steps` steps; a non-finite loss stops training and names the step."""
        if phase.train_loop is None:
            phase.train_loop = self._make_train_loop(phase)
        first_step = int(self.state.global_step.numpy())
        losses = phase.train_loop(iterator, tf.constant(num_steps), tf.constant(first_step, tf.int64)).numpy()
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            raise TrainingError(
                f"The loss became {losses[bad[0]]} at step {first_step + int(bad[0]) + 1} "
                f"(epoch {int(self.state.epoch.numpy()) + 1}); training stopped and the last good checkpoint "
                "was kept. Try a lower --learning_rate or --precision=float32.")
        return losses


def check_batch_size(batch_size: int, num_replicas: int) -> None:
    if batch_size % num_replicas:
        raise UsageError(f"--batch_size={batch_size} does not split evenly over {num_replicas} replicas; "
                         f"use a multiple of {num_replicas}.")
