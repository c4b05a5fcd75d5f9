"""Checkpoint store: resuming checkpoints written before an entry was added, and refusing foreign ones."""

import pytest
import tensorflow as tf

from trainer import checkpoints
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
