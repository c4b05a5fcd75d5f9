"""The training loop: phases and epochs, checkpoints, early stopping, and the run's outputs."""

import math
import os
import tempfile
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

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
from trainer.errors import ClusterError
from trainer.steps import Phase
from trainer.steps import Trainer
from trainer.steps import check_batch_size


# Training images shown to a network that sets weights from data statistics (see models.Network).
DATA_FIT_SAMPLE = 5000


def run(config: Config) -> dict:
    """Trains, evaluates and exports as `config` says, resuming from model_dir; returns the metrics."""
    started = time.monotonic()
    distribution.configure_host_devices(config.cpu_devices)
    strategy = distribution.create_strategy(config)
    check_batch_size(config.batch_size, strategy.num_replicas_in_sync)
    chief = distribution.is_chief(strategy)
    paths, mirror = storage.open_run(config.model_dir, distribution.task_id(strategy))
    if mirror is not None:
        mirror.preflight(write=chief)
        mirror.restore()
    created_directories = storage.prepare_model_dir(paths)
    try:
        return _train(config, strategy, paths, mirror, started)
    except BaseException:
        # A run that fails before writing anything (say, ImageNet weights cannot be downloaded)
        # leaves model_dir as it found it, not with empty folders that look like a run.
        storage.remove_if_empty(created_directories)
        raise


def _train(config: Config, strategy: tf.distribute.Strategy, paths: storage.RunPaths, mirror, started: float) -> dict:
    """`run` once model_dir is ready: builds or restores the trainer, then runs the loop."""
    chief = distribution.is_chief(strategy)
    resuming = storage.check_resume(paths, config)
    precision = distribution.resolve_precision(config, strategy)
    previous_policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        trainer = build_trainer(config, strategy, precision, fresh=not resuming)
        if chief and not resuming:
            storage.write_json(paths.config_file, config.to_dict())
        # Only the chief uploads; it does so after every checkpoint and at the end.
        upload = mirror.upload if mirror is not None and chief else None
        store = checkpoints.CheckpointStore(paths.checkpoint_dir, trainer.checkpoint_objects(), is_chief=chief,
                                            task_id=distribution.task_id(strategy), after_save=upload)
        store.restore_latest()
        return _Loop(trainer, store, paths, chief, upload).run(precision, started)
    except tf.errors.OpError as error:
        # Across workers, an op error is how TensorFlow reports a dead or unreachable peer.
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            raise ClusterError(error) from error
        raise
    finally:
        keras.mixed_precision.set_dtype_policy(previous_policy)


def build_trainer(config: Config, strategy: tf.distribute.Strategy, precision: str, fresh: bool = True) -> Trainer:
    """The data, the network and its Trainer under `strategy`, with the dtype policy already set.

    A fresh network gets its initial weights (ImageNet or a file, and any fit to the data); a run
    that will restore a checkpoint skips them, since the checkpoint overwrites them.
    """
    keras.utils.set_random_seed(config.seed)
    builder = data.load_builder(config.dataset, config.data_dir)
    info = data.dataset_info(builder, config.train_split, config.eval_split)
    with strategy.scope():
        network = models.build(config.model, image_shape=info.image_shape, num_classes=info.num_classes,
                               image_size=config.image_size, dropout=config.dropout,
                               weights=config.weights if fresh else "none")
    if network.fit_to_data is not None and fresh:
        network.fit_to_data(data.sample_images(builder, config.train_split, DATA_FIT_SAMPLE))
    return Trainer(config, strategy, network, info, builder, precision)


