"""A run's Steps: its training state, training loop and evaluation under one strategy, as the Trainer drives them."""

import tensorflow as tf

from trainer.training import data
from trainer.training import models
from trainer.training import network as network_lib
from trainer.config import Config
from trainer.errors import UsageError
from trainer.training.evaluation_loop import EvaluationLoop
from trainer.training.model_state import ModelState
from trainer.training.model_state import Phase
from trainer.training.training_loop import TrainingLoop

__all__ = ["Phase", "Steps", "check_batch_size"]


class Steps:
    """The three parts of a run under one strategy: `state` (model_state.ModelState: the model, optimizers, weight
    average, Lookahead), `loop` (training_loop.TrainingLoop) and `evaluation` (evaluation_loop.EvaluationLoop).
    The methods hand each call to its part."""

    def __init__(self, config: Config, strategy: tf.distribute.Strategy, network: network_lib.Network,
                 inputs: data.Inputs, precision: str):
        self.config, self.strategy, self.network, self.inputs = config, strategy, network, inputs
        self.info, self.model, self.precision = inputs.info, network.model, precision
        self.num_replicas = strategy.num_replicas_in_sync
        self.steps_per_epoch = inputs.steps_per_epoch
        self.state = ModelState(config, strategy, network, self.steps_per_epoch, precision)
        self.hooks = models.training_hooks(config.model, network, config, self.steps_per_epoch)
        self.loop = TrainingLoop(self.state, inputs, self.hooks)
        self.evaluation = EvaluationLoop(self.state, inputs)

    @property
    def phases(self) -> list[Phase]:
        return self.state.phases

    @property
    def average(self):
        """The weight average (optimization.WeightAverage), or None."""
        return self.state.average

    @average.setter
    def average(self, average) -> None:
        self.state.average = average

    @property
    def lookahead(self):
        return self.state.lookahead

    @property
    def train_loss_fn(self):
        return self.loop.train_loss_fn

    # The training state.

    def phase_of(self, epoch: int) -> Phase:
        return self.state.phase_of(epoch)

    def end_phase(self) -> None:
        self.state.end_phase()

    def checkpoint_objects(self, training_state, best_weights: list) -> dict:
        return self.state.checkpoint_objects(training_state, best_weights)

    def evaluation_weights(self):
        return self.state.evaluation_weights()

    def set_weights(self, values: list) -> None:
        self.state.set_weights(values)

    def weights_fingerprint(self) -> str:
        return self.state.weights_fingerprint()

    def reset_train_metrics(self) -> None:
        self.state.reset_train_metrics()

    def train_metrics(self) -> dict:
        return self.state.train_metrics()

    # Training.

    def begin_epoch(self, phase: Phase, epoch: int) -> None:
        """Before an epoch's first step: the training metrics start over, and the network's hooks run."""
        self.state.reset_train_metrics()
        self.hooks.begin_epoch(phase, epoch)

    def training_iterator(self, phase: Phase, start_epoch: int | None = None, start_step: int = 0):
        return self.loop.training_iterator(phase, start_epoch, start_step)

    def train(self, phase: Phase, iterator, num_steps: int, first_step: int = 0):
        return self.loop.train(phase, iterator, num_steps, first_step)

    def compiled(self, phase: Phase) -> bool:
        return self.loop.compiled(phase)

    def augmented_sample(self, count: int = 16):
        return self.loop.augmented_sample(count)

    # Evaluation.

    def evaluate(self, final: bool = False) -> dict:
        return self.evaluation.evaluate(final)

    def confusion_matrix(self):
        return self.evaluation.confusion_matrix()


def check_batch_size(batch_size: int, num_replicas: int) -> None:
    if batch_size % num_replicas:
        raise UsageError(f"--batch_size={batch_size} does not split evenly over {num_replicas} replicas; "
                         f"use a multiple of {num_replicas}.")
