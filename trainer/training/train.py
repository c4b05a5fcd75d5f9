"""The training loop: phases and epochs, checkpoints, early stopping, and the run's outputs."""

import contextlib
import os
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from trainer.training import accelerators
from trainer.training import checkpoints
from trainer import cli
from trainer.training import data
from trainer.training import distribution
from trainer.training import early_stopping
from trainer.training import folder_dataset
from trainer.training import gcs
from trainer.training import hypertune
from trainer.training import log_upload
from trainer.training import models
from trainer.training import optimization
from trainer.training import progress
from trainer.results import reports
from trainer.training import storage
from trainer.training import summaries
from trainer.config import Config
from trainer.errors import ClusterError
from trainer.errors import UsageError
from trainer.errors import one_line
from trainer.training.run_directory import RunDirectory
from trainer.training.run_outputs import RunOutputs
from trainer.training.steps import Phase
from trainer.training.steps import Steps
from trainer.training.steps import check_batch_size

# Training images shown to a network that sets weights from data statistics (see network.Network).
DATA_FIT_SAMPLE = 5000


def run(config: Config) -> dict:
    """Trains, evaluates and exports as `config` says, resuming from model_dir; returns the metrics."""
    started = time.monotonic()
    distribution.configure_host_devices(config.cpu_devices)
    strategy = accelerators.create_strategy(config)
    check_batch_size(config.batch_size, strategy.num_replicas_in_sync)
    chief = distribution.is_chief(strategy)
    with RunDirectory(config, distribution.task_id(strategy), chief) as run_directory:
        paths = run_directory.paths
        precision = distribution.resolve_precision(config, strategy)
        accelerators.log_devices(strategy, precision, distribution.resolve_jit_compile(config.jit_compile, strategy))
        with op_errors_name_their_cause(config, strategy), distribution.dtype_policy(precision):
            check_memory(config)
            with out_of_memory_names_the_flags(config, "building the model"):
                steps = build_steps(config, strategy, precision, fresh=not run_directory.resuming)
            run_directory.write_config()  # After the build: a run that cannot build its model writes nothing.
            if chief:
                folder_dataset.write_skipped_files(steps.inputs.builder, paths.model_dir)
            with run_directory.uploads() as uploader:
                trainer = Trainer(steps, paths, chief, uploader)
                with log_upload.live_logs(run_directory.log_mirror, paths.log_dir, trainer.summaries.flush,
                                          config.log_upload_seconds):
                    return trainer.run(started)


@contextlib.contextmanager
def op_errors_name_their_cause(config: Config, strategy: tf.distribute.Strategy):
    """A TensorFlow op error becomes the error that names its cause, where one is known: a damaged data shard,
    or a lost worker of the cluster."""
    try:
        yield
    except tf.errors.OpError as error:
        damaged = data.damaged_shard_error(config.dataset, config.data_dir) \
            if isinstance(error, tf.errors.DataLossError) else None
        if damaged is not None:
            raise damaged from error
        # Across workers, an op error is how TensorFlow reports a dead or unreachable peer.
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            raise ClusterError(error) from error
        raise


def check_memory(config: Config) -> None:
    """Refuses an --image_size whose resized batch alone would not fit in this host's memory, before anything is
    loaded (an accelerator's memory is smaller still; out_of_memory_names_the_flags catches what gets past this)."""
    if not config.image_size or not hasattr(os, "sysconf"):
        return
    needed = config.batch_size * config.image_size ** 2 * 3 * 4  # float32 RGB, every replica of this host.
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > available:
        raise UsageError(f"--image_size={config.image_size} with --batch_size={config.batch_size} needs "
                         f"{needed / 2**30:,.0f} GiB for one batch of resized images alone, more than this machine's "
                         f"{available / 2**30:,.0f} GiB; lower --image_size or --batch_size.")


@contextlib.contextmanager
def out_of_memory_names_the_flags(config: Config, doing: str):
    """An out-of-memory error becomes one line naming the flags that set the memory a run needs."""
    try:
        yield
    except tf.errors.ResourceExhaustedError as error:
        if storage.is_disk_full(error):
            raise
        raise UsageError(f"out of memory while {doing} with --model={config.model} --image_size={config.image_size} "
                         f"--batch_size={config.batch_size} ({one_line(error, 140)}); lower --image_size or "
                         "--batch_size.") from error


