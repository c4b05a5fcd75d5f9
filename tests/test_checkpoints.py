"""Checkpoint store: resuming checkpoints written before an entry was added, and refusing foreign ones."""

import pytest
import tensorflow as tf

from trainer.training import checkpoints
from trainer.errors import UsageError


def objects(with_random_states: bool) -> dict:
    values = {"model": [tf.Variable([1.0, 2.0])], "state": [tf.Variable(7, dtype=tf.int64)]}
    if with_random_states:
        values["random_states"] = [tf.Variable([3, 4], dtype=tf.int64)]
    return values


def test_a_checkpoint_from_before_random_states_resumes_everything_it_has(tmp_path):
    old = objects(with_random_states=False)
    old["model"][0].assign([5.0, 6.0])
    checkpoints.CheckpointStore(str(tmp_path), old, is_chief=True).save(10)

    new = objects(with_random_states=True)
    store = checkpoints.CheckpointStore(str(tmp_path), new, is_chief=True)
    assert store.restore_latest().endswith("ckpt-10")
    assert new["model"][0].numpy().tolist() == [5.0, 6.0]
    assert new["random_states"][0].numpy().tolist() == [3, 4]  # Left as initialised.


def test_random_states_saved_come_back(tmp_path):
    saved = objects(with_random_states=True)
    saved["random_states"][0].assign([8, 9])
    checkpoints.CheckpointStore(str(tmp_path), saved, is_chief=True).save(3)
    restored = objects(with_random_states=True)
    checkpoints.CheckpointStore(str(tmp_path), restored, is_chief=True).restore_latest()
    assert restored["random_states"][0].numpy().tolist() == [8, 9]


def test_a_checkpoint_missing_anything_else_is_refused_in_one_line(tmp_path):
    checkpoints.CheckpointStore(str(tmp_path), {"state": [tf.Variable(7, dtype=tf.int64)]}, is_chief=True).save(1)
    with pytest.raises(UsageError, match="does not match this model and flags"):
        checkpoints.CheckpointStore(str(tmp_path), objects(with_random_states=True), is_chief=True).restore_latest()


def test_the_results_tools_read_a_checkpoint_written_before_random_states(tiny_shapes_dir, tmp_path):
    """runs.py reads a run's checkpoint through the trainer's own schema, older checkpoints included: the run
    ends on its best epoch's weights, which the checkpoint's training state names."""
    import numpy as np

    from trainer.training import checkpoint_schema
    from trainer import config as config_lib
    from trainer.training import early_stopping
    from trainer.training import models
    from trainer.results import runs
    from trainer.training import storage

    config = config_lib.build_config(model="cnn", dataset="tiny_shapes", data_dir=tiny_shapes_dir, precision="float32",
                                     model_dir=str(tmp_path))
    network = models.build_for_run(config, (16, 16, 1), 3, fresh=True)
    best = early_stopping.best_weight_variables(network.model)
    for weight in best:
        weight.assign(weight + 0.25)  # The best epoch's weights differ from the last ones.
    state = checkpoints.TrainingState()
    state.best_epoch.assign(1)
    objects = checkpoint_schema.checkpoint_objects(network.model, training_state=state, best_weights=best)
    assert "random_states" in objects  # The cnn's Dropout has a seed state; an older checkpoint lacks it.
    del objects["random_states"]
    tf.train.Checkpoint(**objects).save(str(tmp_path / "checkpoints" / "ckpt"))
    storage.write_json(str(tmp_path / storage.CONFIG_FILE), config.to_dict())

    classifier = runs.load_classifier(str(tmp_path))
    images = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 1), dtype=np.uint8)
    for weight, value in zip(network.model.weights, best):
        weight.assign(value)
    expected = models.inference_model(network.model, (16, 16, 1))(images).numpy()
    np.testing.assert_allclose(classifier.probabilities(images), expected, rtol=1e-5, atol=1e-6)
