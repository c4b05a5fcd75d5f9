"""What the multi-worker strategy is built with: --communication and --collective_timeout."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import ROOT, make_config
from trainer import distribution

IMPLEMENTATION = tf.distribute.experimental.CommunicationImplementation

# Builds the real strategy for each --communication in a fresh process (outside a cluster it runs
# one local worker): creating it configures collective ops for the whole process, which the other
# tests' strategies must not inherit. Prints what the strategy will all-reduce with.
STRATEGY_OPTIONS_SCRIPT = """
import json
from trainer import config, distribution
built = {}
for name in ("auto", "ring", "nccl"):
    strategy = distribution.create_strategy(config.build_config(
        data_dir="unused", model_dir="unused", strategy="multi_worker_mirrored", communication=name,
        collective_timeout=45))
    options = strategy.extended._communication_options
    built[name] = [options.implementation.name, options.timeout_seconds]
print(json.dumps(built))
"""


@pytest.mark.parametrize("flag, implementation", [
    ("auto", IMPLEMENTATION.AUTO), ("ring", IMPLEMENTATION.RING), ("nccl", IMPLEMENTATION.NCCL)])
def test_communication_flag_picks_the_all_reduce_implementation(flag, implementation):
    config = make_config("unused", "unused", strategy="multi_worker_mirrored", communication=flag)
    options = distribution.communication_options(config)
    assert options.implementation == implementation


def test_collective_timeout_bounds_each_collective_and_zero_waits_forever():
    bounded = make_config("unused", "unused", strategy="multi_worker_mirrored", collective_timeout=45)
    unbounded = make_config("unused", "unused", strategy="multi_worker_mirrored", collective_timeout=0)
    assert distribution.communication_options(bounded).timeout_seconds == 45
    assert distribution.communication_options(unbounded).timeout_seconds is None


def test_the_multi_worker_strategy_is_built_with_the_requested_communication():
    cluster_variables = ("TF_CONFIG", "CLUSTER_SPEC", "WORKER_HOSTS", "JOB_COMPLETION_INDEX")
    env = {key: value for key, value in os.environ.items() if key not in cluster_variables}
    result = subprocess.run([sys.executable, "-c", STRATEGY_OPTIONS_SCRIPT], capture_output=True, text=True,
                            cwd=ROOT, env={**env, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "auto": ["AUTO", 45], "ring": ["RING", 45], "nccl": ["NCCL", 45]}
