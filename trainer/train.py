"""The distributed training loop: phases, epochs, evaluation, checkpoints and early stopping."""

import dataclasses
import json
import math
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer import augment
from trainer import checkpoints
from trainer import data
from trainer import distribution
from trainer import export
from trainer import models
from trainer import optimization
from trainer import progress
from trainer import reports
from trainer import storage
from trainer import summaries
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
        self.augment_config = augment.AugmentConfig(config.random_flip, config.brightness, config.translate)
        self.jit_compile = distribution.resolve_jit_compile(config.jit_compile, strategy)
        self._train_examples = builder, config.train_split
        self._eval_examples = builder, config.eval_split
        self.train_loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
        self.eval_loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        with strategy.scope():
            self.train_loss = keras.metrics.Mean("train_loss")
            self.train_accuracy = keras.metrics.SparseCategoricalAccuracy("train_accuracy")
            self.eval_loss = keras.metrics.Mean("eval_loss")
            self.eval_accuracy = keras.metrics.SparseCategoricalAccuracy("eval_accuracy")
            self.phases = self._build_phases()
        self.state = TrainingState()
        self._eval_dataset = strategy.distribute_datasets_from_function(self._evaluation_batches)
        self._eval_loop = self._make_eval_loop()

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
            phases.append(Phase(name, first_epoch, end_epoch, variables, optimizer, set_trainable))
        return phases

    def phase_of(self, epoch: int) -> Phase:
        return next(phase for phase in self.phases if phase.first_epoch <= epoch < phase.end_epoch)

    def checkpoint_objects(self) -> dict:
        metric_variables = [variable for metric in (self.train_loss, self.train_accuracy)
                            for variable in metric.variables]
        return {"model": self.model, "optimizers": [phase.optimizer for phase in self.phases],
                "state": self.state, "train_metrics": metric_variables}

    # Input.

    def _training_batches(self, input_context, start_epoch, end_epoch, start_step):
        builder, split = self._train_examples
        return data.training_batches(
            data.decoded_examples(builder, split), num_examples=self.info.num_train_examples,
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

    def _make_train_loop(self, phase: Phase):
        model, optimizer, variables = self.model, phase.optimizer, phase.variables
        num_classes, batch_size, seed = self.info.num_classes, self.config.batch_size, self.config.seed

        def replica_step(images, labels, step):
            images = tf.cast(images, tf.float32)
            if self.augment_config.enabled:
                images = augment.augment(images, augment.step_seed(seed, step), self.augment_config)
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                per_example_loss = self.train_loss_fn(tf.one_hot(labels, num_classes), logits)
                loss = tf.nn.compute_average_loss(per_example_loss, global_batch_size=batch_size)
                scaled_loss = optimizer.scale_loss(loss)
            gradients = tape.gradient(scaled_loss, variables)
            optimizer.apply_gradients(zip(gradients, variables))
            self.train_loss.update_state(per_example_loss)
            self.train_accuracy.update_state(labels, logits)
            return loss

        compiled_step = tf.function(replica_step, jit_compile=self.jit_compile)

        @tf.function
        def train_loop(iterator, num_steps, first_step):
            losses = tf.TensorArray(tf.float32, size=num_steps)
            for index in tf.range(num_steps):
                images, labels = next(iterator)
                step = first_step + tf.cast(index, tf.int64)
                replica_losses = self.strategy.run(compiled_step, args=(images, labels, step))
                losses = losses.write(index, self.strategy.reduce(tf.distribute.ReduceOp.SUM, replica_losses, None))
            return losses.stack()

        return train_loop

    def _make_eval_loop(self):
        model = self.model

        def replica_step(images, labels):
            logits = model(tf.cast(images, tf.float32), training=False)
            weights = tf.cast(labels != data.PADDING_LABEL, tf.float32)
            labels = tf.maximum(labels, 0)
            self.eval_loss.update_state(self.eval_loss_fn(labels, logits), sample_weight=weights)
            self.eval_accuracy.update_state(labels, logits, sample_weight=weights)

        compiled_step = tf.function(replica_step, jit_compile=self.jit_compile)

        @tf.function
        def eval_loop(iterator, num_steps):
            for _ in tf.range(num_steps):
                images, labels = next(iterator)
                self.strategy.run(compiled_step, args=(images, labels))

        return eval_loop

    def evaluate(self) -> dict:
        for metric in (self.eval_loss, self.eval_accuracy):
            metric.reset_state()
        self._eval_loop(iter(self._eval_dataset), tf.constant(self.eval_steps))
        return {"eval_loss": float(self.eval_loss.result()), "eval_accuracy": float(self.eval_accuracy.result())}

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


def run(config: Config) -> dict:
    """Trains, evaluates and exports as `config` says, resuming from model_dir; returns the metrics."""
    started = time.monotonic()
    distribution.configure_host_devices(config.cpu_devices)
    strategy = distribution.create_strategy(config)
    check_batch_size(config.batch_size, strategy.num_replicas_in_sync)
    chief = distribution.is_chief(strategy)
    paths = storage.RunPaths.under(config.model_dir)
    storage.prepare_model_dir(paths, config, write=chief)
    precision = distribution.resolve_precision(config, strategy)
    previous_policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        keras.utils.set_random_seed(config.seed)
        builder = data.load_builder(config.dataset, config.data_dir)
        info = data.dataset_info(builder, config.train_split, config.eval_split)
        # A checkpoint overwrites the initial weights, so a resumed run need not fetch them again.
        resuming = tf.train.latest_checkpoint(paths.checkpoint_dir) is not None
        with strategy.scope():
            network = models.build(config.model, image_shape=info.image_shape, num_classes=info.num_classes,
                                   image_size=config.image_size, dropout=config.dropout,
                                   weights="none" if resuming else config.weights)
        trainer = Trainer(config, strategy, network, info, builder, precision)
        store = checkpoints.CheckpointStore(
            paths.checkpoint_dir, training_objects=trainer.checkpoint_objects(),
            best_objects={"model": trainer.model}, is_chief=chief, task_id=_task_id(strategy))
        store.restore_latest()
        loop = _Loop(trainer, store, paths, chief)
        return loop.run(precision, started)
    finally:
        keras.mixed_precision.set_dtype_policy(previous_policy)


def _task_id(strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(resolver.task_id or 0) if resolver is not None and resolver.cluster_spec().jobs else 0


class _Loop:
    """Drives epochs and phases, and writes every output of the run."""

    def __init__(self, trainer: Trainer, store: checkpoints.CheckpointStore, paths: storage.RunPaths, chief: bool):
        self.trainer, self.store, self.paths, self.chief = trainer, store, paths, chief
        self.config, self.state = trainer.config, trainer.state
        self.summaries = summaries.Summaries(paths.log_dir, enabled=chief)
        self.progress = progress.Progress(self.config.total_epochs, trainer.steps_per_epoch)
        # Throughput excludes each compiled loop's first call, which includes tracing and XLA compilation.
        self.timed_images, self.timed_seconds = 0, 0.0

    def run(self, precision: str, started: float) -> dict:
        state, config = self.state, self.config
        if int(state.epoch.numpy()) >= config.total_epochs:
            finished = storage.read_json(self.paths.metrics_file)
            if finished is not None:
                logging.info("The run in %s already finished %d epochs; nothing to do.",
                             self.paths.model_dir, finished["epochs_completed"])
                return finished
        else:
            self.summaries.text("train", int(state.global_step.numpy()), "flags",
                                summaries.flags_markdown(config.to_dict()))
            try:
                self._train()
            finally:
                self.summaries.flush()
        return self._finish(precision, started)

    def _train(self) -> None:
        state, trainer = self.state, self.trainer
        while int(state.epoch.numpy()) < self.config.total_epochs:
            phase = trainer.phase_of(int(state.epoch.numpy()))
            phase.set_trainable()
            logging.info("Phase %s: epochs %d-%d, %d trainable variables.", phase.name, phase.first_epoch + 1,
                         phase.end_epoch, len(phase.variables))
            iterator = trainer.training_iterator(phase)
            while int(state.epoch.numpy()) < phase.end_epoch:
                self._train_epoch(phase, iterator)

    def _train_epoch(self, phase: Phase, iterator) -> None:
        state, trainer, config = self.state, self.trainer, self.config
        epoch = int(state.epoch.numpy())
        self.progress.start_epoch()
        if int(state.step_in_epoch.numpy()) == 0:
            trainer.train_loss.reset_state()
            trainer.train_accuracy.reset_state()
        epoch_images, epoch_seconds, since_checkpoint = 0, 0.0, 0
        while (step_in_epoch := int(state.step_in_epoch.numpy())) < trainer.steps_per_epoch:
            num_steps = min(config.steps_per_loop, trainer.steps_per_epoch - step_in_epoch)
            first_call = phase.train_loop is None
            began = time.monotonic()
            losses = trainer.train_steps(phase, iterator, num_steps)
            seconds = time.monotonic() - began
            images = num_steps * config.batch_size
            state.step_in_epoch.assign_add(num_steps)
            state.global_step.assign_add(num_steps)
            state.train_seconds.assign_add(seconds)
            epoch_images, epoch_seconds = epoch_images + images, epoch_seconds + seconds
            if not first_call:
                self.timed_images, self.timed_seconds = self.timed_images + images, self.timed_seconds + seconds
            step = int(state.global_step.numpy())
            self.summaries.scalars("train", step, {
                "loss": float(np.mean(losses)), "images_per_second": images / seconds,
                "learning_rate": optimization.current_learning_rate(phase.optimizer)})
            self.progress.update(epoch, step_in_epoch + num_steps, float(trainer.train_loss.result()),
                                 images / seconds)
            since_checkpoint += num_steps
            if config.checkpoint_steps and since_checkpoint >= config.checkpoint_steps \
                    and step_in_epoch + num_steps < trainer.steps_per_epoch:
                self.store.save(step)
                since_checkpoint = 0
        self._end_epoch(phase, epoch, epoch_images / max(epoch_seconds, 1e-9), epoch_seconds)

    def _end_epoch(self, phase: Phase, epoch: int, images_per_second: float, train_seconds: float) -> None:
        state, trainer = self.state, self.trainer
        metrics = {"train_loss": float(trainer.train_loss.result()),
                   "train_accuracy": float(trainer.train_accuracy.result()), **trainer.evaluate()}
        entry = {"epoch": epoch + 1, "phase": phase.name, **metrics, "images_per_second": images_per_second,
                 "train_seconds": train_seconds,
                 "learning_rate": optimization.current_learning_rate(phase.optimizer)}
        state.append_history(entry)
        state.epoch.assign(epoch + 1)
        state.step_in_epoch.assign(0)
        self._early_stopping(phase, epoch, metrics)
        step = int(state.global_step.numpy())
        self.store.save(step)
        self.summaries.scalars("train", step, {"accuracy": metrics["train_accuracy"], "epoch_loss": metrics["train_loss"],
                                               "epoch_images_per_second": images_per_second,
                                               "epoch_seconds": train_seconds})
        self.summaries.scalars("eval", step, {"loss": metrics["eval_loss"], "accuracy": metrics["eval_accuracy"]})
        self.summaries.flush()
        self.progress.end_epoch(epoch, {**metrics, "images_per_second": images_per_second},
                                self.config.total_epochs - int(state.epoch.numpy()))
        if self.chief:
            reports.plot_history(self.paths.history_plot, state.history, self._title())

    def _early_stopping(self, phase: Phase, epoch: int, metrics: dict) -> None:
        """Tracks the best epoch; after `patience` epochs without progress, skips the rest of the phase."""
        patience, state = self.config.early_stopping_patience, self.state
        if not patience:
            return
        if epoch == phase.first_epoch:
            state.epochs_without_improvement.assign(0)
        monitor = self.config.early_stopping_monitor
        value, best = metrics[monitor], float(state.best_value.numpy())
        improved = math.isnan(best) or (value > best if monitor == "eval_accuracy" else value < best)
        if improved:
            state.best_value.assign(value)
            state.best_epoch.assign(epoch + 1)
            state.epochs_without_improvement.assign(0)
            self.store.save_best(int(state.global_step.numpy()))
            return
        state.epochs_without_improvement.assign_add(1)
        if int(state.epochs_without_improvement.numpy()) >= patience and epoch + 1 < phase.end_epoch:
            logging.info("Early stopping: %s has not improved for %d epochs (best %.4f at epoch %d); "
                         "ending the %s phase.", monitor, patience, float(state.best_value.numpy()),
                         int(state.best_epoch.numpy()), phase.name)
            state.epoch.assign(phase.end_epoch)

    def _title(self) -> str:
        return f"{self.config.model} on {self.trainer.info.name}"

    def _finish(self, precision: str, started: float) -> dict:
        trainer, state, config = self.trainer, self.state, self.config
        if config.early_stopping_patience and self.store.restore_best():
            logging.info("Restored the best weights (epoch %d, %s %.4f).", int(state.best_epoch.numpy()),
                         config.early_stopping_monitor, float(state.best_value.numpy()))
        final = trainer.evaluate()
        export_dir = self.paths.export_dir if self.chief else f"{self.paths.export_dir}.worker-temp"
        export.export_model(trainer.model, trainer.info.image_shape, trainer.info.class_names, export_dir)
        if not self.chief:
            tf.io.gfile.rmtree(export_dir)
            return {}
        history = state.history
        metrics = {
            "test_accuracy": final["eval_accuracy"], "test_loss": final["eval_loss"],
            "eval_split": config.eval_split, "epochs_completed": len(history),
            "best_epoch": int(state.best_epoch.numpy()) if config.early_stopping_patience else len(history),
            "train_images_per_second": self.timed_images / self.timed_seconds if self.timed_seconds else None,
            "train_seconds": float(state.train_seconds.numpy()), "session_seconds": time.monotonic() - started,
            "history": history, "class_names": list(trainer.info.class_names), "dataset": trainer.info.name,
            "num_parameters": int(trainer.model.count_params()), "precision": precision,
            "strategy": type(trainer.strategy).__name__, "num_replicas": trainer.num_replicas,
            "flags": config.to_dict(),
        }
        reports.write_metrics(self.paths.metrics_file, metrics)
        reports.plot_history(self.paths.history_plot, history, self._title())
        logging.info("Test accuracy %.4f, loss %.4f on %s. Outputs in %s.", metrics["test_accuracy"],
                     metrics["test_loss"], config.eval_split, self.paths.model_dir)
        return metrics
