"""Evaluation during and at the end of a run: loss, accuracy and the confusion matrix, with test-time augmentation,
in a compiled, distributed loop."""

import keras
import numpy as np
import tensorflow as tf

from trainer.training import data
from trainer.training import distribution
from trainer.training import models
from trainer.training.model_state import ModelState


class EvaluationLoop:
    """Evaluates a ModelState's evaluation weights on the evaluation split."""

    def __init__(self, state: ModelState, inputs: data.Inputs):
        self.state, self.strategy, self.config, self.info = state, state.strategy, state.config, inputs.info
        self.eval_steps = data.evaluation_steps(self.info.num_eval_examples, state.config.batch_size)
        self.jit_compile = distribution.resolve_jit_compile(state.config.jit_compile, state.strategy)
        self.eval_loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)
        with state.strategy.scope():
            self.eval_loss = keras.metrics.Mean("eval_loss")
            self.eval_accuracy = keras.metrics.SparseCategoricalAccuracy("eval_accuracy")
            # Counts of (true, predicted) pairs; each replica counts its own examples, reads sum them.
            self.eval_confusion = tf.Variable(
                tf.zeros([self.info.num_classes] * 2), trainable=False,
                synchronization=tf.VariableSynchronization.ON_READ, aggregation=tf.VariableAggregation.SUM)
        self._eval_dataset = state.strategy.distribute_datasets_from_function(inputs.evaluation)
        self._eval_loops = {}

    def _make_eval_loop(self, tta_translate: int):
        model, tta = self.state.model, self.config.tta

        def replica_step(images, labels):
            probabilities = models.test_time_probabilities(model, tf.cast(images, tf.float32), tta, tta_translate)
            weights = tf.cast(labels != data.PADDING_LABEL, tf.float32)
            labels = tf.maximum(labels, 0)
            self.eval_loss.update_state(self.eval_loss_fn(labels, probabilities), sample_weight=weights)
            self.eval_accuracy.update_state(labels, probabilities, sample_weight=weights)
            self.eval_confusion.assign_add(tf.math.confusion_matrix(
                labels, tf.argmax(probabilities, axis=-1), self.info.num_classes, weights=weights, dtype=tf.float32))

        compiled_step = (tf.function(replica_step, jit_compile=True, autograph=False) if self.jit_compile
                         else replica_step)

        @tf.function(autograph=False)  # As the training loop (see there): written out, not converted.
        def eval_loop(iterator, num_steps):
            def one_step(index):
                self.strategy.run(compiled_step, args=next(iterator))
                return index + 1

            tf.while_loop(lambda index: index < num_steps, one_step, (tf.constant(0),))

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
        with self.state.evaluation_weights():
            self._eval_loops[tta_translate](iter(self._eval_dataset), tf.constant(self.eval_steps))
        return {"eval_loss": float(self.eval_loss.result()), "eval_accuracy": float(self.eval_accuracy.result())}

    def confusion_matrix(self) -> np.ndarray:
        """Counts of (true class, predicted class) from the last evaluation."""
        return np.rint(self.eval_confusion.numpy()).astype(np.int64)
