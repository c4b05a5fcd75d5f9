"""A run's training state under its strategy: the model, each phase's optimizer, the weight average, Lookahead and
the training metrics, which is what its checkpoints hold of it."""

import contextlib
import dataclasses
import hashlib

import keras
import numpy as np
import tensorflow as tf

from trainer.training import checkpoint_schema
from trainer.training import models
from trainer.training import network as network_lib
from trainer.training import optimization
from trainer.config import Config


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


class ModelState:
    """The model and everything that trains with it, made under `strategy`'s scope."""

    def __init__(self, config: Config, strategy: tf.distribute.Strategy, network: network_lib.Network,
                 steps_per_epoch: int, precision: str):
        self.config, self.strategy, self.network, self.model = config, strategy, network, network.model
        self.steps_per_epoch, self.precision = steps_per_epoch, precision
        with strategy.scope():
            self.train_loss = keras.metrics.Mean("train_loss")
            self.train_accuracy = keras.metrics.SparseCategoricalAccuracy("train_accuracy")
            self.phases = self._build_phases()
            self.average = (optimization.WeightAverage(self.model.weights, config.ema_decay)
                            if config.ema_decay else None)
            self.lookahead = (optimization.Lookahead(self.model.weights, config.lookahead_steps, config.lookahead_decay)
                              if config.lookahead_steps else None)

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

    def checkpoint_objects(self, training_state, best_weights: list) -> dict:
        """The run's checkpoint: this state, the loop's `training_state` and early stopping's `best_weights`."""
        metric_variables = [variable for metric in (self.train_loss, self.train_accuracy)
                            for variable in metric.variables]
        return checkpoint_schema.checkpoint_objects(
            self.model, training_state=training_state, best_weights=best_weights,
            optimizers=[phase.optimizer for phase in self.phases], train_metrics=metric_variables,
            weight_average=self.average, lookahead=self.lookahead)

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

    def reset_train_metrics(self) -> None:
        for metric in (self.train_loss, self.train_accuracy):
            metric.reset_state()

    def train_metrics(self) -> dict:
        """The training loss and accuracy since the last reset (the epoch so far)."""
        return {"train_loss": float(self.train_loss.result()), "train_accuracy": float(self.train_accuracy.result())}
