"""A run's outputs besides its checkpoints: its summaries and history chart as it trains, then the final
evaluation, the export, metrics.json and the charts."""

import os
import tempfile
import time

from absl import logging
import numpy as np
import tensorflow as tf

from trainer.training import checkpoints
from trainer.training import export
from trainer.training import gcs
from trainer.results import reports
from trainer.training import storage
from trainer.training import summaries
from trainer.errors import UsageError
from trainer.training.steps import Steps


class RunOutputs:
    """What a run writes for people, TensorBoard and serving, apart from its checkpoints. Only the chief
    writes; every worker still takes part in the collectives (the confusion matrix and the export)."""

    def __init__(self, steps: Steps, paths: storage.RunPaths, chief: bool, run_summaries: summaries.Summaries,
                 uploader: gcs.BackgroundUploader = None):
        self.steps, self.paths, self.chief, self.uploader = steps, paths, chief, uploader
        self.config = steps.config
        self.summaries = run_summaries

    def finished(self, state: checkpoints.TrainingState) -> dict | None:
        """For a run that trained all its epochs: its metrics when its outputs are complete, else None (and
        the final evaluation, export and metrics are to be done again)."""
        finished = self._finished_outputs(state)
        if finished is not None:
            logging.info("The run in %s already finished %d epochs; nothing to do.",
                         self.paths.model_dir, finished["epochs_completed"])
            return finished
        logging.info("The run in %s trained all its epochs, but its outputs are not from its last checkpoint "
                     "(step %d); completing the final evaluation, export and metrics from it.",
                     self.paths.model_dir, int(state.global_step.numpy()))
        return None

    def _finished_outputs(self, state: checkpoints.TrainingState) -> dict | None:
        """metrics.json when it was written from the checkpoint just restored, else None.

        The run is finished when its outputs are: a job killed between its last checkpoint and the end of
        `write_final` leaves the outputs of an earlier session (or none), which must not pass for the final
        ones. metrics.json is written last, after the export, and names the checkpoint step it came from.
        """
        try:
            finished = storage.read_json(self.paths.metrics_file)
        except UsageError as error:
            logging.warning("%s Writing it again.", error)
            return None
        if finished is None:
            return None
        if "checkpoint_step" in finished:  # Older runs' metrics.json lack it; their epoch count must do.
            if finished["checkpoint_step"] != int(state.global_step.numpy()):
                return None
        return finished if finished.get("epochs_completed") == len(state.history) else None

    def start(self, state: checkpoints.TrainingState) -> None:
        """A training session's summaries: its flags; for a new run, its hparams and augmented inputs."""
        step, config = int(state.global_step.numpy()), self.config
        self.summaries.text("train", step, "flags", summaries.flags_markdown(config.to_dict()))
        if step == 0 and self.chief:
            self.summaries.hparams(config.to_dict(), run_name=os.path.basename(config.model_dir.rstrip("/")))
            self.summaries.image_grid(
                "train", 0, "augmented_inputs", self.steps.augmented_sample(),
                "Training images as the first step's on-device augmentation shows them.")

    def epoch_summaries(self, step: int, epoch: int, metrics: dict, images_per_second: float,
                        train_seconds: float) -> None:
        """The epoch's scalars and confusion matrix in TensorBoard."""
        self.summaries.scalars("train", step, {
            "accuracy": metrics["train_accuracy"], "epoch_loss": metrics["train_loss"],
            "epoch_images_per_second": images_per_second, "epoch_seconds": train_seconds})
        self.summaries.scalars("eval", step,
                               {"loss": metrics["eval_loss"], "accuracy": metrics["eval_accuracy"]})
        # Reading the counts is a collective under MultiWorkerMirroredStrategy: every worker reads.
        confusion = self.steps.confusion_matrix()
        if self.chief:
            self.summaries.png("eval", step, "confusion_matrix",
                               self._confusion_png(confusion, f"epoch {epoch + 1}"))
        self.summaries.flush()

    def plot_history(self, history: list[dict]) -> None:
        if self.chief:
            with storage.disk_space_guard("history.png", self.paths.model_dir,
                                          leftovers=os.path.join(self.paths.model_dir, ".tmp-*")):
                reports.plot_history(self.paths.history_plot, history, self._title())

    def write_final(self, state: checkpoints.TrainingState, throughput: reports.Throughput,
                    started: float) -> dict:
        """The final evaluation, the export, metrics.json and the charts, from the weights the model has now;
        returns the metrics (none on a worker)."""
        steps, config = self.steps, self.config
        final = steps.evaluate(final=True)
        confusion = steps.confusion_matrix()  # A collective: before the workers part ways below.
        fingerprint = steps.weights_fingerprint()
        logging.info("Final weights fingerprint %s.", fingerprint)
        export_dir = self.paths.export_dir if self.chief else f"{self.paths.export_dir}.worker-temp"
        # export_model stages the SavedModel in export.partial and swaps it in whole; a full disk leaves the
        # staging folder, which goes, and the previous export, which stays.
        with storage.disk_space_guard("the export", self.paths.model_dir, leftovers=f"{export_dir}.partial"):
            with steps.evaluation_weights():
                export.export_model(steps.model, steps.info.image_shape, steps.info.class_names, export_dir,
                                    tta=config.tta, tta_translate=config.tta_translate)
        if not self.chief:
            tf.io.gfile.rmtree(export_dir)
            return {}
        metrics = reports.run_metrics(config, steps, state, final, fingerprint=fingerprint,
                                      throughput=throughput, session_seconds=time.monotonic() - started)
        step = int(state.global_step.numpy())
        with storage.disk_space_guard("metrics.json and the charts", self.paths.model_dir,
                                      leftovers=os.path.join(self.paths.model_dir, ".tmp-*")):
            # history.png is not drawn again: the last epoch's end drew this same history.
            self.summaries.scalars("run", step, {"test_accuracy": metrics["test_accuracy"],
                                                 "test_loss": metrics["test_loss"]})
            self.summaries.png("eval", step, "final_confusion_matrix",
                               self._confusion_png(confusion, "final"))
            self.summaries.flush()
            # Last: metrics.json is what marks the run finished (see _finished_outputs).
            reports.write_metrics(self.paths.metrics_file, metrics)
        if self.uploader is not None:
            self.uploader.finish()
        logging.info("Test accuracy %.4f, loss %.4f on %s. Outputs in %s.", metrics["test_accuracy"],
                     metrics["test_loss"], config.eval_split, config.model_dir)
        return metrics

    def _confusion_png(self, confusion: np.ndarray, when: str) -> bytes:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "confusion.png")
            reports.plot_confusion_matrix(path, confusion, self.steps.info.class_names,
                                          f"{self._title()}, {self.config.eval_split}, {when}")
            with open(path, "rb") as file:
                return file.read()

    def _title(self) -> str:
        return f"{self.config.model} on {self.steps.info.name}"