def build_steps(config: Config, strategy: tf.distribute.Strategy, precision: str, fresh: bool = True) -> Steps:
    """The data, the network and its Steps under `strategy`, with the dtype policy already set.

    A fresh network gets its initial weights (ImageNet or a file, and any fit to the data); a run
    that will restore a checkpoint skips them, since the checkpoint overwrites them.
    """
    keras.utils.set_random_seed(config.seed)
    builder = data.load_builder(config.dataset, config.data_dir, image_size=config.image_size,
                                validation_fraction=config.validation_fraction)
    info = data.dataset_info(builder, config.train_split, config.eval_split)
    inputs = data.Inputs(builder, info, train_split=config.train_split, eval_split=config.eval_split,
                         global_batch_size=config.batch_size, seed=config.seed,
                         steps_per_epoch=data.training_steps_per_epoch(info.num_train_examples, config.batch_size,
                                                                       config.steps_per_epoch))
    with strategy.scope():
        network = models.build_for_run(config, info.image_shape, info.num_classes, fresh=fresh)
    if network.fit_to_data is not None and fresh:
        network.fit_to_data(inputs.training_sample(DATA_FIT_SAMPLE))
    return Steps(config, strategy, network, inputs, precision)


class Trainer:
    """Drives a run's phases and epochs over its Steps: checkpoints, early stopping, progress and the per-call
    summaries; RunOutputs writes the rest. `run` resumes from the newest checkpoint in the run's directory."""

    def __init__(self, steps: Steps, paths: storage.RunPaths, chief: bool, uploader: gcs.BackgroundUploader = None):
        self.steps, self.paths, self.chief = steps, paths, chief
        self.config = steps.config
        self.state = checkpoints.TrainingState()
        self.early_stopping = early_stopping.EarlyStopping(
            self.config.early_stopping_patience, self.config.early_stopping_monitor, self.state, steps)
        self.store = checkpoints.CheckpointStore(
            paths.checkpoint_dir, steps.checkpoint_objects(self.state, self.early_stopping.best_weights),
            is_chief=chief, task_id=distribution.task_id(steps.strategy),
            after_save=uploader.request if uploader is not None else None)
        self.summaries = summaries.Summaries(paths.log_dir, enabled=chief)
        self.outputs = RunOutputs(steps, paths, chief, self.summaries, uploader)
        self.progress = progress.Progress(self.config.total_epochs, steps.steps_per_epoch)
        self.throughput = reports.Throughput()
        self.started = time.monotonic()

    def run(self, started: float | None = None) -> dict:
        """Trains what remains of the run, then evaluates, exports and reports; returns the metrics."""
        self.started = time.monotonic() if started is None else started  # Epochs report time since the session began.
        self.store.restore_latest()
        state, config = self.state, self.config
        if int(state.epoch.numpy()) >= config.total_epochs:
            finished = self.outputs.finished(state)
            if finished is not None:
                return finished
        else:
            self.outputs.start(state)
            guard = checkpoints.PreemptionGuard(self.steps.strategy, self.store)
            sigterm = cli.note_sigterm()  # Wraps the guard's handler.
            try:
                while int(state.epoch.numpy()) < config.total_epochs:
                    self.train_phase(self.steps.phase_of(int(state.epoch.numpy())), guard)
            finally:
                guard.close()
                self.summaries.stop_profiler()
                self.summaries.flush()
            if sigterm.is_set():
                # The guard promised a checkpoint and an exit, but there was no loop call left to save after.
                logging.warning("The SIGTERM came too late for a preemption checkpoint: training is complete and "
                                "checkpointed (step %d), so the run goes on to its final evaluation and export, then "
                                "exits 0.", int(state.global_step.numpy()))
        return self.finish()

    def train_phase(self, phase: Phase, guard: checkpoints.PreemptionGuard) -> None:
        """Trains the rest of `phase`, from the epoch and step the state is at."""
        state = self.state
        phase.set_trainable()
        logging.info("Phase %s: epochs %d-%d, %d trainable variables.", phase.name, phase.first_epoch + 1,
                     phase.end_epoch, len(phase.variables))
        iterator = self.steps.training_iterator(phase, int(state.epoch.numpy()), int(state.step_in_epoch.numpy()))
        while int(state.epoch.numpy()) < phase.end_epoch:
            self.train_epoch(phase, iterator, guard)

    def train_epoch(self, phase: Phase, iterator, guard: checkpoints.PreemptionGuard) -> None:
        """Trains the rest of the current epoch in calls of --steps_per_loop steps, then ends it."""
        state, steps, config = self.state, self.steps, self.config
        epoch = int(state.epoch.numpy())
        self.progress.start_epoch()
        if int(state.step_in_epoch.numpy()) == 0:
            steps.begin_epoch(phase, epoch)
        epoch_images, epoch_seconds, since_checkpoint = 0, 0.0, 0
        while (step_in_epoch := int(state.step_in_epoch.numpy())) < steps.steps_per_epoch:
            global_step = int(state.global_step.numpy())
            num_steps = self._steps_in_call(global_step, min(config.steps_per_loop,
                                                             steps.steps_per_epoch - step_in_epoch))
            with out_of_memory_names_the_flags(config, f"training at step {global_step + 1}"):
                images, seconds, losses = self._train_call(phase, iterator, global_step, num_steps)
            epoch_images, epoch_seconds = epoch_images + images, epoch_seconds + seconds
            step = int(state.global_step.numpy())
            self.summaries.scalars("train", step, {
                "loss": float(np.mean(losses)), "images_per_second": images / seconds,
                "learning_rate": optimization.current_learning_rate(phase.optimizer)})
            self.progress.update(epoch, step_in_epoch + num_steps, step, steps.train_metrics()["train_loss"],
                                 images / seconds)
            since_checkpoint += num_steps
            if config.checkpoint_steps and since_checkpoint >= config.checkpoint_steps \
                    and step_in_epoch + num_steps < steps.steps_per_epoch:
                self.store.save(step)
                since_checkpoint = 0
            guard.check(step)
        if epoch + 1 == phase.end_epoch:
            steps.end_phase()
        self.end_epoch(phase, epoch, epoch_images / max(epoch_seconds, 1e-9), epoch_seconds)

    def _train_call(self, phase: Phase, iterator, global_step: int, num_steps: int) -> tuple[int, float, np.ndarray]:
        """One call of the compiled loop, with the profiler around it when asked; (images, seconds, losses)."""
        state, config = self.state, self.config
        first_call = not self.steps.compiled(phase)
        if config.profile_steps and global_step < config.profile_steps[0] <= global_step + num_steps:
            self.summaries.start_profiler()
        began = time.monotonic()
        losses = self.steps.train(phase, iterator, num_steps, global_step)
        seconds = time.monotonic() - began
        if config.profile_steps and global_step + num_steps >= config.profile_steps[1]:
            self.summaries.stop_profiler()
        images = num_steps * config.batch_size
        state.step_in_epoch.assign_add(num_steps)
        state.global_step.assign_add(num_steps)
        state.train_seconds.assign_add(seconds)
        self.throughput.add(images, seconds, includes_tracing=first_call)
        return images, seconds, losses

    def _steps_in_call(self, global_step: int, num_steps: int) -> int:
        """Shortens a loop call so that --profile_steps' trace starts and stops exactly at its steps."""
        if self.config.profile_steps:
            first, last = self.config.profile_steps
            for boundary in (first - 1, last):
                if global_step < boundary < global_step + num_steps:
                    num_steps = boundary - global_step
        return num_steps

    def end_epoch(self, phase: Phase, epoch: int, images_per_second: float, train_seconds: float) -> None:
        """Evaluates, records and checkpoints the epoch just trained, then draws its summaries and charts."""
        state, steps = self.state, self.steps
        metrics = {**steps.train_metrics(), **steps.evaluate()}
        entry = {"epoch": epoch + 1, "phase": phase.name, **metrics, "images_per_second": images_per_second,
                 "train_seconds": train_seconds, "elapsed_seconds": time.monotonic() - self.started,
                 "learning_rate": optimization.current_learning_rate(phase.optimizer)}
        state.append_history(entry)
        state.epoch.assign(epoch + 1)
        state.step_in_epoch.assign(0)
        if self.early_stopping.update(phase, epoch, metrics):
            state.epoch.assign(phase.end_epoch)
        step = int(state.global_step.numpy())
        if self.chief:
            hypertune.report_epoch(metrics, step)
        self.store.save(step)
        self.outputs.epoch_summaries(step, epoch, metrics, images_per_second, train_seconds)
        self.progress.end_epoch(epoch, {**metrics, "images_per_second": images_per_second},
                                self.config.total_epochs - int(state.epoch.numpy()))
        self.outputs.plot_history(state.history)

    def finish(self) -> dict:
        """The run's end: the best weights back, then the final evaluation, the export, metrics.json and charts."""
        self.early_stopping.restore_best_weights()
        return self.outputs.write_final(self.state, self.throughput, self.started)
