"""The run directory's start-up order: on gs:// the lock comes before the restore that empties the working copy."""

import pytest

from helpers import bucket_files
from trainer import config as config_lib
from trainer.training import run_lock
from trainer.errors import UsageError
from trainer.training.run_directory import RunDirectory


def test_a_second_launch_on_a_held_gs_run_leaves_the_first_ones_working_copy_alone(gcs_bucket):
    # Two launches of one gs:// run as the same task on one machine share a local working copy (gcs.local_working_dir).
    config = config_lib.build_config(model_dir=f"gs://{gcs_bucket}/held", storage_retry_seconds=5)
    with RunDirectory(config, task_id=0, chief=True) as first:
        written = f"{first.paths.checkpoint_dir}/ckpt-1.index"
        with open(written, "w") as file:
            file.write("a checkpoint not uploaded yet")
        with pytest.raises(UsageError, match=f"gs://{gcs_bucket}/held is in use by another run"):
            with RunDirectory(config, task_id=0, chief=True):
                pass
        with open(written) as file:  # The refused launch did not restore over it.
            assert file.read() == "a checkpoint not uploaded yet"
        assert run_lock.LOCK_NAME in bucket_files(gcs_bucket, "held")
    assert run_lock.LOCK_NAME not in bucket_files(gcs_bucket, "held")
