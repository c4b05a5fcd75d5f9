"""What a run's checkpoint holds: one function builds its object tree, which the trainer writes and runs.py reads."""

from absl import logging
import tensorflow as tf

# Checkpoint entries that checkpoints written by earlier versions of the trainer lack; such a
# checkpoint still resumes (and still reads back), without them.
ADDED_LATER = ("random_states",)


def checkpoint_objects(model, *, training_state, best_weights: list, optimizers=(), train_metrics=(),
                       weight_average=None, lookahead=None) -> dict:
    """The checkpoint's entries by name: the model, the training state (a checkpoints.TrainingState), early
    stopping's best weights, and what training adds (the phases' optimizers, the training metrics' variables, the
    optimization.WeightAverage and Lookahead, when kept). A reader passes only the parts it has."""
    objects = {"model": model, "optimizers": list(optimizers), "train_metrics": list(train_metrics),
               "state": training_state, "best_weights": best_weights}
    # The model's checkpoint holds its weights only. Its random layers' seed states (Dropout's)
    # must come back too, or a resumed run draws other dropout masks than the run it continues.
    weight_ids = {id(weight) for weight in model.weights}
    random_states = [variable for variable in model.variables if id(variable) not in weight_ids]
    if random_states:
        objects["random_states"] = random_states
    if weight_average is not None:
        objects["weight_average"] = weight_average.checkpoint_objects()
    if lookahead is not None:
        objects["lookahead"] = lookahead.slow
    return objects


def checkpoint_for(objects: dict, path: str, whole: tf.train.Checkpoint | None = None) -> tf.train.Checkpoint:
    """A checkpoint of `objects` to restore `path` into (`whole`, when given and `path` has every entry), less
    the entries added since an older `path` was written."""
    saved = {name.split("/", 1)[0] for name, _ in tf.train.list_variables(path)}
    missing = [name for name in ADDED_LATER if name in objects and name not in saved]
    if not missing and whole is not None:
        return whole
    if missing:
        logging.warning("%s was written by an earlier version without %s; resuming without them, so the "
                        "random draws of dropout differ from an uninterrupted run's.", path, ", ".join(missing))
    return tf.train.Checkpoint(**{name: value for name, value in objects.items() if name not in missing})