class _Loop:
    """Drives epochs and phases, and writes every output of the run."""

    def __init__(self, trainer: Trainer, store: checkpoints.CheckpointStore, paths: storage.RunPaths, chief: bool,
                 upload=None):
        self.trainer, self.store, self.paths, self.chief = trainer, store, paths, chief
        self.upload = upload
        self.config, self.state = trainer.config, trainer.state
        self.summaries = summaries.Summaries(paths.log_dir, enabled=chief)
        self.progress = progress.Progress(self.config.total_epochs, trainer.steps_per_epoch)
        # Throughput excludes each compiled loop's first call, which includes tracing and XLA compilation,
        # unless a session made no other call (then the rate with tracing is all there is).
        self.timed_images, self.timed_seconds = 0, 0.0
        self.all_images, self.all_seconds = 0, 0.0
        self.started = time.monotonic()

    def run(self, precision: str, started: float) -> dict:
        state, config = self.state, self.config
        self.started = started  # Epochs report wall time since the session began, set-up included.
        if int(state.epoch.numpy()) >= config.total_epochs:
            finished = storage.read_json(self.paths.metrics_file)
            if finished is not None:
                logging.info("The run in %s already finished %d epochs; nothing to do.",
                             self.paths.model_dir, finished["epochs_completed"])
                return finished
        else:
            step = int(state.global_step.numpy())
            self.summaries.text("train", step, "flags", summaries.flags_markdown(config.to_dict()))
            if step == 0 and self.chief:
                self.summaries.hparams(config.to_dict(), run_name=os.path.basename(config.model_dir.rstrip("/")))
                self.summaries.image_grid("train", 0, "augmented_inputs", self.trainer.augmented_sample(),
                                          "Training images as the first step's on-device augmentation shows them.")
            guard = checkpoints.PreemptionGuard(self.trainer.strategy, self.store)
            try:
                self._train(guard)
            finally:
                guard.close()
                self.summaries.stop_profiler()
                self.summaries.flush()
        return self._finish(precision, started)

    def _train(self, guard: checkpoints.PreemptionGuard) -> None:
        state, trainer = self.state, self.trainer
        while int(state.epoch.numpy()) < self.config.total_epochs:
            phase = trainer.phase_of(int(state.epoch.numpy()))
            phase.set_trainable()
            logging.info("Phase %s: epochs %d-%d, %d trainable variables.", phase.name, phase.first_epoch + 1,
                         phase.end_epoch, len(phase.variables))
            iterator = trainer.training_iterator(phase)
            while int(state.epoch.numpy()) < phase.end_epoch:
                self._train_epoch(phase, iterator, guard)

    def _train_epoch(self, phase: Phase, iterator, guard: checkpoints.PreemptionGuard) -> None:
        state, trainer, config = self.state, self.trainer, self.config
        epoch = int(state.epoch.numpy())
        self.progress.start_epoch()
        if int(state.step_in_epoch.numpy()) == 0:
            trainer.train_loss.reset_state()
            trainer.train_accuracy.reset_state()
        epoch_images, epoch_seconds, since_checkpoint = 0, 0.0, 0
        while (step_in_epoch := int(state.step_in_epoch.numpy())) < trainer.steps_per_epoch:
            global_step = int(state.global_step.numpy())
            num_steps = self._steps_in_call(global_step, min(config.steps_per_loop,
                                                             trainer.steps_per_epoch - step_in_epoch))
            first_call = phase.train_loop is None
            if config.profile_steps and global_step < config.profile_steps[0] <= global_step + num_steps:
                self.summaries.start_profiler()
            began = time.monotonic()
            losses = trainer.train_steps(phase, iterator, num_steps)
            seconds = time.monotonic() - began
            if config.profile_steps and global_step + num_steps >= config.profile_steps[1]:
                self.summaries.stop_profiler()
            images = num_steps * config.batch_size
            state.step_in_epoch.assign_add(num_steps)
            state.global_step.assign_add(num_steps)
            state.train_seconds.assign_add(seconds)
            epoch_images, epoch_seconds = epoch_images + images, epoch_seconds + seconds
            self.all_images, self.all_seconds = self.all_images + images, self.all_seconds + seconds
            if not first_call:
                self.timed_images, self.timed_seconds = self.timed_images + images, self.timed_seconds + seconds
            step = int(state.global_step.numpy())
            self.summaries.scalars("train", step, {
                "loss": float(np.mean(losses)), "images_per_second": images / seconds,
                "learning_rate": optimization.current_learning_rate(phase.optimizer)})
            self.progress.update(epoch, step_in_epoch + num_steps, step, float(trainer.train_loss.result()),
                                 images / seconds)
            since_checkpoint += num_steps
            if config.checkpoint_steps and since_checkpoint >= config.checkpoint_steps \
                    and step_in_epoch + num_steps < trainer.steps_per_epoch:
                self.store.save(step)
                since_checkpoint = 0
            guard.check(step)
        if trainer.lookahead is not None and epoch + 1 == phase.end_epoch:
            trainer.lookahead.finish(trainer.strategy)
        self._end_epoch(phase, epoch, epoch_images / max(epoch_seconds, 1e-9), epoch_seconds)

    def _steps_in_call(self, global_step: int, num_steps: int) -> int:
        """Shortens a loop call so that --profile_steps' trace starts and stops exactly at its steps."""
        if self.config.profile_steps:
            first, last = self.config.profile_steps
            for boundary in (first - 1, last):
                if global_step < boundary < global_step + num_steps:
                    num_steps = boundary - global_step
        return num_steps

    def _end_epoch(self, phase: Phase, epoch: int, images_per_second: float, train_seconds: float) -> None:
        state, trainer = self.state, self.trainer
        metrics = {"train_loss": float(trainer.train_loss.result()),
                   "train_accuracy": float(trainer.train_accuracy.result()), **trainer.evaluate()}
        entry = {"epoch": epoch + 1, "phase": phase.name, **metrics, "images_per_second": images_per_second,
                 "train_seconds": train_seconds, "elapsed_seconds": time.monotonic() - self.started,
                 "learning_rate": optimization.current_learning_rate(phase.optimizer)}
        state.append_history(entry)
        state.epoch.assign(epoch + 1)
        state.step_in_epoch.assign(0)
        self._early_stopping(phase, epoch, metrics)
        step = int(state.global_step.numpy())
        self.store.save(step)
        self.summaries.scalars("train", step, {
            "accuracy": metrics["train_accuracy"], "epoch_loss": metrics["train_loss"],
            "epoch_images_per_second": images_per_second, "epoch_seconds": train_seconds})
        self.summaries.scalars("eval", step, {"loss": metrics["eval_loss"], "accuracy": metrics["eval_accuracy"]})
        # Reading the counts is a collective under MultiWorkerMirroredStrategy: every worker reads.
        confusion = trainer.confusion_matrix()
        if self.chief:
            self.summaries.png("eval", step, "confusion_matrix", self._confusion_png(confusion, f"epoch {epoch + 1}"))
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
            self.trainer.remember_best_weights()
            return
        state.epochs_without_improvement.assign_add(1)
        if int(state.epochs_without_improvement.numpy()) >= patience and epoch + 1 < phase.end_epoch:
            logging.info("Early stopping: %s has not improved for %d epochs (best %.4f at epoch %d); "
                         "ending the %s phase.", monitor, patience, float(state.best_value.numpy()),
                         int(state.best_epoch.numpy()), phase.name)
            state.epoch.assign(phase.end_epoch)

    def _confusion_png(self, confusion: np.ndarray, when: str) -> bytes:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "confusion.png")
            reports.plot_confusion_matrix(path, confusion, self.trainer.info.class_names,
                                          f"{self._title()}, {self.config.eval_split}, {when}")
            with open(path, "rb") as file:
                return file.read()

    def _title(self) -> str:
        return f"{self.config.model} on {self.trainer.info.name}"

    def _finish(self, precision: str, started: float) -> dict:
        trainer, state, config = self.trainer, self.state, self.config
        if config.early_stopping_patience and int(state.best_epoch.numpy()) > 0:
            trainer.restore_best_weights()
            logging.info("Restored the best weights (epoch %d, %s %.4f).", int(state.best_epoch.numpy()),
                         config.early_stopping_monitor, float(state.best_value.numpy()))
        final = trainer.evaluate(final=True)
        confusion = trainer.confusion_matrix()  # A collective: before the workers part ways below.
        fingerprint = trainer.weights_fingerprint()
        logging.info("Final weights fingerprint %s.", fingerprint)
        export_dir = self.paths.export_dir if self.chief else f"{self.paths.export_dir}.worker-temp"
        with trainer.evaluation_weights():
            export.export_model(trainer.model, trainer.info.image_shape, trainer.info.class_names, export_dir,
                                tta=config.tta, tta_translate=config.tta_translate)
        if not self.chief:
            tf.io.gfile.rmtree(export_dir)
            return {}
        history = state.history
        metrics = {
            "test_accuracy": final["eval_accuracy"], "test_loss": final["eval_loss"],
            "eval_split": config.eval_split, "epochs_completed": len(history),
            "best_epoch": int(state.best_epoch.numpy()) if config.early_stopping_patience else len(history),
            "train_images_per_second": (self.timed_images / self.timed_seconds if self.timed_seconds else
                                        self.all_images / self.all_seconds if self.all_seconds else None),
            "train_seconds": float(state.train_seconds.numpy()), "session_seconds": time.monotonic() - started,
            "history": history, "class_names": list(trainer.info.class_names), "dataset": trainer.info.name,
            "num_parameters": int(trainer.model.count_params()), "precision": precision,
            "strategy": type(trainer.strategy).__name__, "num_replicas": trainer.num_replicas,
            "flags": config.to_dict(), "weights_fingerprint": fingerprint,
            "phases": [{"name": phase.name, "epochs": [phase.first_epoch + 1, phase.end_epoch],
                        "trainable_variables": len(phase.variables),
                        "trainable_parameters": int(sum(np.prod(variable.shape) for variable in phase.variables))}
                       for phase in trainer.phases],
        }
        reports.write_metrics(self.paths.metrics_file, metrics)
        reports.plot_history(self.paths.history_plot, history, self._title())
        step = int(state.global_step.numpy())
        self.summaries.scalars("run", step, {"test_accuracy": metrics["test_accuracy"],
                                             "test_loss": metrics["test_loss"]})
        self.summaries.png("eval", step, "final_confusion_matrix", self._confusion_png(confusion, "final"))
        self.summaries.flush()
        if self.upload is not None:
            self.upload()
        logging.info("Test accuracy %.4f, loss %.4f on %s. Outputs in %s.", metrics["test_accuracy"],
                     metrics["test_loss"], config.eval_split, config.model_dir)
        return metrics
