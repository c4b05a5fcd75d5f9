"""Early stopping: the best epoch by the monitored metric, its weights, and when a phase has stopped improving."""

import math

from absl import logging
import tensorflow as tf

from trainer.training import checkpoints


def best_weight_variables(model) -> list:
    """Where the best epoch's weights are kept (and checkpointed): one variable per model weight."""
    return [tf.Variable(weight.value, trainable=False) for weight in model.weights]


class EarlyStopping:
    """Remembers the best epoch's evaluation weights, and ends a phase after `patience` epochs without improvement.

    Its progress lives in the TrainingState and its best weights in variables, both saved with every checkpoint,
    so a resumed run stops where an uninterrupted one would, and every worker can restore the best weights
    without reading another worker's files. Patience 0 turns it off: the run ends on its last weights.
    """

    def __init__(self, patience: int, monitor: str, state: checkpoints.TrainingState, steps):
        self.patience, self.monitor, self.state, self.steps = patience, monitor, state, steps
        with steps.strategy.scope():
            self.best_weights = best_weight_variables(steps.model)

    def update(self, phase, epoch: int, metrics: dict) -> bool:
        """Records epoch `epoch` (0-based) of `phase` (a steps.Phase); True when the phase should stop now."""
        if not self.patience:
            return False
        state = self.state
        if epoch == phase.first_epoch:
            state.epochs_without_improvement.assign(0)
        value, best = metrics[self.monitor], float(state.best_value.numpy())
        if math.isnan(best) or (value > best if self.monitor == "eval_accuracy" else value < best):
            state.best_value.assign(value)
            state.best_epoch.assign(epoch + 1)
            state.epochs_without_improvement.assign(0)
            self._remember_weights()
            return False
        state.epochs_without_improvement.assign_add(1)
        if int(state.epochs_without_improvement.numpy()) < self.patience or epoch + 1 >= phase.end_epoch:
            return False
        logging.info("Early stopping: %s has not improved for %d epochs (best %.4f at epoch %d); ending the %s phase.",
                     self.monitor, self.patience, float(state.best_value.numpy()), int(state.best_epoch.numpy()),
                     phase.name)
        return True

    @property
    def best_epoch(self) -> int | None:
        """The best epoch (1-based) when early stopping is on and has seen one, else None."""
        epoch = int(self.state.best_epoch.numpy())
        return epoch if self.patience and epoch > 0 else None

    def restore_best_weights(self) -> None:
        """Puts the best epoch's evaluation weights into the model (and the average, so evaluation sees them)."""
        if self.best_epoch is None:
            return
        self.steps.set_weights(self.best_weights)
        logging.info("Restored the best weights (epoch %d, %s %.4f).", self.best_epoch, self.monitor,
                     float(self.state.best_value.numpy()))

    def _remember_weights(self) -> None:
        with self.steps.evaluation_weights():
            for best, weight in zip(self.best_weights, self.steps.model.weights):
                best.assign(weight.value)
